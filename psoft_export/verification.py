"""Verification (library): run an export in its own runtime and compare it with the PyTorch model plus adapter.

Used by ``merge`` before it publishes and by the ``verify`` command (:mod:`psoft_export.verify`) after.

Every export directory carries ``export.json`` saying what it is (format, merged or split, dtype). The reference
is the base model with the adapter loaded by our loader, in float32 on CPU; the export runs in transformers,
ONNX Runtime or llama.cpp. Errors are relative to the output scale: ``max |export - ref| / max |ref|`` over the
real (unpadded) positions. ``merge`` calls the same :func:`verify_export` before it renames its output into place.

Merged safetensors and GGUF exports are compared with a **rounded reference**: the reference merged, every tensor
rounded exactly as the export stores it (cast to float16/bfloat16, or quantized to Q8_0 and dequantized) and
widened to float32. Against it the bars are tight (the export is tested, not the precision of its dtype); the
precision loss against the float32 model with the adapter is reported beside it (``precision``: max and mean
logits error, top-1 agreement) and fails the export only beyond a loose bound. Only one model is in memory at a
time: the reference (merged and rounded in place) is dropped before the export is loaded in its runtime.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import numpy as np
from torch import nn

import converters
from psoft_export import adapter_io, quantized, rounded
from psoft_export.errors import UserInputError, VerificationError
from psoft_export.models import (
    fixed_inputs,
    load_base,
    masked,
    torch_outputs,
)

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "psoft-export/export/1"
# Relative error bars per (format, written type), from the format table (converters/__init__.py, with the measured
# values): against the float32 PyTorch model with the adapter (split exports, ONNX); merged safetensors and GGUF
# against the rounded reference (see the module docstring).
TOLERANCES = converters.table("tolerances")
ROUNDED_TOLERANCES = converters.table("rounded_tolerances")
WEIGHTS_TOLERANCE = 1e-6  # every tensor of a merged export against the rounded merged reference (measured 0)
# Loose bounds on the precision loss of a merged export against the float32 model with the adapter: reported always,
# a failure only beyond these. float32 keeps its tight bar (there the loss is the fold's own arithmetic).
PRECISION_BOUNDS = converters.table("precision_bounds")


FLOAT32_REFERENCE = "the float32 PyTorch model with the adapter"
ROUNDED_REFERENCE = "PyTorch with the merged weights rounded as the export stores them"


@dataclass
class Report:
    """Per-output errors of one export against ``reference``; ``ok`` when every error is within its tolerance
    (an output's own ``tolerance``, else the report's) and the precision loss, when reported, within its bound."""

    export: str
    tolerance: float
    outputs: dict[str, dict] = field(default_factory=dict)
    reference: str = FLOAT32_REFERENCE
    precision: Optional[dict] = None  # against the float32 model with the adapter, when the reference is rounded
    streamed: bool = False  # every PyTorch model ran one unit at a time (bounded memory)

    @property
    def ok(self) -> bool:
        return report_ok(self.to_dict(ok=False))

    def add(self, name: str, got: np.ndarray, ref: np.ndarray, tolerance: Optional[float] = None) -> None:
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        if got.shape != ref.shape:
            raise VerificationError(f"{self.export}: output {name} has shape {got.shape}, expected {ref.shape}")
        diff = np.abs(got - ref)
        scale = max(float(np.abs(ref).max()), 1e-30)
        self.outputs[name] = {"max_abs_err": float(diff.max()), "rel_err": float(diff.max() / scale)}
        if tolerance is not None:
            self.outputs[name]["tolerance"] = tolerance

    def add_precision(self, got: np.ndarray, ref: np.ndarray, bound: float, logits: bool) -> None:
        """The precision loss against the float32 model: max and mean |diff|, max relative to the output scale,
        and (logits) the fraction of positions whose top-1 token agrees."""
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        diff = np.abs(got - ref)
        rel = float(diff.max() / max(float(np.abs(ref).max()), 1e-30))
        top1 = float((got.argmax(-1) == ref.argmax(-1)).mean()) if logits else None
        self.precision = {
            "against": FLOAT32_REFERENCE,
            "max_abs_err": float(diff.max()),
            "mean_abs_err": float(diff.mean()),
            "rel_err": rel,
            "top1_agreement": top1,
            "bound": bound,
        }

    def to_dict(self, ok: bool = True) -> dict:
        out = {"export": self.export, "tolerance": self.tolerance, "reference": self.reference, "outputs": self.outputs}
        if self.precision is not None:
            out["precision"] = self.precision
        if self.streamed:
            out["streamed"] = True
        return {**out, "ok": report_ok(out)} if ok else out

    def lines(self) -> list[str]:
        return report_lines(self.to_dict())


def report_ok(report: dict) -> bool:
    precision = report.get("precision")
    return all(o["rel_err"] <= o.get("tolerance", report["tolerance"]) for o in report["outputs"].values()) and (
        precision is None or precision["rel_err"] <= precision["bound"]
    )


def report_lines(report: dict) -> list[str]:
    """One line per output (``logits: max abs err …, rel err … (tolerance …) ok``), then the precision line."""
    lines = []
    for name, o in report["outputs"].items():
        tol = o.get("tolerance", report["tolerance"])
        lines.append(
            f"{name}: max abs err {o['max_abs_err']:.3e}, rel err {o['rel_err']:.3e} "
            f"(tolerance {tol:.0e}) {'ok' if o['rel_err'] <= tol else 'FAIL'}"
        )
    p = report.get("precision")
    if p is not None:
        top1 = "" if p["top1_agreement"] is None else f", top-1 agreement {100 * p['top1_agreement']:.1f}%"
        lines.append(
            f"precision vs the float32 model: max abs err {p['max_abs_err']:.3e}, mean abs err "
            f"{p['mean_abs_err']:.3e}, rel err {p['rel_err']:.3e}{top1} (bound {p['bound']:.0e}) "
            + ("info" if p["rel_err"] <= p["bound"] else "FAIL")
        )
    return lines


# ------------------------------------------------------------------------------------------ the reference


def read_inputs(path: Optional[str | Path]) -> Optional[list[str]]:
    """``--inputs FILE``: a JSONL of ``{"text": ...}`` (or a plain text file, one input per line)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f'--inputs {path} does not exist: pass a JSONL file of {{"text": ...}} lines')
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                texts.append(json.loads(line)["text"] if line.lstrip().startswith("{") else line)
            except (ValueError, KeyError, TypeError):
                raise UserInputError(f'{path}:{number}: expected {{"text": ...}}') from None
    if not texts:
        raise UserInputError(f"--inputs {path} is empty: add lines of text")
    return texts


