"""``psoft-export merge`` and ``verify``: every format x merged/split, verified in its own runtime.

Oracle: the PyTorch model with the adapter (our loader, float32). Each adapter is randomized so that it moves
the outputs by far more than the tolerance: an export that dropped the adapter would fail.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from psoft_export import adapter_io
from psoft_export.cli import cli
from psoft_export.errors import UserInputError, VerificationError
from psoft_export.merge import lora_form, merge
from psoft_export.train import TrainConfig, train
from psoft_export.verify import fixed_inputs, load_base, reference_model, torch_outputs, verify
from tests.conftest import MODELS, require
from tests.test_train import DATA, FAST, randomize

CASES = {
    "llama-psoft": ("llama", dict(method="psoft", rank=16, alpha=32), "train.jsonl"),
    "qwen2-psoft": ("qwen2", dict(method="psoft", rank=16, alpha=8, cayley="neumann"), "train.jsonl"),
    "llama-oft": ("llama", dict(method="oft", block_size=16), "train.jsonl"),
    "gpt2-psoft": ("gpt2", dict(method="psoft", rank=16), "train.jsonl"),
    "bert-psoft": ("bert", dict(method="psoft", rank=16), "classify.jsonl"),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """One trained-then-randomized adapter per case, and how far it moves the outputs from the base model."""
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for case, (model, opts, data) in CASES.items():
        cfg = TrainConfig(**{**FAST, "steps": 1, **opts})
        out = root / case
        train(MODELS / model, DATA / data, out, cfg)
        adapted, kind, classes = reference_model(MODELS / model, out)
        randomize(adapted, std=0.2)
        adapter_io.save_adapter(
            out,
            adapted,
            cfg.method_config(),
            base_model=str(MODELS / model),
            task="classify" if kind == "classify" else "causal",
            classes=classes,
            heads=json.loads((out / "psoft_export.json").read_text())["heads"],
        )
        inputs = fixed_inputs(MODELS / model)
        base = load_base(MODELS / model, kind, classes, out)
        adapter_io.load_heads(base, out)
        ref = torch_outputs(reference_model(MODELS / model, out)[0], inputs, kind)
        shift = float(abs(torch_outputs(base, inputs, kind) - ref).max() / abs(ref).max())
        made[case] = (model, out, shift)
    return made


ROUTES = [
    ("llama-psoft", "safetensors", False),
    ("llama-psoft", "safetensors", True),
    ("llama-psoft", "onnx", False),
    ("llama-psoft", "onnx", True),
    ("llama-psoft", "gguf", False),
    ("llama-psoft", "gguf", True),
    ("qwen2-psoft", "safetensors", False),
    ("qwen2-psoft", "onnx", True),
    ("qwen2-psoft", "gguf", False),
    ("qwen2-psoft", "gguf", True),
    ("llama-oft", "safetensors", False),
    ("llama-oft", "onnx", True),
    ("llama-oft", "gguf", False),
    ("gpt2-psoft", "safetensors", True),
    ("gpt2-psoft", "onnx", False),
    ("gpt2-psoft", "onnx", True),
    ("bert-psoft", "safetensors", False),
    ("bert-psoft", "onnx", False),
    ("bert-psoft", "safetensors", True),
]


@pytest.mark.parametrize("case,to,split", ROUTES)
def test_export_matches_the_adapter_model(adapters, tmp_path, case, to, split):
    if to == "gguf":
        require("llama_cpp")
    model, adapter, shift = adapters[case]
    summary = merge(MODELS / model, adapter, tmp_path / "out", to, split=split)
    report = summary["verification"]
    assert report["ok"], f"{case} {to} split={split}: {report}"
    for name, o in report["outputs"].items():
        tol = o.get("tolerance", report["tolerance"])
        assert o["rel_err"] <= tol, f"{case} {to} {name}: rel err {o['rel_err']:.2e}"
        assert shift > 30 * max(tol, (report.get("precision") or {}).get("bound", 0)), (
            f"{case}: the adapter moves outputs by only {shift:.2e}; the {to} check (tol {tol}) "
            "could not tell an export without it"
        )
    again = verify(tmp_path / "out", MODELS / model, adapter)
    assert again.ok and again.outputs.keys() == report["outputs"].keys(), "verify disagrees with merge's own check"
    # An oracle we did not write: PEFT loads the adapter's PEFT files, builds R from the raw parameters itself
    # and merges; the export, run in its own runtime, must agree with that at the route's bar.
    from psoft_export.verify import RUNTIMES, read_export

    inputs, kind, expected = peft_oracle(case, model, adapter)
    got = RUNTIMES[to](tmp_path / "out", read_export(tmp_path / "out"), inputs, kind, MODELS / model)
    mask = inputs["attention_mask"].bool().numpy()
    for label, array in got.items():
        a, b = (array, expected) if kind == "classify" else (array[mask], expected[mask])
        err = float(abs(a - b).max() / abs(b).max())
        assert err <= ORACLE_TOL[to], f"{case} {to} split={split}{label}: vs PEFT's own merge, rel err {err:.2e}"


# Bars against PEFT's merge, fixed here (not imported from verify): float32 PyTorch/ORT 1e-4, llama.cpp 2e-3.
ORACLE_TOL = {"safetensors": 1e-4, "onnx": 1e-4, "gguf": 2e-3}
_ORACLES: dict = {}


def peft_oracle(case: str, model: str, adapter):
    """``(inputs, kind, logits)`` of ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``."""
    if case not in _ORACLES:
        from peft import PeftModel

        from tests.conftest import peft_copy

        assert (adapter / "adapter_config.json").is_file(), f"{case}: no PEFT file to build the oracle from"
        _, kind, classes = reference_model(MODELS / model, adapter)
        base = peft_copy(load_base(MODELS / model, kind, classes, adapter))  # Conv1D -> Linear for PEFT
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
        inputs = fixed_inputs(MODELS / model)
        _ORACLES[case] = (inputs, kind, torch_outputs(merged, inputs, kind))
    return _ORACLES[case]


def test_quantized_gguf_has_its_own_tolerance(adapters, tmp_path):
    require("llama_cpp")
    model, adapter, _ = adapters["llama-psoft"]
    for dtype, quant in [("float16", None), ("float32", "q8_0")]:
        report = merge(MODELS / model, adapter, tmp_path / f"{dtype}{quant}", "gguf", dtype=dtype, quant=quant)[
            "verification"
        ]
        assert report["ok"], report


def test_gguf_q4_0_merged_route(adapters, tmp_path):
    """``merge --to gguf --quant q4_0`` (the CLI), verified in llama.cpp against the merged weights rounded to Q4_0
    (output head Q8_0) as the file stores them: every tensor equal, the logits within the q4_0 bar, which is far
    below what the adapter moves (an export without it would fail); the precision loss is reported."""
    from converters import gguf as conv
    from psoft_export.verification import ROUNDED_TOLERANCES

    require("llama_cpp")
    model, adapter, shift = adapters["llama-psoft"]
    out = tmp_path / "out"
    args = ["merge", str(MODELS / model), "--adapter", str(adapter), "-o", str(out), "--to", "gguf", "--quant", "q4_0"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])["verification"]
    tol = ROUNDED_TOLERANCES[("gguf", "q4_0")]
    assert report["ok"] and report["export"] == "gguf merged q4_0" and report["tolerance"] == tol, report
    assert report["outputs"]["weights"]["rel_err"] == 0.0, report["outputs"]["weights"]
    assert shift > 3 * tol, f"the adapter moves outputs by only {shift:.2e}: the q4_0 bar {tol} cannot see it"
    types = {t["name"]: t["type"] for t in conv.describe(out / "model.gguf")["tensors"]}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0", types
    assert verify(out, MODELS / model, adapter).ok


def test_gguf_q4_0_split_is_the_rounded_base_plus_the_lora_form(adapters, tmp_path):
    """``--split --quant q4_0``: a Q4_0 base + the float32 LoRA adapter. Its own check is against the float32 model
    (wide bar: the base is 4-bit); here, tighter, against PyTorch with the base rounded as the file stores it plus
    PSOFT's exact LoRA form in float: within the q4_0 rounded bar, far below what the adapter moves."""
    from psoft_export.rounded import rounded_reference
    from psoft_export.verification import ROUNDED_TOLERANCES
    from psoft_export.verify import RUNTIMES, read_export

    require("llama_cpp")
    model, adapter, shift = adapters["llama-psoft"]
    out = tmp_path / "out"
    summary = merge(MODELS / model, adapter, out, "gguf", split=True, quant="q4_0")
    assert summary["verification"]["ok"] and summary["verification"]["export"] == "gguf split q4_0"
    factors, alpha, _ = lora_form(reference_model(MODELS / model, adapter)[0], None)
    expected = rounded_reference(load_base(MODELS / model, "causal", None), "gguf", "q4_0")
    with torch.no_grad():
        for name, (a, b) in factors.items():
            expected.get_submodule(name).weight.add_((alpha / a.shape[0]) * (b.double() @ a.double()).float())
    inputs = fixed_inputs(MODELS / model)
    mask = inputs["attention_mask"].bool().numpy()
    got = RUNTIMES["gguf"](out, read_export(out), inputs, "causal", MODELS / model)[""][mask]
    ref = torch_outputs(expected, inputs, "causal")[mask]
    err, tol = float(abs(got - ref).max() / abs(ref).max()), ROUNDED_TOLERANCES[("gguf", "q4_0")]
    assert err <= tol, f"split q4_0 vs rounded base + LoRA form: rel err {err:.2e} > {tol}"
    assert shift > 3 * tol, f"the adapter moves outputs by only {shift:.2e}"


