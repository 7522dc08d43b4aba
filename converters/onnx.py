"""ONNX export: a merged model for plain serving, or a base with adapter slots for ONNX Runtime's adapter API.

Verbs: ``export_merged`` (a merged HF directory -> ``model.onnx``), ``export_split`` (a base whose chosen layers
read LoRA factors and OFT rotations from overridable inputs), ``write_adapter`` (an ``.onnx_adapter`` file
for those inputs), ``run_logits`` (the runtime call ``verify`` needs) and ``describe`` (a golden record).

Split layout, per target module ``m`` (an HF module name such as ``model.layers.0.self_attn.q_proj``)::

    y = base(x R) + (x @ m.lora_A) @ m.lora_B
    m.lora_A  (in, r)      default (in, 0)   -- symbolic dim "<m>.rank": the base runs unchanged
    m.lora_B  (r, out)     default (0, out)     without an adapter (a K=0 MatMul yields zeros)
    m.oft_R   (n, b, b)    default identity blocks; x R is computed as blocks x_i @ R_i

``R = blockdiag(R_1..R_n)``; merged weight ``W R^T`` in ``nn.Linear`` layout. The LoRA scaling is folded into
``lora_B`` by ``write_adapter``. When a module has both slots and both are active, LoRA reads the unrotated x.

What we learned (optimum-onnx 0.1.0, torch 2.13 TorchScript exporter, onnxruntime 1.32):
- An ``nn.Parameter`` used directly as a MatMul operand keeps its state-dict name as the ONNX initializer
  name (``<module>.lora_A``), so wrapper modules holding ``lora_A``/``lora_B``/``oft_R`` give predictable
  names. Parameters that pass through a folded Transpose become ``onnx::MatMul_<n>`` (the base weights
  do), and the exporter can merge initializers with equal values: the dummies are therefore seeded random
  and we fall back to finding an initializer by value, then rename it.
- The wrapper renames base weights (``<m>.base.weight``); harmless, the ONNX graph does not care.
- optimum registers its ONNX configs only when ``optimum.exporters.onnx.model_configs`` is imported;
  before that ``TasksManager`` claims no model type is supported.
- ``onnx_export_from_model`` validation only logs mismatches, so it is off here (``do_validation=False``)
  and callers compare logits themselves (``run_logits``). Tokenizer files are copied here because
  optimum skips them silently when loading fails.
- float16 on CPU is not simple: llama and bert export and run, but GPT-2's graph mixes float and float16
  inputs to LayerNormalization and ORT refuses to load it; so only float32 is offered.
- BERT loaded as ``BertModel`` warns that the pooler is newly initialized; the feature-extraction graph
  outputs only ``last_hidden_state``, so the pooler is dead code and the warning harmless.
- ``x.unflatten(-1, (-1, b))`` / ``.flatten(-2)`` in the rotation froze the traced sequence length into
  GPT-2's Conv1D reshape (it reads ``x.size()``); reshaping with ``x.shape`` keeps the dims dynamic.
- GPT-2's inputs come as ``input_ids, past_key_values.*, attention_mask, position_ids``: feed by name.
  Past KV inputs have fixed heads/head_dim and symbolic batch/length: empty past = length 0.
- optimum computes ``position_ids = cumsum(mask) - 1`` (1 where masked); transformers 4.57 uses
  ``arange`` when none are given, so compare padded batches with explicit ``position_ids``.
- The exported graph carries no ``value_info``; we still clear it after editing so no stale shape with the
  dummy rank can reach ORT's shape inference.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from psoft_export import models
from psoft_export.adapters.layout import features, is_linear
from psoft_export.errors import PsoftExportError, UserInputError

OPSET = 18
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx_data"
ADAPTER_SUFFIX = ".onnx_adapter"
TRACE_RANK = 2  # rank of the dummy LoRA factors used while tracing; replaced by a symbolic dim afterwards

_DECODER = "text-generation-with-past"
_ENCODER = "feature-extraction"
DEFAULT_TASKS = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gpt2": _DECODER,
    "bert": _ENCODER,
    "roberta": _ENCODER,
}
CLASSIFIER_SUFFIX = "ForSequenceClassification"
DTYPES = {"float32": torch.float32}
MAIN_OUTPUTS = ("logits", "last_hidden_state")
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


# ----------------------------------------------------------------------------------------------- tasks, loading
def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserInputError(f"{model_dir} has no config.json; pass a Hugging Face model directory")
    return json.loads(path.read_text())


def resolve_task(config: dict, task: str | None = None) -> str:
    """The optimum task for ``config``: decoders with KV cache, encoders as features or a classifier."""
    model_type = config.get("model_type")
    if model_type not in DEFAULT_TASKS:
        raise UserInputError(
            f"model type {model_type!r} is not supported for ONNX export; supported: {', '.join(DEFAULT_TASKS)}"
        )
    if task is None:
        classifier = any(a.endswith(CLASSIFIER_SUFFIX) for a in config.get("architectures") or ())
        return "text-classification" if classifier else DEFAULT_TASKS[model_type]
    supported = _optimum_tasks(model_type)
    if task not in supported:
        raise UserInputError(f"task {task!r} is not available for {model_type}; choose one of {', '.join(supported)}")
    return task


def _optimum_tasks(model_type: str) -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return list(TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers"))


def too_big_for_post_process(model: nn.Module) -> bool:
    """optimum's post-processing (dropping the duplicate of tied weights) re-serializes the whole model as one
    protobuf, which cannot pass 2 GB: it fails there ("Failed to serialize proto", measured on a 1B Llama with tied
    embeddings, 4.3 GB in float32), so beyond that it is skipped and the tied embedding is stored twice."""
    seen, size = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            size += p.numel() * p.element_size()
    return size >= onnx.checker.MAXIMUM_PROTOBUF


def _export(model: nn.Module, model_dir: Path, out_dir: Path, task: str) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # transformers' data-dependent branches, expected
        # transformers' mask code indexes with non-negative indices only; every export is verified numerically
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        onnx_export_from_model(
            model, out_dir, opset=OPSET, task=task, do_validation=False, no_post_process=too_big_for_post_process(model)
        )
    for name in SIDE_FILES:  # ours, not optimum's: it skips the tokenizer silently when loading fails
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, out_dir / name)


def export_merged(model_dir: Path, out_dir: Path, task: str | None = None, dtype: str = "float32") -> dict:
    """Export a plain (already merged) HF model directory to ``out_dir/model.onnx`` plus config and tokenizer."""
    if dtype not in DTYPES:
        raise UserInputError(f"dtype {dtype!r} is not supported for ONNX export; use {', '.join(DTYPES)}")
    config = read_config(model_dir)
    task = resolve_task(config, task)
    out_dir = Path(out_dir)
    _export(models.load_for_task(Path(model_dir), task, DTYPES[dtype]), Path(model_dir), out_dir, task)
    return {
        "path": str(out_dir / MODEL_FILE),
        "model_type": config["model_type"],
        "task": task,
        "opset": OPSET,
        "dtype": dtype,
    }


# ------------------------------------------------------------------------------------------------ split export
class Slot(NamedTuple):
    """One overridable input: its ONNX name, the traced parameter's name and dummy value, its default, dims."""

    name: str
    traced: str
    dummy: np.ndarray
    default: np.ndarray
    dims: list