# ------------------------------------------------------------------------------------------ runtimes


def _runtime(to: str) -> Callable:
    def run(export_dir: Path, info: dict, inputs, kind: str, model_dir: Path) -> dict[str, np.ndarray]:
        return converters.module(to).run(export_dir, info, inputs, kind, model_dir)

    return run


# Each format's ``run`` (its module imported on first use): ``{label: outputs}`` of an export in its own runtime.
RUNTIMES = {name: _runtime(name) for name in converters.FORMATS}


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


Reference = Union[nn.Module, Callable[[], nn.Module]]


def verify_export(
    export_dir: Path,
    info: dict,
    model_dir: Path,
    reference: Reference,
    kind: str,
    texts: Optional[list[str]] = None,
    compare_to: Optional[nn.Module] = None,
    streamed_adapter: Optional[Path] = None,
) -> Report:
    """Run ``export_dir`` in its runtime and compare with ``reference``, the float32 model with the adapter (LoRA
    files: with ``compare_to``, the rank-K approximation a ``--lora-rank`` export holds, when given).

    ``reference`` may be a function that loads it: for merged safetensors and GGUF it is then merged and rounded in
    place and dropped before the export is loaded, so the two are never in memory together (a model passed itself is
    merged and rounded in place too, but its caller keeps it alive)."""
    inputs = fixed_inputs(model_dir, texts)
    mask = inputs["attention_mask"].numpy()
    dtype = info.get("quant") or info.get("dtype", "float32")
    route = f"{info['to']} {'split' if info['split'] else 'merged'} {dtype}"
    name = "logits" if kind != "encoder" else "last_hidden_state"
    if streamed_adapter is not None and not info["split"] and info["to"] in rounded.WEIGHT_CHECKS:
        return _verify_streamed(
            Path(export_dir), info, Path(model_dir), Path(streamed_adapter), kind, inputs, route, dtype
        )
    if streamed_adapter is not None and not info["split"] and compare_to is None:
        # A merged ONNX export: the float32 model with the adapter one unit at a time, nothing held while ORT runs.
        from psoft_export import streamed_run as sr

        run, adapted, load = _by_units(Path(model_dir), Path(streamed_adapter), kind, info.get("classes"))
        exact = sr.outputs(run, load, inputs, kind, adapted)
        del run, adapted, load
        got = RUNTIMES[info["to"]](Path(export_dir), info, inputs, kind, model_dir)
        report = Report(route, TOLERANCES[(info["to"], dtype)], streamed=True)
        for label, array in got.items():
            report.add(name + label, masked(array, mask, kind), masked(exact, mask, kind))
        return report
    model = reference if isinstance(reference, nn.Module) else reference()
    exact = torch_outputs(model, inputs, kind)
    if not info["split"] and info["to"] in rounded.WEIGHT_CHECKS:
        model = rounded.rounded_reference(model, info["to"], dtype)
        expected_out = torch_outputs(model, inputs, kind)
        report = Report(route, ROUNDED_TOLERANCES[(info["to"], dtype)], reference=ROUNDED_REFERENCE)
        weights = rounded.WEIGHT_CHECKS[info["to"]](Path(export_dir), model.state_dict(), Path(model_dir))
        del model, reference  # the export is loaded next: one model in memory at a time
        gc.collect()
        got = RUNTIMES[info["to"]](Path(export_dir), info, inputs, kind, model_dir)[""]
        report.add(name, masked(got, mask, kind), masked(expected_out, mask, kind))
        _add_weights(report, weights)
        report.add_precision(
            masked(got, mask, kind),
            masked(exact, mask, kind),
            PRECISION_BOUNDS[(info["to"], dtype)],
            logits=kind != "encoder",
        )
        return report
    approx = torch_outputs(compare_to, inputs, kind) if compare_to is not None else exact
    got = RUNTIMES[info["to"]](Path(export_dir), info, inputs, kind, model_dir)
    report = Report(route, TOLERANCES[(info["to"], dtype)])
    for label, array in got.items():  # a copied adapter/ is exact; LoRA files hold the approximation when asked
        ref = exact if label == "[adapter/]" else approx
        report.add(name + label, masked(array, mask, kind), masked(ref, mask, kind))
    return report


