"""Decompositions: the principal subspace of every target weight, computed once, stored, and read back.

The library side of ``psoft-export decompose`` (whose table and warnings live in :mod:`psoft_export.decompose`),
used by ``train`` when it decomposes for itself and by every reader of stored factors (:class:`Decomposition`).
Streams weights tensor by tensor from the safetensors files (the model is never built: a meta-device skeleton
gives names and layer types), so peak memory is the largest target weight plus its factors.
Output: ``decomposition.safetensors`` (``<module>.A``, ``<module>.B``, ``<module>.S``) and ``manifest.json``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from psoft_export import __version__
from psoft_export.adapters.layout import is_fan_in_fan_out
from psoft_export.adapters.surgery import Targets, select_targets
from psoft_export.atomic import atomic_output_dir, check_output_dir
from psoft_export.checkpoint import (
    ModelSource,
    check_config_sizes,
    check_weights,
    file_sha256,
    prefix_variants,
    sha256_of,
    skeleton,
    unmap_freed_tensors,
)
from psoft_export.defaults import DEFAULT_NITER, DEFAULT_OVERSAMPLE
from psoft_export.errors import UserInputError
from psoft_export.plots import plot_spectra
from psoft_export.subspace import (
    INITS,
    SVD_BACKENDS,
    Subspace,
    check_rank,
    principal_subspace,
    psoft_factors,
    scipy_threads,
)

FACTORS_FILE = "decomposition.safetensors"
MANIFEST_FILE = "manifest.json"
PLOT_FILE = "spectra.png"
FORMAT = "psoft-export/decomposition/1"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class Decomposition:
    """A stored decomposition: the manifest and, on demand, the factors."""

    path: Path
    manifest: dict
    _factors: Optional[dict] = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> "Decomposition":
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            raise UserInputError(
                f"{path} is not a decomposition directory (no {MANIFEST_FILE}): run decompose"
            ) from None
        except ValueError as exc:
            raise UserInputError(f"{path / MANIFEST_FILE} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise UserInputError(f"{path} has format {found!r}, expected {FORMAT}: re-run decompose")
        _check_manifest(path, manifest)
        return cls(path, manifest)

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])

    def factors(self, device: str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A (r, in), B (out, r))}`` ready for :func:`psoft_export.adapters.inject`; the file must be
        the one ``decompose`` wrote (sha256 in the manifest), complete and finite."""
        if self._factors is None:
            path = self.path / FACTORS_FILE
            expected = self.manifest.get("factors_sha256")
            if not path.is_file():
                raise UserInputError(f"{path} is missing: the decomposition is incomplete; re-run decompose")
            if expected is not None and file_sha256(path) != expected:
                raise UserInputError(
                    f"{path} is not the file decompose wrote (its sha256 differs from the manifest): "
                    "the factors were edited or damaged; re-run decompose"
                )
            try:
                self._factors = load_file(path, device=device)
            except Exception as exc:  # safetensors raises several types for a damaged file
                raise UserInputError(f"{path} is not a readable safetensors file ({exc}): re-run decompose") from None
        missing = [f"{n}.{p}" for n in self.targets for p in ("A", "B") if f"{n}.{p}" not in self._factors]
        if missing:
            raise UserInputError(
                f"{self.path / FACTORS_FILE} has no {missing[0]} ({len(missing)} missing): "
                "the decomposition is incomplete; re-run decompose"
            )
        for key, t in self._factors.items():
            if not bool(torch.isfinite(t).all()):
                raise UserInputError(f"{self.path / FACTORS_FILE}: {key} holds NaN or Inf values: re-run decompose")
        return {n: (self._factors[f"{n}.A"], self._factors[f"{n}.B"]) for n in self.targets}

    def aligned(self, model: nn.Module) -> dict[str, str]:
        """``{module name in model: target name here}``. ``decompose`` names modules after the checkpoint's
        architecture (``BertModel``: ``encoder.layer.0...``), a task model built on it adds its
        ``base_model_prefix`` (``bert.encoder.layer.0...``): both namings match."""
        names = set(dict(model.named_modules()))
        prefix = getattr(model, "base_model_prefix", "") or ""
        out = {}
        for target in self.targets:
            for name in prefix_variants(target, prefix):
                if name in names:
                    out[name] = target
                    break
        return out

    def factors_for(self, model: nn.Module, device: str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`factors` keyed by ``model``'s module names (see :meth:`aligned`)."""
        factors = self.factors(device)
        return {name: factors[target] for name, target in self.aligned(model).items()}

    def check_source(self, model_dir: str | Path) -> None:
        """Refuse a model whose target weights are not the ones this decomposition was computed from."""
        check_weights(
            model_dir, self.manifest["targets"], f"decomposition {self.path}", "re-run decompose on this model"
        )


def _check_manifest(path: Path, m: dict) -> None:
    """The fields the readers rely on, with their types: a garbled manifest is one line, not a KeyError."""
    targets = m.get("targets")
    ok = (
        isinstance(m.get("rank"), int)
        and not isinstance(m.get("rank"), bool)
        and m["rank"] > 0
        and isinstance(m.get("alpha"), (int, float))
        and math.isfinite(m["alpha"])
        and m["alpha"] > 0
        and isinstance(targets, dict)
        and targets
        and all(
            isinstance(t, dict) and isinstance(t.get("key"), str) and isinstance(t.get("sha256"), str)
            for t in targets.values()
        )
    )
    if not ok:
        raise UserInputError(
            f"{path / MANIFEST_FILE} is incomplete or damaged (rank, alpha or targets missing or of "
            "the wrong type): re-run decompose"
        )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda was given but no CUDA device is available: use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserInputError(f"unknown device {device!r}: choose auto, cpu or cuda")
    return device


def target_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``: the name with its layer index dropped."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1 :]) if idx and idx[-1] + 1 < len(parts) else parts[-1]


def plan(model_dir: Path, rank: int, targets: Targets) -> tuple[ModelSource, list[tuple[str, str, bool]]]:
    """Validate everything before any SVD: ``[(module, checkpoint key, fan_in_fan_out)]``."""
    source = ModelSource(model_dir)
    check_config_sizes(model_dir, source)
    model = skeleton(model_dir)
    prefix = getattr(model, "base_model_prefix", "")
    jobs = []
    for name in select_targets(model, targets):
        key = source.resolve(name, prefix)
        dtype = source.dtype(key)
        if dtype not in FLOAT_DTYPES:
            raise UserInputError(
                f"{key} has dtype {dtype}, not floating point: decompose needs float weights "
                "(dequantize the model first)"
            )
        shape = source.shape(key)
        if len(shape) != 2:
            raise UserInputError(f"{key} has shape {shape}, expected a 2-D weight")
        fifo = is_fan_in_fan_out(model.get_submodule(name))
        out_f, in_f = (shape[1], shape[0]) if fifo else shape
        check_rank(rank, out_f, in_f, name)
        jobs.append((name, key, fifo))
    return source, jobs


def decompose(
    model_dir: str | Path,
    out_dir: str | Path,
    rank: int,
    *,
    targets: Targets = "all-linear",
    svd: str = "exact",
    niter: int = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    init: str = "psoft",
    alpha: Optional[float] = None,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    plot: bool = True,
    progress: Optional[Callable] = None,
) -> Decomposition:
    """Compute and store the rank-``rank`` principal subspace of each target weight of ``model_dir``.

    ``svd="exact"`` (default, :func:`psoft_export.subspace.gram_subspace`) takes the float32 Gram matrix's
    ``eigh`` and refines it in float64 until a computed bound puts it within 1e-7 rad of the exact subspace; on
    CPU the weight is read a band at a time from its file, never whole. ``svd="full"`` is ``torch.linalg.svd`` in
    float32 (PEFT's default); ``svd="lowrank"`` runs ``torch.svd_lowrank`` with ``q = rank + oversample`` columns
    and ``niter`` power iterations (``oversample=0, niter=10`` reproduces PEFT's ``psoft_svd="lowrank"`` bit for
    bit). ``alpha`` defaults to ``rank`` (``s = 1``). ``progress`` wraps the iterable of targets (e.g. ``tqdm``).
    """
    model_dir = Path(model_dir)
    if not isinstance(rank, int) or rank <= 0:
        raise UserInputError(f"--rank must be a positive integer, got {rank}")
    if svd not in SVD_BACKENDS:
        raise UserInputError(f"unknown --svd {svd!r}: choose one of {', '.join(SVD_BACKENDS)}")
    if init not in INITS:
        raise UserInputError(f"unknown --init {init!r}: choose one of {', '.join(INITS)}")
    if niter < 0 or oversample < 0:
        raise UserInputError("--niter and --oversample must be >= 0")
    alpha = float(rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise UserInputError(f"--alpha must be a finite number > 0, got {alpha}")
    device = resolve_device(device)
    source, jobs = plan(model_dir, rank, targets)
    check_output_dir(Path(out_dir), overwrite, inputs=[model_dir])

    unmap_freed_tensors()  # each weight's working set is returned to the system before the next one
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    start = time.perf_counter()
    for name, key, fifo in progress(jobs) if progress else jobs:
        if svd == "exact" and device == "cpu":
            # Never loaded whole: hashed, checked and decomposed a slab at a time from the file, so the peak is
            # the Gram matrix's eigendecomposition, not the weight (docs/benchmarks.md, issue 11).
            weight = source.matrix(key)
            with scipy_threads():  # between two weights' SciPy work: see scipy_threads
                digest, finite, frob2 = weight.stats()
        else:
            weight = source.tensor(key, device=device)
            digest, finite, frob2 = sha256_of(weight), bool(torch.isfinite(weight).all()), squared_norm(weight)
        if not finite:
            raise UserInputError(f"{key} holds NaN or Inf values: the checkpoint is damaged; re-download or re-save it")
        W = weight.T if fifo else weight
        del weight
        sub = _subspace(W, rank, svd, niter, oversample, seed)
        del W
        A, B = psoft_factors(_truncate(sub, rank), alpha / rank, init)
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A.cpu().contiguous(), B.cpu().contiguous()
        spectrum = sub.spectrum if sub.spectrum is not None else sub.S
        tensors[f"{name}.S"] = spectrum.cpu().contiguous()
        kept = float(spectrum[:rank].double().square().sum())
        records[name] = {
            "key": key,
            "file": source.file(key),
            "sha256": digest,
            "dtype": source.dtype(key),
            "shape": [B.shape[0], A.shape[1]],
            "fan_in_fan_out": fifo,
            "energy": kept / frob2 if frob2 > 0 else 1.0,
            **conditioning(spectrum, rank),
            "angle_bound": sub.angle_bound,
        }
    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "source_model": str(model_dir.absolute()),
        "rank": rank,
        "alpha": alpha,
        "init": init,
        "svd": svd,
        "niter": niter,
        "oversample": oversample,
        "seed": seed,
        "device": device,
        "seconds": round(seconds, 3),
        "targets": records,
        "kinds": summarize(records),
        "ill_posed": ill_posed(records),
        "versions": _versions(),
    }
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite, inputs=[model_dir], command="decompose") as tmp:
        save_file(tensors, tmp / FACTORS_FILE, metadata={"format": FORMAT, "rank": str(rank)})
        manifest["factors_sha256"] = file_sha256(tmp / FACTORS_FILE)  # edited factors are refused at load
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if plot:
            plot_spectra(tensors, records, rank, tmp / PLOT_FILE, target_kind)
    return Decomposition(out_dir, manifest)