def test_merged_safetensors_has_no_adapter_trace_and_loads(adapters, tmp_path):
    model, adapter, _ = adapters["llama-psoft"]
    merge(MODELS / model, adapter, tmp_path / "out", "safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    names = [n for n, _ in loaded.named_parameters()]
    assert not any("psoft" in n or "oft_" in n for n in names)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_oft_to_lora_only_target_is_refused_without_lora_rank(adapters, tmp_path):
    model, adapter, _ = adapters["llama-oft"]
    with pytest.raises(UserInputError, match="--lora-rank"):
        merge(MODELS / model, adapter, tmp_path / "out", "gguf", split=True)
    assert not (tmp_path / "out").exists()


def test_oft_lora_rank_approximation_reports_its_error(adapters, tmp_path):
    model, adapter, _ = adapters["llama-oft"]
    summary = merge(MODELS / model, adapter, tmp_path / "out", "safetensors", split=True, lora_rank=8)
    approx = summary["lora_approximation"]
    assert 0 < approx["max_rel_err"] < 1, approx["max_rel_err"]
    assert summary["verification"]["ok"], "the rank-8 LoRA files must match the rank-8 approximation they hold"


def test_verification_failure_keeps_the_export_unverified_unless_strict(adapters, tmp_path, monkeypatch):
    """A wrong exporter (scaling dropped from the LoRA form) fails verification: exit 1, OUT itself never written;
    the export is kept as OUT.unverified (its export.json says why), and with strict nothing is kept."""
    import psoft_export.adapters.lora as lora_mod

    model, adapter, _ = adapters["llama-psoft"]
    real = lora_mod.lora_form

    def broken(model_, lora_rank=None):
        factors, alpha, errors = real(model_, lora_rank)
        return factors, alpha * 3.0, errors

    monkeypatch.setattr(lora_mod, "lora_form", broken)
    with pytest.raises(VerificationError, match="gguf split.*kept, unverified, in .*out.unverified"):
        merge(MODELS / model, adapter, tmp_path / "out", "gguf", split=True)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.unverified"], "a temporary directory was left behind"
    kept = json.loads((tmp_path / "out.unverified" / "export.json").read_text())
    assert kept["verification"]["ok"] is False and (tmp_path / "out.unverified" / "adapter.gguf").is_file()
    with pytest.raises(VerificationError, match="gguf split.*nothing was written"):
        merge(MODELS / model, adapter, tmp_path / "strict", "gguf", split=True, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.unverified"], "--strict must keep nothing"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--to", "tflite"], "unknown export format --to 'tflite'"),
        (["--to", "onnx", "--dtype", "float16"], "ONNX exports are float32"),
        (["--to", "safetensors", "--quant", "q8_0"], "--quant q8_0 is not written by --to safetensors"),
        (["--to", "gguf", "--quant", "q4_k"], "--quant q4_k is not written by --to gguf: choose one of q8_0"),
        (["--to", "gguf", "--lora-rank", "4"], "--lora-rank K (K > 0) is for --split"),
    ],
)
def test_bad_requests_exit_2_with_one_line(adapters, tmp_path, args, message):
    model, adapter, _ = adapters["llama-psoft"]
    result = CliRunner().invoke(
        cli, ["merge", str(MODELS / model), "--adapter", str(adapter), "-o", str(tmp_path / "out"), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_gguf_refuses_encoders(adapters, tmp_path):
    model, adapter, _ = adapters["bert-psoft"]
    with pytest.raises(UserInputError, match="GGUF export supports llama, mistral, qwen2"):
        merge(MODELS / model, adapter, tmp_path / "out", "gguf")


def test_verify_cli_exit_codes(adapters, tmp_path):
    model, adapter, _ = adapters["qwen2-psoft"]
    merge(MODELS / model, adapter, tmp_path / "out", "safetensors")
    ok = CliRunner().invoke(
        cli, ["verify", str(tmp_path / "out"), "--model", str(MODELS / model), "--adapter", str(adapter), "--json"]
    )
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"]
    # the same export checked against a different adapter (generators shifted by 0.1): beyond tolerance, exit 1
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-adapter"
    shutil.copytree(adapter, other)
    tensors = {k: v + 0.1 if k.endswith(".q") else v for k, v in load_file(other / "psoft_export.safetensors").items()}
    save_file(tensors, str(other / "psoft_export.safetensors"))
    bad = CliRunner().invoke(
        cli, ["verify", str(tmp_path / "out"), "--model", str(MODELS / model), "--adapter", str(other)]
    )
    assert bad.exit_code == 1 and "FAIL" in bad.output, bad.output
    missing = CliRunner().invoke(
        cli, ["verify", str(tmp_path / "nope"), "--model", str(MODELS / model), "--adapter", str(adapter)]
    )
    assert missing.exit_code == 2 and "not an export" in missing.output


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_safetensors_within_their_tolerance(adapters, tmp_path, dtype):
    from safetensors import safe_open

    model, adapter, _ = adapters["llama-psoft"]
    report = merge(MODELS / model, adapter, tmp_path / "out", "safetensors", dtype=dtype)["verification"]
    assert report["ok"], report
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        key = "model.layers.0.self_attn.q_proj.weight"
        assert f.get_tensor(key).dtype == getattr(torch, dtype), f"{key} was not written as {dtype}"


@pytest.mark.slow
def test_llama_cpp_converter_takes_the_merged_output_unchanged(tmp_path):
    """GGUF-ready: llama.cpp's own convert_hf_to_gguf.py converts our merged safetensors directory (tiny Llama
    with a real Llama-3 tokenizer), and llama.cpp's logits on it equal the PyTorch model with the adapter."""
    require("llama_cpp")
    from converters import gguf as gg
    from psoft_export.adapters import OftConfig, inject
    from tests.golden import randomize
    from tests.llama_cpp_tools import llama_cpp_source, run_converter, tiny_llama3_dir

    src = llama_cpp_source()
    if src is None:
        pytest.skip("pip download of the llama-cpp-python sdist failed (offline?)")
    base_dir = tiny_llama3_dir(src, tmp_path / "tiny-llama3")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    cfg = OftConfig(block_size=16, cayley="neumann")
    inject(model, cfg)
    randomize(model, seed=1, std=0.2)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_io.save_adapter(adapter, model, cfg, base_model=str(base_dir))
    merge(base_dir, adapter, tmp_path / "merged", "safetensors")
    run_converter(src, tmp_path / "merged", tmp_path / "converted.gguf")
    tokens = [128000, 791, 2579, 39935, 6439, 304, 279, 10411, 13, 15, 220]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0]
        plain = (
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()(torch.tensor([tokens])).logits[0]
        )
    assert float((plain - want).abs().max() / want.abs().max()) > 0.05, "the adapter must move the logits"
    got = torch.from_numpy(gg.run_logits(tmp_path / "converted.gguf", tokens))
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 2e-3, f"convert_hf_to_gguf on our merged output vs PyTorch+adapter: rel err {err:.2e} > 2e-3"


@pytest.mark.parametrize("kind", ["psoft", "oft"])
def test_peft_trained_adapters_export_like_ours(tmp_path, kind):
    """An adapter made by PEFT itself (no psoft-export files) goes through merge and verify unchanged."""
    from peft import OFTConfig, get_peft_model
    from peft import PsoftConfig as PeftPsoftConfig

    base = AutoModelForCausalLM.from_pretrained(MODELS / "qwen2").eval()
    cfg = (
        PeftPsoftConfig(r=8, psoft_alpha=16, target_modules="all-linear")
        if kind == "psoft"
        else OFTConfig(r=0, oft_block_size=16, target_modules="all-linear", use_cayley_neumann=True)
    )
    peft_model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "psoft_R" in name or "oft_R" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "peft")
    to, split = ("gguf", True) if kind == "psoft" else ("onnx", True)
    if to == "gguf":
        require("llama_cpp")
    summary = merge(MODELS / "qwen2", tmp_path / "peft", tmp_path / "out", to, split=split)
    assert summary["verification"]["ok"], summary["verification"]
    # the reference the check used is PEFT's own model: compare it with PEFT directly
    ours, kind_, _ = reference_model(MODELS / "qwen2", tmp_path / "peft")
    inputs = fixed_inputs(MODELS / "qwen2")
    with torch.no_grad():
        theirs = peft_model.eval()(**inputs).logits
    err = float((torch.from_numpy(torch_outputs(ours, inputs, kind_)) - theirs).abs().max() / theirs.abs().max())
    assert err <= 1e-5, f"our reference for a PEFT {kind} adapter differs from PEFT by {err:.2e}"