class SplitLinear(nn.Module):
    """``y = base(x R) + (x A) B`` with ``A`` (in, r), ``B`` (r, out), ``R`` (n, b, b): the traced form.

    The parameters hold seeded random dummies (so tracing keeps them as distinct initializers);
    ``export_split`` replaces them with graph inputs after export.
    """

    def __init__(self, base: nn.Module, rank: int, block: int, generator: torch.Generator):
        super().__init__()
        out_f, in_f = features(base)
        self.base, self.block = base, block
        if rank:
            self.lora_A = nn.Parameter(torch.randn(in_f, rank, generator=generator))
            self.lora_B = nn.Parameter(torch.randn(rank, out_f, generator=generator))
        if block:
            self.oft_R = nn.Parameter(torch.randn(in_f // block, block, block, generator=generator))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` block by block: ``(..., n, 1, b) @ (n, b, b)``.

        Shapes are read from ``x.shape`` so tracing records them as dynamic (``unflatten``/``flatten`` froze
        the traced sequence length into GPT-2's following reshape).
        """
        blocks = x.reshape(*x.shape[:-1], self.oft_R.shape[0], 1, self.block)
        return (blocks @ self.oft_R).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(self.rotate(x) if self.block else x)
        return y + (x @ self.lora_A) @ self.lora_B if hasattr(self, "lora_A") else y


def _resolve_module(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The module called ``name``, also accepting names with the base-model prefix (``bert.``) of a head model."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for candidate in (name, name.removeprefix(prefix)):
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    example = next((n for n, m in model.named_modules() if is_linear(m)), "model.layers.0.self_attn.q_proj")
    raise UserInputError(f"no module named {name!r} in this model; pass HF module names such as {example!r}")


def _check_block(name: str, in_f: int, block: int) -> None:
    if not isinstance(block, int) or block <= 0 or in_f % block:
        raise UserInputError(
            f"OFT block size {block!r} does not divide in_features {in_f} of {name}; pick a divisor of {in_f}"
        )


def _slots(name: str, traced: str, module: SplitLinear) -> list[Slot]:
    """The overridable inputs of one wrapper: ONNX name, traced name, dummy, default and (symbolic) dims."""
    (out_f, in_f), b, rank = features(module.base), module.block, f"{name}.rank"
    defaults = {
        "lora_A": lambda: (np.zeros((in_f, 0), np.float32), [in_f, rank]),
        "lora_B": lambda: (np.zeros((0, out_f), np.float32), [rank, out_f]),
        "oft_R": lambda: (np.tile(np.eye(b, dtype=np.float32), (in_f // b, 1, 1)), [in_f // b, b, b]),
    }
    return [
        Slot(f"{name}.{p}", f"{traced}.{p}", param.detach().numpy().copy(), *defaults[p]())
        for p, param in module.named_parameters(recurse=False)
    ]


def wrap_targets(model: nn.Module, lora_targets: Sequence[str], oft_targets: Mapping[str, int]) -> list[Slot]:
    """Replace each target by a ``SplitLinear`` in place; return the overridable inputs it will need."""
    generator, slots = torch.Generator().manual_seed(0), []
    for name in dict.fromkeys([*lora_targets, *oft_targets]):
        traced, base = _resolve_module(model, name)
        if not is_linear(base):
            raise UserInputError(f"{name} is a {type(base).__name__}, not a linear layer; target Linear/Conv1D modules")
        block = oft_targets.get(name, 0)
        if name in oft_targets:
            _check_block(name, features(base)[1], block)
        wrapper = SplitLinear(base, TRACE_RANK if name in lora_targets else 0, block, generator)
        parent, _, child = traced.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapper)
        slots += _slots(name, traced, wrapper)
    return slots


def _find_initializer(graph: onnx.GraphProto, slot: Slot) -> onnx.TensorProto:
    """The initializer traced from ``slot``'s parameter: by name, else by value (then renamed everywhere)."""
    by_name = {init.name: init for init in graph.initializer}
    if slot.traced in by_name:
        return by_name[slot.traced]
    for init in graph.initializer:
        if tuple(init.dims) == slot.dummy.shape and np.array_equal(numpy_helper.to_array(init), slot.dummy):
            return init
    raise PsoftExportError(f"the exporter dropped parameter {slot.traced}; report this with the model type")


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]


def make_overridable(onnx_path: Path, slots: Sequence[Slot]) -> None:
    """Turn each slot's initializer into a graph input with a default (an ORT overridable initializer)."""
    external = (onnx_path.parent / EXTERNAL_DATA).is_file()
    model = onnx.load(str(onnx_path))
    graph = model.graph
    for slot in slots:
        init = _find_initializer(graph, slot)
        _rename_uses(graph, init.name, slot.name)
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(slot.default, slot.name))
        graph.input.append(helper.make_tensor_value_info(slot.name, TensorProto.FLOAT, slot.dims))
    del graph.value_info[:]  # intermediate shapes may still carry the dummy rank
    _save(model, onnx_path, external)


def _save(model: onnx.ModelProto, onnx_path: Path, external: bool) -> None:
    if not external:
        onnx.save(model, str(onnx_path))
        return
    (onnx_path.parent / EXTERNAL_DATA).unlink()
    onnx.save(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA)


def export_split(
    model_dir: Path,
    out_dir: Path,
    lora_targets: Sequence[str] = (),
    oft_targets: Mapping[str, int] | None = None,
    task: str | None = None,
) -> dict:
    """Export the base with LoRA slots on ``lora_targets`` and OFT rotation slots (block size) on ``oft_targets``."""
    oft_targets = dict(oft_targets or {})
    if not lora_targets and not oft_targets:
        raise UserInputError("export_split needs lora_targets or oft_targets; use export_merged for a plain model")
    config = read_config(model_dir)
    task = resolve_task(config, task)
    model = models.load_for_task(Path(model_dir), task)
    slots = wrap_targets(model, lora_targets, oft_targets)
    out_dir = Path(out_dir)
    _export(model, Path(model_dir), out_dir, task)
    make_overridable(out_dir / MODEL_FILE, slots)
    return {
        "path": str(out_dir / MODEL_FILE),
        "model_type": config["model_type"],
        "task": task,
        "opset": OPSET,
        "overridable": {s.name: s.dims for s in slots},
    }


# ---------------------------------------------------------------------------------------------------- adapters
def _as_array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())


