"""``psoft-export verify``: run an export in its own runtime and compare it with the PyTorch model plus adapter.

Every export directory carries ``export.json`` saying what it is (format, merged or split, dtype). The reference
is the base model with the adapter loaded by our loader, in float32 on CPU; the export runs in transformers,
ONNX Runtime or llama.cpp. Errors are relative to the output scale: ``max |export - ref| / max |ref|`` over the
real (unpadded) positions. ``merge`` calls the same :func:`verify_export` before it renames its output into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from psoft_export import adapter_io
from psoft_export.checkpoint import load_tokenizer, loading_kwargs
from psoft_export.errors import UserInputError, VerificationError

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "psoft-export/export/1"
DEFAULT_TEXTS = [
    "The red fox lives in the north forest and eats berries.",
    "A small grey owl sleeps.",
    "Q: What is three plus seven? A: ten.",
]
# Relative error bars per (format, dtype), float32 against float32 PyTorch unless said otherwise.
TOLERANCES = {
    ("safetensors", "float32"): 1e-4, ("safetensors", "float16"): 1e-2, ("safetensors", "bfloat16"): 6e-2,
    ("onnx", "float32"): 1e-4,
    ("gguf", "float32"): 2e-3, ("gguf", "float16"): 2e-3, ("gguf", "q8_0"): 3e-2,  # measured 4e-7 / 7e-4 / 1.7e-2
}


@dataclass
class Report:
    """Per-output errors of one export against the reference; ``ok`` when every error is within ``tolerance``."""

    export: str
    tolerance: float
    outputs: dict[str, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o["rel_err"] <= self.tolerance for o in self.outputs.values())

    def add(self, name: str, got: np.ndarray, ref: np.ndarray) -> None:
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        if got.shape != ref.shape:
            raise VerificationError(f"{self.export}: output {name} has shape {got.shape}, expected {ref.shape}")
        diff = np.abs(got - ref)
        scale = max(float(np.abs(ref).max()), 1e-30)
        self.outputs[name] = {"max_abs_err": float(diff.max()), "rel_err": float(diff.max() / scale)}

    def to_dict(self) -> dict:
        return {"export": self.export, "tolerance": self.tolerance, "ok": self.ok, "outputs": self.outputs}

    def lines(self) -> list[str]:
        return [f"{name}: max abs err {o['max_abs_err']:.3e}, rel err {o['rel_err']:.3e} "
                f"(tolerance {self.tolerance:.0e}) {'ok' if o['rel_err'] <= self.tolerance else 'FAIL'}"
                for name, o in self.outputs.items()]


# ------------------------------------------------------------------------------------------ the reference

def model_kind(model_dir: Path, adapter_dir: Path) -> tuple[str, Optional[list]]:
    """``causal``, ``classify`` or ``encoder`` and the class list, from the adapter and the model config."""
    from psoft_export.checkpoint import load_config

    meta = adapter_io.read_meta(adapter_dir)
    if meta is not None:
        return meta["task"] if meta["task"] != "completion" else "causal", meta.get("classes")
    peft = adapter_io.read_config(adapter_dir)
    if peft.get("task_type") == "SEQ_CLS":
        return "classify", None
    config = load_config(model_dir)
    from psoft_export.train import ENCODERS

    return ("encoder" if config.model_type in ENCODERS else "causal"), None


def load_base(model_dir: Path, kind: str, classes: Optional[list], adapter_dir: Optional[Path] = None,
              allow_pickle: bool = False) -> nn.Module:
    """The float32 base model of ``kind`` (a classifier sized by the adapter's classes or saved head)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" warning: the adapter supplies it
    safe = loading_kwargs(model_dir, allow_pickle)
    if kind == "classify":
        labels = len(classes) if classes else adapter_io.saved_labels(adapter_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=labels, dtype=torch.float32, **safe)
        _name_classes(model, classes)
    elif kind == "encoder":
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, **safe)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **safe)
    return model.eval()


def _name_classes(model: nn.Module, classes: Optional[list]) -> None:
    if classes:
        model.config.id2label = {i: str(c) for i, c in enumerate(classes)}
        model.config.label2id = {str(c): i for i, c in enumerate(classes)}


