"""Verification against the rounded reference (``psoft_export/verify.py``): it tests the export, not the precision.

A merged float16 export with one weight off by 1e-3 relative (a damaged export) is compared two ways. The old check
(the runtime's logits against the float32 model with the adapter within the fixed float16 bar, every tensor against
the unrounded merge within the same bar) passes it: the damage is smaller than what float16 itself costs. The new
check (the same runtime against PyTorch with the merged weights rounded exactly as the export stores them, tight bars)
fails it, and passes the honest export, whose precision loss it reports separately.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from psoft_export.merge import merge
from psoft_export.models import fixed_inputs, reference_model, torch_outputs
from psoft_export.models import masked as _masked
from psoft_export.rounded import WEIGHT_CHECKS
from psoft_export.verification import ROUNDED_REFERENCE, RUNTIMES, TOLERANCES, read_export
from psoft_export.verify import verify
from tests.conftest import MODELS, require
from tests.golden import ADAPTERS

MODEL, CASE = MODELS / "llama", "llama-psoft"
DAMAGED = "model.layers.0.mlp.down_proj.weight"  # an adapted weight
HARM = 1e-3  # relative damage planted in it


def damage_safetensors(out) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    weights[DAMAGED] = (weights[DAMAGED].float() * (1 + HARM)).to(weights[DAMAGED].dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def damage_gguf(out) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(out / "model.gguf"), "r+")  # memory-mapped read/write
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    tensor.data[...] = (tensor.data.astype(np.float32) * (1 + HARM)).astype(tensor.data.dtype)
    reader.data.flush()
    del reader, tensor


def old_check(out, to: str, dtype: str) -> tuple[float, float, float]:
    """What verification did before: ``(logits rel err, weights rel err, bar)``, both against the float32 model with
    the adapter (the weights against its unrounded merge), one fixed bar per (format, dtype)."""
    from psoft_export.adapters import merge_and_unload

    reference, kind, _ = reference_model(MODEL, ADAPTERS / CASE)
    inputs = fixed_inputs(MODEL)
    mask = inputs["attention_mask"].numpy()
    exact = _masked(torch_outputs(reference, inputs, kind), mask, kind)
    got = _masked(RUNTIMES[to](out, read_export(out), inputs, kind, MODEL)[""], mask, kind)
    logits = float(np.abs(got - exact).max() / np.abs(exact).max())
    errors = WEIGHT_CHECKS[to](out, merge_and_unload(copy.deepcopy(reference)).state_dict(), MODEL)
    return logits, max(e[0] for e in errors.values()), TOLERANCES[(to, dtype)]


@pytest.mark.parametrize("to,damage", [("safetensors", damage_safetensors), ("gguf", damage_gguf)])
def test_rounded_reference_fails_a_damaged_float16_export_the_fixed_bar_passes(tmp_path, to, damage):
    if to == "gguf":
        require("llama_cpp")
    out = tmp_path / "f16"
    honest = merge(MODEL, ADAPTERS / CASE, out, to, dtype="float16")["verification"]
    assert honest["ok"] and honest["reference"] == ROUNDED_REFERENCE, honest
    assert honest["outputs"]["weights"]["rel_err"] == 0.0, "the file holds the rounded merge exactly"
    precision = honest["precision"]
    assert 0 < precision["rel_err"] <= precision["bound"] and precision["top1_agreement"] > 0.9, precision
    damage(out)
    logits, weights, bar = old_check(out, to, "float16")
    assert logits <= bar and weights <= bar, (
        f"the old check should pass the damaged export (logits {logits:.2e}, weights {weights:.2e}, bar {bar:.0e}): "
        "else this test shows nothing"
    )
    assert logits < 3 * precision["rel_err"], "the damage hides inside float16's own error on the logits"
    report = verify(out, MODEL, ADAPTERS / CASE)
    assert not report.ok, f"the rounded reference must fail the damaged export: {report.lines()}"
    assert report.outputs["weights"]["rel_err"] == pytest.approx(HARM, rel=0.6), report.outputs["weights"]
    assert report.outputs["weights"]["worst"] in (DAMAGED, "blk.0.ffn_down.weight")


def test_float32_logits_equal_the_rounded_reference(tmp_path):
    """transformers runs the export's own weights through the same float32 code as the merged reference."""
    report = merge(MODEL, ADAPTERS / CASE, tmp_path / "out", "safetensors", dtype="bfloat16")["verification"]
    assert report["ok"] and report["outputs"]["logits"]["rel_err"] <= 1e-5, report
    assert report["precision"]["rel_err"] > 10 * report["outputs"]["logits"]["rel_err"], (
        "bfloat16 costs precision against the float32 model, and the rounded reference accounts for all of it"
    )