def _subspace(W: torch.Tensor, rank: int, svd: str, niter: int, oversample: int, seed: int) -> Subspace:
    if svd in ("exact", "full"):
        return principal_subspace(W, rank, svd=svd)
    q = min(rank + oversample, *W.shape)
    return principal_subspace(W, q, svd="lowrank", niter=niter, seed=seed)


# Where a float32 SVD (PEFT's) may land this far (rad) from the exact subspace, another machine's SVD gives
# another subspace: the target is flagged as ill-posed.
ILL_POSED_ANGLE = 1e-3
EPS32 = float(torch.finfo(torch.float32).eps)


def conditioning(spectrum: torch.Tensor, rank: int) -> dict:
    """``gap`` = ``s_r / s_{r+1}`` and ``f32_angle``, the predicted largest principal angle between the exact
    subspace and a float32 SVD's (``eps32 * s_1 / (s_r - s_{r+1})``, the Davis-Kahan bound for rounding
    errors of size ``eps32 * s_1``). ``None`` where ``s_{r+1}`` is not known (randomized SVD at q = r)."""
    S = spectrum.double()
    if S.numel() <= rank:
        return {"gap": None, "f32_angle": None}
    gap_abs = float(S[rank - 1] - S[rank])
    gap = float(S[rank - 1] / S[rank]) if float(S[rank]) > 0 else float("inf")
    angle = min(math.pi / 2, EPS32 * float(S[0]) / gap_abs) if gap_abs > 0 else math.pi / 2
    return {"gap": gap, "f32_angle": angle}