def test_verify_inputs_file(adapters, tmp_path):
    model, adapter, _ = adapters["llama-psoft"]
    merge(MODELS / model, adapter, tmp_path / "out", "onnx")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"text": "The owl and the fox."}\n{"text": "A quiet morning in the forest, with rain."}\n')
    report = verify(tmp_path / "out", MODELS / model, adapter, inputs)
    assert report.ok, report.to_dict()
    bad = CliRunner().invoke(
        cli,
        [
            "verify",
            str(tmp_path / "out"),
            "--model",
            str(MODELS / model),
            "--adapter",
            str(adapter),
            "--inputs",
            str(tmp_path / "missing.jsonl"),
        ],
    )
    assert bad.exit_code == 2 and "does not exist" in bad.output


@pytest.mark.parametrize("delta,ok", [(3e-5, False), (3e-6, True)])
def test_verify_fails_just_above_its_tolerance(adapters, tmp_path, delta, ok):
    """A merged float32 export whose logits are off by 3x the 1e-5 bar (against the rounded reference) must fail
    verify's logits check; 0.3x must pass it. Scaling Llama's final norm weight by (1 + delta) scales every logit by
    exactly that, so the relative error is delta. The tensor-by-tensor check (bar 1e-6) fails both.
    Bug caught: a verify tolerance loosened 10x."""
    from safetensors.torch import load_file, save_file

    model, adapter, _ = adapters["llama-psoft"]
    out = tmp_path / "merged"
    merge(MODELS / model, adapter, out, "safetensors")
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * (1 + delta)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = verify(out, MODELS / model, adapter)
    err = report.outputs["logits"]["rel_err"]
    # float32 rounds w (1 + 3e-6) to within half an ulp (up to 1.2e-7 of w): the achieved scaling is delta +- 5%.
    assert err == pytest.approx(delta, rel=0.1), f"the perturbation should give rel err {delta}, got {err}"
    assert (err <= report.tolerance) is ok, f"rel err {err:.1e} against tolerance {report.tolerance:.0e}"
    assert report.tolerance == 1e-5 and report.outputs["weights"]["worst"] == "model.norm.weight" and not report.ok


