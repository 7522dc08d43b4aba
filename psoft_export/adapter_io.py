"""Adapter directories: PEFT's format both ways, plus what makes ours exact everywhere.

An adapter directory written here is a PEFT adapter directory (``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names), so ``peft.PeftModel.from_pretrained(base, DIR)`` loads it.
Beside those files it holds:

- ``decomposition/`` (PSOFT): the stored subspace ``A``, ``B`` per target with the hash of each source weight,
  so our own loads never re-run an SVD and refuse a model with other weights;
- ``psoft_export.safetensors``: our trainable tensors in our basis (``<module>.q``, ``.vector_a``, ``.vector_b``);
- ``psoft_export.json``: the method, its configuration, targets, task, classes and training summary.

The portability trap (docs/adapters.md, PEFT interop traps): PEFT rebuilds ``A``, ``B`` by SVD at load, and singular
vectors come with arbitrary signs. When writing the PEFT tensors we therefore run the SVD PEFT will run (full,
float32, this machine), find the basis change ``O`` between its subspace and ours (``A_peft = O A_ours``, a signed
identity in practice) and store ``Q' = O Q O^T``: the function PEFT rebuilds is the one we trained. A PEFT directory
without our files is read as PEFT would read it (subspace recomputed by PEFT's algorithm, OFT's exact-mode sign
flipped).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from psoft_export import __version__
from psoft_export.adapters import OftConfig, OftLinear, PsoftConfig, PsoftLinear, adapter_layers, inject
from psoft_export.adapters.bnb import is_quantized
from psoft_export.adapters.cayley import skew_symmetric
from psoft_export.adapters.layout import is_fan_in_fan_out, weight_out_in
from psoft_export.atomic import atomic_file
from psoft_export.checkpoint import check_weights, file_sha256
from psoft_export.errors import UserInputError
from psoft_export.subspace import principal_subspace, psoft_factors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "psoft_export.json"
OURS_FILE = "psoft_export.safetensors"
DECOMPOSITION_DIR = "decomposition"
FORMAT = "psoft-export/adapter/1"
PREFIX = "base_model.model."
MODULE_KEY = {"PSOFT": "psoft_R", "OFT": "oft_R"}
MethodConfig = Union[PsoftConfig, OftConfig]


# ---------------------------------------------------------------- configs: ours <-> PEFT's adapter_config.json


def peft_config(
    cfg: MethodConfig,
    targets: list[str],
    fan_in_fan_out: bool,
    task_type: Optional[str],
    modules_to_save: list[str],
    base_model: str,
) -> dict:
    """The ``adapter_config.json`` PEFT 0.21 writes for the same adapter."""
    common = {
        "base_model_name_or_path": base_model,
        "target_modules": sorted(targets),
        "task_type": task_type,
        "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_weights": True,
        "exclude_modules": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "revision": None,
        "peft_version": "0.21.2",
    }
    if isinstance(cfg, PsoftConfig):
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        return {
            **common,
            "peft_type": "PSOFT",
            "r": cfg.rank,
            "psoft_alpha": alpha,
            "psoft_dropout": cfg.dropout,
            "ab_svd_init": f"{cfg.init}_init",
            "psoft_svd": "full",
            "psoft_svd_lowrank_niter": cfg.niter,
            "random_seed": cfg.seed,
            "psoft_orth": cfg.orth,
            "psoft_mag_a": cfg.vector_a,
            "psoft_mag_b": cfg.vector_b,
            "use_cayley_neumann": cfg.cayley == "neumann",
            # PEFT warns about a term count it will not use: write its default then
            "num_cayley_neumann_terms": cfg.neumann_terms if cfg.cayley == "neumann" else 5,
            "cayley_neumann_eps": cfg.neumann_eps,
        }
    return {
        **common,
        "peft_type": "OFT",
        "r": 0,
        "oft_block_size": cfg.block_size,
        "module_dropout": 0.0,
        "bias": "none",
        "coft": False,
        "eps": 6e-05,
        "block_share": cfg.block_share,
        "use_cayley_neumann": cfg.cayley == "neumann",
        "num_cayley_neumann_terms": cfg.neumann_terms,
    }


def method_config(peft: dict, where: str = "adapter") -> MethodConfig:
    """Our config from a PEFT ``adapter_config.json`` dict (PSOFT or OFT); anything else, or a field of the wrong
    type (``"r": null``, ``"psoft_alpha": []``), is refused in one line."""
    try:
        return _method_config(peft, where)
    except UserInputError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise UserInputError(
            f"{where}: {CONFIG_FILE} has a missing field or one of the wrong type "
            f"({type(exc).__name__}: {str(exc)[:120]}): re-save the adapter"
        ) from None


def _method_config(peft: dict, where: str) -> MethodConfig:
    kind = peft.get("peft_type")
    cayley = "neumann" if peft.get("use_cayley_neumann") else "exact"
    if kind == "PSOFT":
        return PsoftConfig(
            rank=int(peft["r"]),
            alpha=float(peft.get("psoft_alpha", peft["r"])),
            init=str(peft.get("ab_svd_init", "psoft_init")).removesuffix("_init"),
            svd=peft.get("psoft_svd", "full"),
            niter=int(peft.get("psoft_svd_lowrank_niter", 10)),
            seed=int(peft.get("random_seed", 0)),
            cayley=cayley,
            neumann_terms=int(peft.get("num_cayley_neumann_terms", 5)),
            neumann_eps=peft.get("cayley_neumann_eps"),
            vector_a=bool(peft.get("psoft_mag_a", True)),
            vector_b=bool(peft.get("psoft_mag_b", True)),
            orth=bool(peft.get("psoft_orth", True)),
            dropout=float(peft.get("psoft_dropout", 0.0)),
        )
    if kind == "OFT":
        if peft.get("coft"):
            raise UserInputError(f"{where}: constrained OFT (coft=true) is not supported: retrain with coft=false")
        if not peft.get("oft_block_size"):
            raise UserInputError(
                f"{where}: OFT adapters sized by r (blocks per layer) are not supported: use oft_block_size"
            )
        return OftConfig(
            block_size=int(peft["oft_block_size"]),
            cayley=cayley,
            neumann_terms=int(peft.get("num_cayley_neumann_terms", 5)),
            block_share=bool(peft.get("block_share", False)),
        )
    raise UserInputError(f"{where} is a {kind or 'unknown'} adapter: psoft-export reads PSOFT and OFT adapters only")


# ---------------------------------------------------------------- PEFT's basis for PSOFT

# PEFT's PSOFT file is written only when the function PEFT rebuilds from it (its own SVD, recomputed at load)
# matches ours to this relative error on the layer outputs.
PEFT_FAITHFUL_RTOL = 1e-5
PROBE_ROWS = 64


def peft_basis_change(layer: PsoftLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(O, A_peft, B_peft)``: PEFT's factors (its full float32 SVD of this weight, on this machine) and ``O``
    ``(r, r)`` with ``A_peft ~= O A_ours``."""
    cfg = layer.config
    sub = principal_subspace(weight_out_in(layer.base_layer).detach().float(), cfg.rank, svd="full")
    A_peft, B_peft = psoft_factors(sub, cfg.scaling, cfg.init)
    O = F.normalize(A_peft.double(), dim=1) @ F.normalize(layer.A.double(), dim=1).T
    return O, A_peft, B_peft