def _lora_params(module: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
    """PEFT layout ``A`` (r, in), ``B`` (out, r) -> MatMul layout ``lora_A`` (in, r), ``lora_B`` (r, out)."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise UserInputError(
            f"LoRA for {module}: A {tuple(A.shape)} and B {tuple(B.shape)} must be (r, in) and (out, r)"
        )
    return {f"{module}.lora_A": _as_array(A.T), f"{module}.lora_B": _as_array(scale * B.T)}


def _oft_params(module: str, R: torch.Tensor) -> dict[str, np.ndarray]:
    if R.ndim != 3 or R.shape[1] != R.shape[2]:
        raise UserInputError(f"OFT rotation for {module} has shape {tuple(R.shape)}; expected blocks (n, b, b)")
    return {f"{module}.oft_R": _as_array(R)}


def _scale(scaling: float | Mapping[str, float], module: str) -> float:
    if not isinstance(scaling, Mapping):
        return float(scaling)
    if module not in scaling:
        raise UserInputError(f"scaling has no entry for {module}; give one per LoRA module or a single float")
    return float(scaling[module])


def write_adapter(
    path: Path,
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    scaling: float | Mapping[str, float] = 1.0,
    oft: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Write an ``.onnx_adapter`` for a model from ``export_split``: scaled LoRA factors and OFT blocks."""
    params: dict[str, np.ndarray] = {}
    for module, (A, B) in (lora or {}).items():
        params.update(_lora_params(module, A, B, _scale(scaling, module)))
    for module, R in (oft or {}).items():
        params.update(_oft_params(module, R))
    if not params:
        raise UserInputError("write_adapter got no tensors; pass lora={module: (A, B)} or oft={module: R}")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(path))
    return {"path": str(path), "parameters": {k: list(v.shape) for k, v in params.items()}}