def base_skeleton(model_dir: Path, kind: str, classes: Optional[list], adapter_dir: Optional[Path] = None) -> nn.Module:
    """:func:`load_base`'s model on the meta device: the same class, config and generation config, no weights
    (module names, shapes and tied parameters for a streamed export)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers import GenerationConfig

    from psoft_export.checkpoint import load_config

    load_config(model_dir)  # a damaged config.json is one line
    extra = {"num_labels": len(classes) if classes else adapter_io.saved_labels(adapter_dir)} if kind == "classify" else {}
    config = AutoConfig.from_pretrained(model_dir, **extra)
    auto = {"classify": AutoModelForSequenceClassification, "encoder": AutoModel}.get(kind, AutoModelForCausalLM)
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.float32)
    _name_classes(model, classes if kind == "classify" else None)
    if model.can_generate() and (Path(model_dir) / "generation_config.json").is_file():  # as from_pretrained does
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def reference_model(model_dir: Path, adapter_dir: Path, allow_pickle: bool = False) -> tuple[nn.Module, str, Optional[list]]:
    """The base with the adapter (our loader), its kind and classes: what every export is compared with."""
    kind, classes = model_kind(model_dir, adapter_dir)
    model = load_base(model_dir, kind, classes, adapter_dir, allow_pickle)
    adapter_io.load_adapter(model, adapter_dir, model_dir)
    return model.eval(), kind, classes


def fixed_inputs(model_dir: Path, texts: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return dict(tok(texts or DEFAULT_TEXTS, return_tensors="pt", padding=True))


def read_inputs(path: Optional[str | Path]) -> Optional[list[str]]:
    """``--inputs FILE``: a JSONL of ``{"text": ...}`` (or a plain text file, one input per line)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--inputs {path} does not exist: pass a JSONL file of {{\"text\": ...}} lines")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                texts.append(json.loads(line)["text"] if line.lstrip().startswith("{") else line)
            except (ValueError, KeyError, TypeError):
                raise UserInputError(f"{path}:{number}: expected {{\"text\": ...}}") from None
    if not texts:
        raise UserInputError(f"--inputs {path} is empty: add lines of text")
    return texts


@torch.no_grad()
def torch_outputs(model: nn.Module, inputs: dict[str, torch.Tensor], kind: str) -> np.ndarray:
    out = model(**inputs)
    return (out.last_hidden_state if kind == "encoder" else out.logits).float().numpy()


def _masked(x: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    return x if kind == "classify" else x[mask.astype(bool)]


# ------------------------------------------------------------------------------------------ runtimes

def _run_safetensors(export_dir: Path, info: dict, inputs, kind: str, model_dir: Path) -> dict[str, np.ndarray]:
    if not info["split"]:
        model = load_base(export_dir, kind, info.get("classes"))
        return {"": torch_outputs(model.float(), inputs, kind)}
    out = {}
    if (export_dir / "adapter").is_dir():
        model = load_base(model_dir, kind, info.get("classes"), export_dir / "adapter")
        adapter_io.load_adapter(model, export_dir / "adapter", model_dir)
        out["[adapter/]"] = torch_outputs(model, inputs, kind)
    if (export_dir / "lora").is_dir():  # the LoRA form, applied from its files by an independent reader
        model = load_base(model_dir, kind, info.get("classes"), export_dir / "adapter")
        if kind == "classify":
            adapter_io.load_heads(model, export_dir / "adapter")
        apply_lora_dir(model, export_dir / "lora")
        out["[lora/]"] = torch_outputs(model, inputs, kind)
    return out


def apply_lora_dir(model: nn.Module, lora_dir: Path) -> None:
    """``W += (alpha / r) B A`` for every tensor pair of a PEFT LoRA directory (an independent reader)."""
    from safetensors.torch import load_file

    from psoft_export.adapters.layout import weight_out_in

    config = json.loads((lora_dir / adapter_io.CONFIG_FILE).read_text())
    tensors = load_file(lora_dir / adapter_io.WEIGHTS_FILE)
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key, A in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key[len(adapter_io.PREFIX):-len(".lora_A.weight")]
                B = tensors[key.replace(".lora_A.", ".lora_B.")]
                W = weight_out_in(model.get_submodule(module))
                W.add_((scale * B.double() @ A.double()).to(W.dtype))


def _run_onnx(export_dir: Path, info: dict, inputs, kind: str, model_dir: Path) -> np.ndarray:
    from converters import onnx as conv

    adapter = export_dir / "adapter.onnx_adapter" if info["split"] else None
    out = conv.run_logits(export_dir, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), adapter)
    return {"": next(iter(out.values()))}


def _run_gguf(export_dir: Path, info: dict, inputs, kind: str, model_dir: Path) -> np.ndarray:
    from converters import gguf as conv

    adapter = export_dir / "adapter.gguf" if info["split"] else None
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        tokens = ids[mask.bool()].tolist()
        logits = conv.run_logits(export_dir / "model.gguf", tokens, adapter)
        rows.append(np.pad(logits, ((0, ids.numel() - len(tokens)), (0, 0))))
    return {"": np.stack(rows)}


RUNTIMES = {"safetensors": _run_safetensors, "onnx": _run_onnx, "gguf": _run_gguf}


def read_export(export_dir: Path) -> dict:
    path = Path(export_dir) / EXPORT_FILE
    if not path.is_file():
        raise UserInputError(f"{export_dir} is not an export of psoft-export (no {EXPORT_FILE}): pass a 'merge' output")
    try:
        info = json.loads(path.read_text())
    except ValueError as exc:
        raise UserInputError(f"{path} is not valid JSON ({exc}): re-run merge") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or info.get("to") not in RUNTIMES:
        raise UserInputError(f"{path} is not a {EXPORT_FORMAT} record: re-run merge")
    return info


def verify_export(export_dir: Path, info: dict, model_dir: Path, reference: nn.Module, kind: str,
                  texts: Optional[list[str]] = None, compare_to: Optional[nn.Module] = None) -> Report:
    """Run ``export_dir`` in its runtime and compare with ``reference`` (LoRA files: with ``compare_to``, the
    rank-K approximation a ``--lora-rank`` export holds, when given)."""
    inputs = fixed_inputs(model_dir, texts)
    mask = inputs["attention_mask"].numpy()
    exact = torch_outputs(reference, inputs, kind)
    approx = torch_outputs(compare_to, inputs, kind) if compare_to is not None else exact
    got = RUNTIMES[info["to"]](Path(export_dir), info, inputs, kind, model_dir)
    dtype = info.get("quant") or info.get("dtype", "float32")
    report = Report(f"{info['to']} {'split' if info['split'] else 'merged'} {dtype}", TOLERANCES[(info["to"], dtype)])
    name = "logits" if kind != "encoder" else "last_hidden_state"
    for label, array in got.items():  # a copied adapter/ is exact; LoRA files hold the approximation when asked
        ref = exact if label == "[adapter/]" else approx
        report.add(name + label, _masked(array, mask, kind), _masked(ref, mask, kind))
    if not info["split"] and info["to"] in WEIGHT_CHECKS:
        compare_weights(report, Path(export_dir), info["to"], reference, model_dir)
    return report


def _safetensors_weights(export_dir: Path, expected: dict, model_dir: Path) -> dict[str, tuple[float, float]]:
    from psoft_export.checkpoint import ModelSource

    source = ModelSource(export_dir)
    errors = {}
    for key in source.keys():
        if key not in expected:
            raise VerificationError(f"the export holds {key}, which the model does not have")
        got, ref = source.tensor(key).double(), expected[key].detach().double()
        if tuple(got.shape) != tuple(ref.shape):
            raise VerificationError(f"{key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        diff = float((got - ref).abs().max()) if got.numel() else 0.0
        errors[key] = (diff / max(float(ref.abs().max()), 1e-30) if got.numel() else 0.0, diff)
    return errors


def _gguf_weights(export_dir: Path, expected: dict, model_dir: Path) -> dict[str, tuple[float, float]]:
    from converters import gguf as conv

    return conv.compare_tensors(export_dir / "model.gguf", model_dir, expected)


# Formats whose merged exports are compared tensor by tensor (ONNX: logits only; its initializers are renamed and
# folded by the exporter).
WEIGHT_CHECKS = {"safetensors": _safetensors_weights, "gguf": _gguf_weights}


def compare_weights(report: Report, export_dir: Path, to: str, reference: nn.Module, model_dir: Path) -> None:
    """Every tensor of a merged export against the reference's merged weights: a few fixed sentences cannot see a
    damaged embedding row they never use; this comparison is exhaustive and cheap. Recorded as output
    ``weights``: the worst per-tensor ``max |diff| / max |ref|`` (and which tensor)."""
    import copy

    from psoft_export.adapters import merge_and_unload

    expected = merge_and_unload(copy.deepcopy(reference)).state_dict()
    errors = WEIGHT_CHECKS[to](export_dir, expected, Path(model_dir))
    worst = max(errors, key=lambda k: errors[k][0])
    report.outputs["weights"] = {"max_abs_err": errors[worst][1], "rel_err": errors[worst][0], "worst": worst,
                                 "tensors": len(errors)}


def verify(export_dir: str | Path, model_dir: str | Path, adapter_dir: str | Path,
           inputs: Optional[str | Path] = None, allow_pickle: bool = False) -> Report:
    """Verify ``export_dir`` (written by ``merge``) against ``model_dir`` with ``adapter_dir``."""
    export_dir, model_dir, adapter_dir = Path(export_dir), Path(model_dir), Path(adapter_dir)
    info = read_export(export_dir)
    texts = read_inputs(inputs)
    reference, kind, _ = reference_model(model_dir, adapter_dir, allow_pickle)
    compare_to = None
    if info.get("lora_rank"):  # a requested approximation: check the files against what was meant to be written
        from psoft_export.merge import approximated_model

        compare_to = approximated_model(reference, info["lora_rank"])
    return verify_export(export_dir, info, model_dir, reference, kind, texts, compare_to)