def _by_units(model_dir: Path, adapter_dir: Path, kind: str, classes: Optional[list]):
    """``(model, adapter, loader)`` for running the base with the adapter one unit at a time (:mod:`streamed_run`):
    the adapter built here from its directory, not taken from the writer's plan."""
    from psoft_export import streamed_run as sr

    run = sr.runnable_skeleton(model_dir, kind, classes, adapter_dir)
    adapted = sr.Adapted(run, model_dir, adapter_dir)
    return run, adapted, sr.source_loader(model_dir, run, adapted.extra)


def _verify_streamed(
    export_dir: Path, info: dict, model_dir: Path, adapter_dir: Path, kind: str, inputs, route: str, dtype: str
) -> Report:
    """The merged safetensors/GGUF checks of :func:`verify_export` in bounded memory (issue 16): every PyTorch model
    runs one unit (decoder layer, embedding, head) at a time with its weights read then (:mod:`streamed_run`), so
    the peak is the largest unit in float32 and activations, not the model: the float32 model with the adapter as
    trained (``exact``), the rounded reference and, for safetensors, the export's own files; GGUF runs in llama.cpp
    as always. Same comparisons and bars as the in-memory checks (tests/test_verify.py holds them equal)."""
    from psoft_export import streamed_run as sr

    mask = inputs["attention_mask"].numpy()
    name = "logits" if kind != "encoder" else "last_hidden_state"
    classes = info.get("classes")
    run, adapted, load = _by_units(model_dir, adapter_dir, kind, classes)
    names = adapted.names
    exact = sr.outputs(run, load, inputs, kind, adapted)
    rounding = rounded.rounding_for(info["to"], dtype, names, run.config.to_dict())
    report = Report(route, ROUNDED_TOLERANCES[(info["to"], dtype)], reference=ROUNDED_REFERENCE)
    # Each rounded tensor is compared with the export's file while its unit holds it; what no unit loaded, after.
    with rounded.comparison(info["to"], export_dir, model_dir, list(names)) as compare:
        expected_out = sr.outputs(run, load, inputs, kind, adapted, rounding, on_tensor=compare.check)
        weights = compare.finish(adapted.rounded(load, rounding))
    if info["to"] == "safetensors":  # the export's files, run the same way (config and names from the export)
        exported = sr.runnable_skeleton(export_dir, kind, classes, None)
        got = sr.outputs(exported, sr.source_loader(export_dir, exported), inputs, kind)
    else:
        got = RUNTIMES[info["to"]](export_dir, info, inputs, kind, model_dir)[""]
    report.add(name, masked(got, mask, kind), masked(expected_out, mask, kind))
    _add_weights(report, weights)
    bound = PRECISION_BOUNDS[(info["to"], dtype)]
    report.add_precision(masked(got, mask, kind), masked(exact, mask, kind), bound, logits=kind != "encoder")
    report.streamed = True
    return report