def _conjugate(layer: PsoftLinear, O: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
    """The layer's trainable tensors in the basis ``O`` (``R' = O R O^T``); ``None`` when trained vectors cannot
    be carried over (``O`` is not a signed identity: PEFT's SVD picked another basis of a near-degenerate
    subspace, and ``diag(v)`` does not commute with a rotation)."""
    signs = torch.sign(O.diagonal())
    is_signed_identity = float((O - torch.diag(signs)).abs().max()) < 1e-3
    vectors = [v for v in (layer.vector_a, layer.vector_b) if v is not None]
    if not is_signed_identity and any(float((v.detach() - 1).abs().max()) > 0 for v in vectors):
        return None
    O = torch.diag(signs) if is_signed_identity else O
    q = layer.q.detach().double()
    r = layer.rank
    if layer.config.orth:
        Q = O @ skew_symmetric(q, r) @ O.T
        rows, cols = torch.triu_indices(r, r, 1)
        q = Q[rows, cols]
    else:
        q = O @ q @ O.T
    out = {"weight": q.to(layer.q.dtype)}
    for attr in ("vector_a", "vector_b"):
        if getattr(layer, attr) is not None:
            out[attr] = getattr(layer, attr).detach().clone()
    return out


@torch.no_grad()
def _peft_delta(layer: PsoftLinear, tensors: dict[str, torch.Tensor], A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``s B (R' - I) A`` as PEFT computes it from ``tensors`` and its own factors."""
    shadow = PsoftLinear(layer.base_layer, layer.config, factors=(A, B))
    shadow.q.copy_(tensors["weight"])
    for attr in ("vector_a", "vector_b"):
        if getattr(shadow, attr) is not None:
            getattr(shadow, attr).copy_(tensors[attr])
    return shadow.delta_weight()


@torch.no_grad()
def peft_psoft_form(layer: PsoftLinear, name: str) -> tuple[Optional[dict[str, torch.Tensor]], float, str]:
    """PEFT's tensors for ``layer`` and the relative error of the layer output PEFT would compute from them
    (``max |x (dW_peft - dW_ours)^T| / max |x W_ours'^T|`` over seeded Gaussian probe rows); ``None`` and the
    reason when they cannot represent the adapter."""
    if is_quantized(layer.base_layer):  # PEFT 0.21: "TypeError: PSOFT init requires float32/float16/bfloat16"
        return None, float("inf"), f"{name}: PEFT's PSOFT refuses a quantized base layer (it needs a float weight)"
    O, A_peft, B_peft = peft_basis_change(layer)
    tensors = _conjugate(layer, O)
    if tensors is None:
        return (
            None,
            float("inf"),
            (
                f"{name}: PEFT's SVD picks another basis of this subspace (near-equal singular "
                "values) and the trained scaling vectors cannot be carried into it"
            ),
        )
    W = weight_out_in(layer.base_layer).detach().double()
    ours = layer.delta_weight().double()
    theirs = _peft_delta(layer, tensors, A_peft, B_peft).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, W.shape[1], generator=gen, dtype=torch.float64)
    err = float((x @ (theirs - ours).T).abs().max() / (x @ (W + ours).T).abs().max().clamp_min(1e-30))
    return tensors, err, f"{name}: PEFT's recomputed SVD changes the layer output by {err:.1e} (relative)"


def peft_tensors(layers: dict[str, nn.Module]) -> tuple[Optional[dict[str, torch.Tensor]], dict]:
    """The adapter's tensors under PEFT's key names, and a report ``{faithful, rel_err, worst, reason}``.

    PSOFT is aligned to the basis PEFT's SVD will produce and checked by recomputing PEFT's function; when any
    layer misses :data:`PEFT_FAITHFUL_RTOL` the tensors are ``None``. OFT is exact (its exact mode negated).

    Cost: one float32 SVD of each PSOFT target's base weight, on the weight's device (what PEFT itself pays at every
    load of the file). The first layer PEFT cannot reproduce ends the check: the PEFT form is all or nothing, so the
    remaining SVDs would be wasted. ``report["seconds"]`` and ``report["svds"]`` say what it cost.
    """
    out, worst, worst_reason, worst_name, svds, t0 = {}, 0.0, "", None, 0, time.perf_counter()
    for name, layer in layers.items():
        if isinstance(layer, PsoftLinear):
            tensors, err, reason = peft_psoft_form(layer, name)
            svds += 1
            unfaithful = not err <= PEFT_FAITHFUL_RTOL  # NaN included
            if unfaithful or err > worst or worst_name is None:
                worst, worst_reason, worst_name = err, reason, name
            if unfaithful:
                break
            for attr, t in tensors.items():
                out[f"{PREFIX}{name}.psoft_R.{attr}"] = t
        else:
            sign = -1.0 if layer.config.cayley == "exact" else 1.0  # PEFT's exact OFT is cayley(-Q)
            out[f"{PREFIX}{name}.oft_R.weight"] = sign * layer.q.detach()
    faithful = worst <= PEFT_FAITHFUL_RTOL
    report = {
        "faithful": faithful,
        "rel_err": worst if math.isfinite(worst) else None,
        "worst": worst_name,
        "tolerance": PEFT_FAITHFUL_RTOL,
        "reason": None if faithful else worst_reason,
        "svds": svds,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return (out if faithful else None), report


def _finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserInputError(
                f"{where}: {key} holds NaN or Inf values: the adapter is damaged; retrain or "
                "restore it from a checkpoint"
            )


# ---------------------------------------------------------------- write


def save_adapter(
    out_dir: Path,
    model: nn.Module,
    cfg: MethodConfig,
    *,
    base_model: str,
    task: str = "causal",
    classes: Optional[list] = None,
    heads: Optional[list[str]] = None,
    extra: Optional[dict] = None,
) -> dict:
    """Write the adapter files of ``model`` (which carries injected layers) into the existing ``out_dir``.

    Always: ``psoft_export.safetensors`` (our tensors and the heads) and ``psoft_export.json`` (which also holds
    the PEFT config). PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` only when PEFT, recomputing
    its SVD at load, reproduces the adapter (PSOFT; OFT always does). Returns the PEFT report
    (``{faithful, rel_err, worst, tolerance, reason}``). ``heads`` are module names saved whole (a new
    classification head). The decomposition, when PSOFT, is written by the caller into
    ``out_dir/decomposition``. Files are written to temporary names and renamed.
    """
    layers = adapter_layers(model)
    heads = heads or []
    head_state = {}
    for head in heads:
        for p_name, t in model.get_submodule(head).state_dict().items():
            head_state[f"{PREFIX}{head}.{p_name}"] = t.detach().contiguous()
    ours = {
        f"{n}.{p}": t.detach().contiguous() for n, l in layers.items() for p, t in l.named_parameters(recurse=False)
    }
    _finite({**ours, **head_state}, str(out_dir))
    peft, report = peft_tensors(layers)
    fan = any(is_fan_in_fan_out(l.base_layer) for l in layers.values())
    task_type = "SEQ_CLS" if task == "classify" else "CAUSAL_LM"
    config = peft_config(cfg, sorted({n.rsplit(".", 1)[-1] for n in layers}), fan, task_type, heads, base_model)
    meta = {
        "format": FORMAT,
        "method": "psoft" if isinstance(cfg, PsoftConfig) else "oft",
        "config": cfg.to_dict(),
        "targets": list(layers),
        "task": task,
        "classes": classes,
        "heads": heads,
        "peft_config": config,
        "peft_form": report,
        "versions": {"psoft_export": __version__, "torch": torch.__version__},
        **(extra or {}),
    }
    atomic_file(out_dir / OURS_FILE, lambda p: save_file({**ours, **head_state}, str(p), metadata={"format": FORMAT}))
    if peft is not None:
        tensors = {**{k: v.contiguous() for k, v in peft.items()}, **head_state}
        atomic_file(out_dir / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        meta["peft_sha256"] = file_sha256(out_dir / WEIGHTS_FILE)
        atomic_file(out_dir / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    else:  # a re-save (--resume) must not leave an earlier, now stale PEFT form beside the new tensors
        (out_dir / CONFIG_FILE).unlink(missing_ok=True)
        (out_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    atomic_file(out_dir / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2, default=str) + "\n"))
    return report


# ---------------------------------------------------------------- read


def read_meta(adapter_dir: Path) -> Optional[dict]:
    """``psoft_export.json`` (our adapters) or ``None`` (a PEFT directory)."""
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise UserInputError(f"{path} is not valid JSON ({exc}): re-save the adapter (train --resume)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not _meta_is_well_formed(meta):
        raise UserInputError(
            f"{path} is not a well-formed psoft-export adapter record (format {FORMAT}; targets, "
            "task, classes, heads, hashes of the right types): re-save the adapter (train --resume)"
        )
    return meta


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _meta_is_well_formed(meta: dict) -> bool:
    """The fields our readers use, with their types (everything else in the record is informational)."""
    weights = meta.get("base_weights")
    classes = meta.get("classes")
    return (
        _is_str_list(meta.get("targets"))
        and bool(meta["targets"])
        and meta.get("task") in ("causal", "completion", "classify")
        and meta.get("method") in ("psoft", "oft")
        and isinstance(meta.get("config"), dict)
        and (
            classes is None
            or (
                isinstance(classes, list)
                and len(classes) >= 2
                and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes)
            )
        )
        and _is_str_list(meta.get("heads", []))
        and (meta.get("peft_config") is None or isinstance(meta["peft_config"], dict))
        and (meta.get("peft_sha256") is None or isinstance(meta["peft_sha256"], str))
        and (
            weights is None
            or (
                isinstance(weights, dict)
                and all(
                    isinstance(w, dict) and isinstance(w.get("key"), str) and isinstance(w.get("sha256"), str)
                    for w in weights.values()
                )
            )
        )
    )


def read_config(adapter_dir: Path) -> dict:
    """The adapter's PEFT config: ``adapter_config.json``, or the copy in ``psoft_export.json`` when PEFT's
    form was not written (see :func:`save_adapter`)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserInputError(f"adapter directory {adapter_dir} does not exist: pass the directory 'train' wrote")
    if (adapter_dir / CONFIG_FILE).is_file():
        try:
            config = json.loads((adapter_dir / CONFIG_FILE).read_text())
        except ValueError as exc:
            raise UserInputError(
                f"{adapter_dir / CONFIG_FILE} is not valid JSON ({exc}): re-save the adapter"
            ) from None
    else:
        meta = read_meta(adapter_dir)
        if meta is None or not isinstance(meta.get("peft_config"), dict):
            raise UserInputError(
                f"{adapter_dir} is not an adapter directory (no {CONFIG_FILE}): pass the directory 'train' wrote"
            )
        config = meta["peft_config"]
    if not isinstance(config, dict):
        raise UserInputError(f"{adapter_dir / CONFIG_FILE} is not a JSON object: re-save the adapter")
    heads, task, targets = config.get("modules_to_save"), config.get("task_type"), config.get("target_modules")
    if not (
        (heads is None or _is_str_list(heads))
        and (task is None or isinstance(task, str))
        and (targets is None or isinstance(targets, str) or _is_str_list(targets))
    ):
        raise UserInputError(
            f"{adapter_dir / CONFIG_FILE}: modules_to_save, task_type or target_modules has the "
            "wrong type: re-save the adapter"
        )
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserInputError(f"{path} is missing: the adapter directory is incomplete")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UserInputError(f"{path} is not a readable safetensors file ({exc}): re-save the adapter") from None
    _finite(tensors, str(path))
    return tensors


def _targets_from_keys(keys, module_key: str) -> list[str]:
    marker = f".{module_key}."
    names = {k[len(PREFIX) : k.index(marker)] for k in keys if marker in k and k.startswith(PREFIX)}
    return sorted(names)


def _check_peft_file(adapter_dir: Path, meta: dict) -> None:
    """Our loads read our tensors; PEFT reads ``adapter_model.safetensors``. Refuse a directory where that file
    is not the one we wrote (edited, replaced, damaged), since the two would then run different functions."""
    path = adapter_dir / WEIGHTS_FILE
    expected = meta.get("peft_sha256")
    if path.is_file() and expected is not None and file_sha256(path) != expected:
        raise UserInputError(
            f"{path} is not the file psoft-export wrote (its sha256 differs from "
            f"{META_FILE}): PEFT would load another adapter; re-save it (train --resume) or remove it"
        )


class StoredAdapter(NamedTuple):
    """An adapter directory as read, before any layer exists: its config, target module names, tensors (ours or
    PEFT's), the stored PSOFT subspace per target (``None``: recomputed from each weight, as PEFT does) and the
    saved whole modules (``heads``, with their tensors under PEFT keys)."""

    path: Path
    config: MethodConfig
    targets: list[str]
    tensors: dict[str, torch.Tensor]
    ours: bool
    factors: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    heads: list[str]
    head_tensors: dict[str, torch.Tensor]


def read_adapter(adapter_dir: Path, model: nn.Module, model_dir: Optional[Path] = None) -> StoredAdapter:
    """Read and check ``adapter_dir`` against ``model`` (only its module names are used: a meta-device skeleton
    will do) and, when given, ``model_dir``'s weights (one tensor at a time)."""
    from psoft_export.decomposition import Decomposition

    adapter_dir = Path(adapter_dir)
    peft = read_config(adapter_dir)
    cfg = method_config(peft, str(adapter_dir))
    meta = read_meta(adapter_dir)
    if meta is not None:
        _check_peft_file(adapter_dir, meta)
        tensors = _read_tensors(adapter_dir / OURS_FILE)
        targets = list(meta["targets"])
    else:
        tensors = _read_tensors(adapter_dir / WEIGHTS_FILE)
        targets = _targets_from_keys(tensors, MODULE_KEY[peft["peft_type"]])
    if not targets:
        raise UserInputError(f"{adapter_dir} holds no {peft['peft_type']} tensors: the files do not match the config")
    _check_targets_exist(model, targets, adapter_dir)
    factors = None
    if meta is not None and model_dir is not None and meta.get("base_weights"):
        check_weights(
            model_dir,
            meta["base_weights"],
            f"adapter {adapter_dir}",
            "it was trained on another model; pass the base model it was trained on",
        )
    if meta is not None and isinstance(cfg, PsoftConfig):
        decomposition = Decomposition.load(adapter_dir / DECOMPOSITION_DIR)
        if model_dir is not None:
            decomposition.check_source(model_dir)
        factors = decomposition.factors_for(model)
    heads = peft.get("modules_to_save") or []
    head_tensors = _head_source(adapter_dir, tensors if meta is not None else None) if heads else {}
    return StoredAdapter(adapter_dir, cfg, targets, tensors, meta is not None, factors, heads, head_tensors)


def load_adapter(model: nn.Module, adapter_dir: Path, model_dir: Optional[Path] = None) -> dict[str, nn.Module]:
    """Inject the adapter stored in ``adapter_dir`` (ours or PEFT's) into ``model`` and return its layers.

    Our directories load our tensors and the stored subspace (checked against ``model_dir``'s weights when
    given); PEFT's directories are read as PEFT reads them.
    """
    stored = read_adapter(adapter_dir, model, model_dir)
    layers = inject(model, stored.config, stored.targets, stored.factors)
    (_load_ours if stored.ours else _load_peft)(layers, stored.tensors, stored.path)
    if stored.heads:
        _load_heads(model, stored.head_tensors, stored.heads, stored.path)
    return layers


def adapter_layer(stored: StoredAdapter, name: str, base: nn.Module) -> nn.Module:
    """The trained adapter layer of module ``name`` around ``base``, parameters loaded: what :func:`load_adapter`
    injects there, built alone (a streamed export folds one weight at a time with it)."""
    if isinstance(stored.config, PsoftConfig):
        if stored.factors is not None and name not in stored.factors:
            raise UserInputError(
                f"the decomposition has no factors for {name}: re-run decompose with the same --targets"
            )
        factors = stored.factors[name] if stored.factors is not None else None
        layer = PsoftLinear(base, stored.config, factors, name=name)
    else:
        layer = OftLinear(base, stored.config, name=name)
    (_load_ours if stored.ours else _load_peft)({name: layer}, stored.tensors, stored.path)
    return layer


def _head_source(adapter_dir: Path, ours: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Where the saved heads are: our tensor file (adapters from 0.2.0 on), else PEFT's file."""
    adapter_dir = Path(adapter_dir)
    if read_meta(adapter_dir) is not None:
        ours = ours if ours is not None else _read_tensors(adapter_dir / OURS_FILE)
        if any(k.startswith(PREFIX) for k in ours) or not (adapter_dir / WEIGHTS_FILE).is_file():
            return ours
    return _read_tensors(adapter_dir / WEIGHTS_FILE)


def head_tensors(adapter_dir: Path, head: str) -> dict[str, torch.Tensor]:
    """The saved tensors of whole module ``head`` (PEFT keys), e.g. a classifier copied into a LoRA directory."""
    tensors = _head_source(adapter_dir)
    return {
        k: v
        for k, v in tensors.items()
        if k.startswith(PREFIX) and (f".{head}." in k or k.startswith(f"{PREFIX}{head}."))
    }


def saved_labels(adapter_dir: Path) -> int:
    """The number of classes of the saved classification head."""
    for key, value in _head_source(adapter_dir).items():
        if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return value.shape[0]
    raise UserInputError(f"{adapter_dir}: a SEQ_CLS adapter without a saved classifier head cannot be exported")


def load_heads(model: nn.Module, adapter_dir: Path) -> None:
    """Load only the saved whole modules (a classification head) of ``adapter_dir`` into ``model``."""
    adapter_dir = Path(adapter_dir)
    heads = read_config(adapter_dir).get("modules_to_save") or []
    _load_heads(model, _head_source(adapter_dir), heads, adapter_dir)


def _check_targets_exist(model: nn.Module, targets: list[str], adapter_dir: Path) -> None:
    names = dict(model.named_modules())
    missing = [t for t in targets if t not in names]
    if missing:
        raise UserInputError(
            f"adapter {adapter_dir} targets {missing[0]} ({len(missing)} missing), which this model does not have: "
            "it was trained on another architecture"
        )


def _copy(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise UserInputError(
            f"{what} has shape {tuple(value.shape)} but the model needs {tuple(param.shape)}: "
            "the adapter was trained on another model or rank"
        )
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _load_ours(layers: dict[str, nn.Module], tensors: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    for name, layer in layers.items():
        for p_name, param in layer.named_parameters(recurse=False):
            key = f"{name}.{p_name}"
            if key not in tensors:
                raise UserInputError(f"{adapter_dir / OURS_FILE} has no {key}: the adapter directory is incomplete")
            _copy(param, tensors[key], f"{adapter_dir.name}:{key}")


def _load_peft(layers: dict[str, nn.Module], tensors: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    for name, layer in layers.items():
        if isinstance(layer, OftLinear):
            sign = -1.0 if layer.config.cayley == "exact" else 1.0  # PEFT's exact OFT is cayley(-Q)
            _copy(layer.q, sign * tensors[f"{PREFIX}{name}.oft_R.weight"], f"{name}.oft_R.weight")
            continue
        _copy(layer.q, tensors[f"{PREFIX}{name}.psoft_R.weight"], f"{name}.psoft_R.weight")
        for attr in ("vector_a", "vector_b"):
            if getattr(layer, attr) is not None:
                _copy(getattr(layer, attr), tensors[f"{PREFIX}{name}.psoft_R.{attr}"], f"{name}.psoft_R.{attr}")


def head_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], heads: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name in model: its saved state dict}`` of the saved whole modules ``heads`` (a head name matches a
    module of that name or ending in ``.name``); modules with nothing saved are left out."""
    out = {}
    for head in heads:
        for name, _ in model.named_modules():
            if name == head or name.endswith(f".{head}"):
                state = {
                    k[len(PREFIX) + len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{PREFIX}{name}.")
                }
                if state:
                    out[name] = state
    return out


def _load_heads(model: nn.Module, tensors: dict[str, torch.Tensor], heads: list[str], adapter_dir: Path) -> None:
    for name, state in head_state(model, tensors, heads).items():
        try:
            model.get_submodule(name).load_state_dict(state)
        except RuntimeError as exc:
            raise UserInputError(
                f"{adapter_dir}: saved head {name} does not fit this model ({str(exc).splitlines()[0]})"
            ) from None