@pytest.mark.parametrize("to,split", [("onnx", False), ("onnx", True), ("gguf", False), ("gguf", True)])
@pytest.mark.parametrize("factor,ok", [(3.0, False), (1 / 3, True)])
def test_each_runtime_route_fails_just_above_its_tolerance(adapters, tmp_path, to, split, factor, ok):
    """The export stays as written; the reference moves: verify against a copy of the base whose final norm weight
    is scaled by (1 + delta), which scales every reference logit by exactly that. delta = 3x the route's bar must
    fail, delta = bar / 3 must pass."""
    import shutil

    from safetensors.torch import load_file, save_file

    if to == "gguf":
        require("llama_cpp")
    model, adapter, _ = adapters["llama-psoft"]
    out = tmp_path / "export"
    merge(MODELS / model, adapter, out, to, split=split)  # both hold their own copy of the base weights
    delta = factor * ORACLE_TOL[to]
    shifted = tmp_path / "shifted-base"
    shutil.copytree(MODELS / model, shifted)
    weights = load_file(shifted / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * (1 + delta)
    save_file(weights, str(shifted / "model.safetensors"), metadata={"format": "pt"})
    report = verify(out, shifted, adapter)
    err = report.outputs["logits"]["rel_err"]
    assert err == pytest.approx(delta / (1 + delta), rel=0.1, abs=ORACLE_TOL[to] / 20), f"rel err {err:.2e}"
    assert (err <= report.tolerance) is ok, f"{to}: rel err {err:.1e} against tolerance {report.tolerance:.0e}"
    # a merged GGUF is also compared tensor by tensor with the (shifted) reference: the norm weight differs beyond 1e-6
    assert report.ok is (ok and (split or to != "gguf")), f"{to} split={split}: ok={report.ok}, {report.lines()}"


def test_verify_checks_every_weight_of_a_merged_export(adapters, tmp_path):
    """Issue 13.8: a corrupted embedding row the fixed sentences never use still fails verify."""
    from safetensors.torch import load_file, save_file

    model, adapter, _ = adapters["llama-psoft"]
    out = tmp_path / "merged"
    summary = merge(MODELS / model, adapter, out, "safetensors")
    assert summary["verification"]["outputs"]["weights"]["rel_err"] <= 1e-6, "a float32 merge writes the fold"
    weights = load_file(out / "model.safetensors")
    used = set(fixed_inputs(MODELS / model)["input_ids"].flatten().tolist())
    row = next(i for i in range(weights["model.embed_tokens.weight"].shape[0]) if i not in used)
    weights["model.embed_tokens.weight"][row] += 1.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = verify(out, MODELS / model, adapter)
    assert report.outputs["logits"]["rel_err"] <= 1e-6, "the sentences do not see this row (else the test is vacuous)"
    assert not report.ok and report.outputs["weights"]["worst"] == "model.embed_tokens.weight"


def test_verify_checks_every_tensor_of_a_merged_gguf(adapters, tmp_path):
    """Issue 13.8 for GGUF: the file's tensors (dequantized, rope rows as written) against the merged reference."""
    import numpy as np
    from gguf import GGUFReader

    require("llama_cpp")
    model, adapter, _ = adapters["llama-psoft"]
    out = tmp_path / "gguf"
    summary = merge(MODELS / model, adapter, out, "gguf")
    weights = summary["verification"]["outputs"]["weights"]
    assert weights["rel_err"] <= 1e-6 and weights["tensors"] >= 20, weights
    reader = GGUFReader(str(out / "model.gguf"), "r+")  # memory-mapped read/write: damage one unused row
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    used = set(fixed_inputs(MODELS / model)["input_ids"].flatten().tolist())
    row = next(i for i in range(embd.data.shape[0]) if i not in used)
    embd.data[row] += np.float32(1.0)
    reader.data.flush()
    del reader, embd
    report = verify(out, MODELS / model, adapter)
    assert report.outputs["logits"]["rel_err"] <= 2e-3, "the sentences do not see this row (else vacuous)"
    assert not report.ok and report.outputs["weights"]["worst"] == "token_embd.weight"