def _add_weights(report: Report, errors: dict[str, tuple[float, float]]) -> None:
    """Every tensor of a merged export against the rounded merged reference: a few fixed sentences cannot see a
    damaged embedding row they never use; this comparison is exhaustive and cheap. Recorded as output ``weights``:
    the worst per-tensor ``max |diff| / max |ref|`` (and which tensor), against :data:`WEIGHTS_TOLERANCE`."""
    worst = max(errors, key=lambda k: errors[k][0])
    report.outputs["weights"] = {
        "max_abs_err": errors[worst][1],
        "rel_err": errors[worst][0],
        "worst": worst,
        "tensors": len(errors),
        "tolerance": WEIGHTS_TOLERANCE,
    }


# ------------------------------------------------------------------------------------------ QOFT: the trained model


def quantized_model(
    model_dir, adapter_dir, kind: str, classes: Optional[list], record: Mapping, allow_pickle: bool = False
) -> nn.Module:
    """The model that was trained: the base loaded 4-bit as ``train --quantize`` loads it, with the adapter (eval)."""
    dtype = quantized._dtype(record.get("compute_dtype", "float32"))
    model = load_base(model_dir, kind, classes, adapter_dir, allow_pickle, quantize=record["quant_type"], dtype=dtype)
    adapter_io.load_adapter(model, adapter_dir, model_dir)
    return model.eval()


def _rel_err(a, ref) -> float:
    import numpy as np

    return float(np.abs(a.astype(np.float64) - ref).max() / max(float(np.abs(ref.astype(np.float64)).max()), 1e-30))


def trained_model_gap(
    export_dir,
    model_dir,
    adapter_dir,
    kind: str,
    classes: Optional[list],
    record: Mapping,
    texts: Optional[list[str]] = None,
    allow_pickle: bool = False,
) -> dict:
    """How far the merged export's outputs are from the quantized-base model that was trained, on the verify inputs:
    ``as_trained`` (bitsandbytes' dequantizing kernel, what training ran) and ``bnb_cpu_inference`` (bitsandbytes'
    default CPU eval kernel, which rounds absmax to bfloat16: what a user loading the adapter over a 4-bit base on
    CPU gets). One model in memory at a time."""
    inputs = fixed_inputs(model_dir, texts)
    mask = inputs["attention_mask"].numpy()
    model = quantized_model(model_dir, adapter_dir, kind, classes, record, allow_pickle)
    as_trained = masked(torch_outputs(model, inputs, kind), mask, kind)
    layers = [model.get_submodule(n) for n in quantized.quantized_modules(model)]
    repacked = any(getattr(m, "bnb_cpu_repack", False) for m in layers)
    for m in layers:
        m.support_avx512bf16_for_cpu = getattr(m, "bnb_cpu_repack", False)
    inference = masked(torch_outputs(model, inputs, kind), mask, kind)
    del model, layers
    info = read_export(Path(export_dir))  # the export in its own runtime (llama.cpp for GGUF, with a split's adapter)
    export = masked(
        next(iter(RUNTIMES[info["to"]](Path(export_dir), info, inputs, kind, model_dir).values())), mask, kind
    )
    return {
        "reference": "the 4-bit base + adapter as trained, PyTorch with bitsandbytes on CPU",
        "as_trained_rel_err": _rel_err(export, as_trained),
        "bnb_cpu_inference_rel_err": _rel_err(export, inference),
        "bnb_cpu_repack": repacked,
    }