def test_verification_frees_the_reference_before_loading_the_export(tmp_path, monkeypatch):
    """The whole-model route (split exports, ONNX, pickled or 4-bit bases): one model in memory at a time; when the
    export's runtime loads, no float32 reference is alive any more. (Merged safetensors and GGUF of a safetensors
    checkpoint never build it: test_merged_verification_never_builds_the_model.)"""
    import gc
    import weakref

    from psoft_export.verification import verify_export

    alive = []

    def load():
        model = reference_model(MODEL, ADAPTERS / CASE)[0]
        alive.append(weakref.ref(model))
        return model

    real_run = RUNTIMES["safetensors"]

    def run(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in alive), "the reference model is still in memory while the export loads"
        return real_run(*args, **kwargs)

    merge(MODEL, ADAPTERS / CASE, tmp_path / "out", "safetensors")
    monkeypatch.setitem(RUNTIMES, "safetensors", run)
    info = read_export(tmp_path / "out")
    report = verify_export(tmp_path / "out", info, MODEL, load, "causal")
    assert report.ok and len(alive) == 1 and not report.streamed, report.lines()


def test_merged_verification_never_builds_the_model(tmp_path, monkeypatch):
    """merge and verify of a merged safetensors export run every model one unit at a time: the whole-model loaders
    are never called (issue 16; the memory itself: tests/test_stream.py)."""
    import psoft_export.merge as merge_mod
    import psoft_export.verify as verify_mod

    def refuse(*args, **kwargs):
        raise AssertionError("a whole reference model was built")

    monkeypatch.setattr(verify_mod, "reference_model", refuse)
    monkeypatch.setattr(merge_mod, "reference_model", refuse)
    monkeypatch.setitem(RUNTIMES, "safetensors", refuse)
    info = merge(MODEL, ADAPTERS / CASE, tmp_path / "out", "safetensors", dtype="bfloat16")
    assert info["verification"]["ok"] and info["verification"]["streamed"], info["verification"]
    report = verify(tmp_path / "out", MODEL, ADAPTERS / CASE)
    assert report.ok and report.streamed, report.lines()


@pytest.mark.parametrize(
    "case,to,dtype",
    [
        ("llama-psoft", "safetensors", "bfloat16"),
        ("llama-oft", "safetensors", "float16"),
        ("qwen2-psoft", "safetensors", "float32"),
        ("gpt2-psoft", "safetensors", "float16"),
        ("bert-psoft", "safetensors", "bfloat16"),
        ("llama-oft", "gguf", "float16"),
        ("qwen2-psoft", "gguf", "q8_0"),
    ],
)
def test_unit_by_unit_verification_equals_the_whole_model_one(tmp_path, case, to, dtype):
    """Oracle for the unit-by-unit runner (psoft_export.streamed_run): the same export verified with the whole models
    (from_pretrained, our adapter loader, merge_and_unload) and one unit at a time gives the same numbers: every
    logits error, the precision report and the tensor-by-tensor check, to 1e-9 (measured: identical). Bugs caught: a
    unit's weights loaded under the wrong name, tied embeddings untied, the adapter skipped or merged twice, a unit
    not rounded, buffers left on the meta device."""
    from psoft_export.verification import verify_export

    if to == "gguf":
        require("llama_cpp")
    model = MODELS / case.split("-")[0]
    adapter = ADAPTERS / case
    quant = dtype if dtype.startswith("q") else None
    merge(model, adapter, tmp_path / "out", to, dtype=None if quant else dtype, quant=quant, verify=False)
    info = read_export(tmp_path / "out")
    kind = reference_model(model, adapter)[1]
    whole = verify_export(tmp_path / "out", info, model, lambda: reference_model(model, adapter)[0], kind)
    units = verify_export(tmp_path / "out", info, model, None, kind, streamed_adapter=adapter)
    assert units.streamed and not whole.streamed
    a, b = whole.to_dict(), units.to_dict()
    assert a["ok"] and b["ok"], (a, b)
    assert a["outputs"].keys() == b["outputs"].keys()
    for name in a["outputs"]:
        for field in ("rel_err", "max_abs_err"):
            assert b["outputs"][name][field] == pytest.approx(a["outputs"][name][field], abs=1e-9), (name, a, b)
    for field in ("max_abs_err", "mean_abs_err", "rel_err", "top1_agreement"):
        want, got = a["precision"][field], b["precision"][field]
        assert (got is None) if want is None else got == pytest.approx(want, abs=1e-9), (field, a, b)


def test_merged_onnx_starts_from_a_streamed_merge_and_verifies_by_units(tmp_path, monkeypatch):
    """merge --to onnx writes the merged float32 HF directory optimum starts from tensor by tensor (our reference
    model is never built: optimum's own load is then the one model in memory), and verification runs the float32
    model with the adapter one unit at a time, so nothing of ours is held while ONNX Runtime runs (issue 16)."""
    import psoft_export.merge as merge_mod
    import psoft_export.verify as verify_mod

    def refuse(*args, **kwargs):
        raise AssertionError("a whole reference model was built")

    monkeypatch.setattr(verify_mod, "reference_model", refuse)
    monkeypatch.setattr(merge_mod, "reference_model", refuse)
    info = merge(MODEL, ADAPTERS / CASE, tmp_path / "out", "onnx")
    assert info["scratch_streamed"] and info["verification"]["ok"] and info["verification"]["streamed"], info
    assert info["verification"]["outputs"]["logits"]["rel_err"] <= 1e-4
    report = verify(tmp_path / "out", MODEL, ADAPTERS / CASE)
    assert report.ok and report.streamed, report.lines()