def ill_posed(records: dict[str, dict]) -> list[str]:
    """Targets whose subspace a float32 SVD elsewhere (PEFT's at load time) would not reproduce."""
    return [n for n, r in records.items() if r.get("f32_angle") is not None and r["f32_angle"] > ILL_POSED_ANGLE]


def squared_norm(W: torch.Tensor, chunk: int = 1 << 20) -> float:
    """``||W||_F^2`` accumulated in float64, a chunk at a time (no float64 copy of a big weight)."""
    flat = W.reshape(-1) if W.is_contiguous() else W.T.reshape(-1)
    return sum(float(c.double().square().sum()) for c in flat.split(chunk))


def _truncate(sub: Subspace, rank: int) -> Subspace:
    return Subspace(sub.U[:, :rank].contiguous(), sub.S[:rank].contiguous(), sub.Vh[:rank].contiguous())


def summarize(records: dict[str, dict]) -> dict[str, dict]:
    """Per target kind: count, shapes, mean and min fraction of spectral energy kept."""
    kinds: dict[str, dict] = {}
    for name, rec in records.items():
        k = kinds.setdefault(target_kind(name), {"count": 0, "shapes": [], "energies": []})
        k["count"] += 1
        if rec["shape"] not in k["shapes"]:
            k["shapes"].append(rec["shape"])
        k["energies"].append(rec["energy"])
        if rec.get("gap") is not None:
            k.setdefault("gaps", []).append(rec["gap"])
    return {
        kind: {
            "count": k["count"],
            "shapes": k["shapes"],
            "energy_mean": sum(k["energies"]) / k["count"],
            "energy_min": min(k["energies"]),
            "gap_min": min(k["gaps"]) if k.get("gaps") else None,
        }
        for kind, k in kinds.items()
    }


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "psoft_export": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