# ------------------------------------------------------------------------------------------------------ runtime
def open_session(onnx_dir: Path) -> ort.InferenceSession:
    path = Path(onnx_dir) / MODEL_FILE
    if not path.is_file():
        raise UserInputError(f"{onnx_dir} has no {MODEL_FILE}; pass a directory written by export_merged/export_split")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # every overridable initializer triggers a "not treated as constant" warning
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _position_ids(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """optimum's convention: count real tokens from 0, padding positions get 1."""
    return np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1).astype(np.int64)


def _past(arg: ort.NodeArg, batch: int) -> np.ndarray:
    shape = [batch] + [d if isinstance(d, int) else 0 for d in arg.shape[1:]]
    return np.zeros(shape, ORT_NUMPY[arg.type])


FEEDS = {
    "input_ids": lambda ids, mask, arg: ids,
    "attention_mask": lambda ids, mask, arg: mask,
    "token_type_ids": lambda ids, mask, arg: np.zeros_like(ids),
    "position_ids": lambda ids, mask, arg: _position_ids(ids, mask),
}


def _feed(arg: ort.NodeArg, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if arg.name.startswith("past_key_values."):
        return _past(arg, ids.shape[0])
    if arg.name not in FEEDS:
        raise UserInputError(f"{MODEL_FILE} needs input {arg.name!r}, which run_logits cannot build")
    return FEEDS[arg.name](ids, mask, arg)


def run_logits(
    onnx_dir: Path,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    adapter_path: Path | None = None,
    session: ort.InferenceSession | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model.onnx`` once (empty KV cache) and return its main outputs (``logits`` / ``last_hidden_state``).

    ``session`` reuses an ``open_session`` result, e.g. to switch adapters on one session.
    """
    session = session or open_session(onnx_dir)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    feeds = {arg.name: _feed(arg, ids, mask) for arg in session.get_inputs()}
    options, adapter = ort.RunOptions(), None
    if adapter_path is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_path))
        options.add_active_adapter(adapter)
    names = [o.name for o in session.get_outputs() if o.name in MAIN_OUTPUTS]
    return dict(zip(names, session.run(names, feeds, options)))


# ----------------------------------------------------------------------------------------------------- describe
def _dims(shape: onnx.TensorShapeProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in shape.dim]


def _value_info(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    return {"name": v.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(), "shape": _dims(t.shape)}


def describe_adapter(path: Path) -> dict:
    fmt = ort.AdapterFormat.read_adapter(str(path))
    params = fmt.get_parameters()
    return {
        "adapter_version": fmt.get_adapter_version(),
        "model_version": fmt.get_model_version(),
        "parameters": {k: {"shape": list(v.shape()), "dtype": v.data_type()} for k, v in sorted(params.items())},
    }


def describe(onnx_dir: Path) -> dict:
    """A JSON-ready record of ``model.onnx`` (opset, inputs, outputs, overridable initializers) and its adapters.

    Given an ``.onnx_adapter`` file instead of a directory, describes that file.
    """
    onnx_dir = Path(onnx_dir)
    if onnx_dir.suffix == ADAPTER_SUFFIX:
        return describe_adapter(onnx_dir)
    model = onnx.load(str(onnx_dir / MODEL_FILE), load_external_data=False)
    defaults = {init.name: list(init.dims) for init in model.graph.initializer}
    inputs = [_value_info(v) for v in model.graph.input]
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [v for v in inputs if v["name"] not in defaults],
        "outputs": [_value_info(v) for v in model.graph.output],
        "overridable": [{**v, "default_shape": defaults[v["name"]]} for v in inputs if v["name"] in defaults],
        "adapters": {p.name: describe_adapter(p) for p in sorted(onnx_dir.glob(f"*{ADAPTER_SUFFIX}"))},
    }


# ------------------------------------------------------------------------------------------ the format interface
# (converters/__init__.py): merged and split exports of a model held in memory, and the export run in ONNX Runtime.


def write_merged(job, out: Path) -> list[str]:
    """optimum's export of the merged model, from its float32 HF directory (``safetensors.merged_scratch``)."""
    from converters.safetensors import merged_scratch

    with merged_scratch(job, out) as scratch:
        export_merged(scratch, out)
    return sorted(p.name for p in out.iterdir())


def write_split(job, out: Path) -> tuple[list[str], dict]:
    """The base graph with adapter inputs and ``adapter.onnx_adapter``: OFT's rotation blocks as they are, PSOFT's
    (and ``--lora-rank`` OFT's) LoRA form."""
    from psoft_export.adapters import OftLinear, adapter_layers
    from psoft_export.adapters.lora import lora_form

    layers = adapter_layers(job.model)
    if any(isinstance(layer, OftLinear) for layer in layers.values()) and job.lora_rank is None:
        export_split(job.model_dir, out, oft_targets={n: layer.block_size for n, layer in layers.items()})
        with torch.no_grad():
            rotations = {n: l.rotation_blocks().expand(l.num_blocks, -1, -1).float() for n, l in layers.items()}
        write_adapter(out / "adapter.onnx_adapter", oft=rotations)
        return sorted(p.name for p in out.iterdir()), {}
    factors, alpha, errors = lora_form(job.model, job.lora_rank)
    export_split(job.model_dir, out, lora_targets=list(factors))
    rank = next(iter(factors.values()))[0].shape[0]
    write_adapter(out / "adapter.onnx_adapter", lora=factors, scaling=alpha / rank)
    return sorted(p.name for p in out.iterdir()), errors


def run(export_dir: Path, info: dict, inputs, kind: str, model_dir: Path) -> dict:
    adapter = export_dir / "adapter.onnx_adapter" if info["split"] else None
    out = run_logits(export_dir, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), adapter)
    return {"": next(iter(out.values()))}
