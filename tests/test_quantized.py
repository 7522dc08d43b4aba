"""QOFT (``psoft_export/quantized.py``): OFT and PSOFT over a bitsandbytes NF4 base, trained and merged.

Oracles: PEFT 0.21's OFT over the same NF4 base (outputs, 1e-5 relative to the output scale, float32 CPU); the
4-bit layer's own dequantized weight (``bitsandbytes.functional.dequantize_4bit``) for the input-centric forward
and for the exact fold ``dequant(W) R^T`` a merged export must hold (1e-6 per tensor). PSOFT (PEFT refuses a
quantized base, so no PEFT oracle): a float64 recompute ``x dequant(W)^T + s x A^T (R - I)^T B^T`` of the forward,
the exact fold ``dequant(W) + s B (R - I) A`` (1e-5 per tensor), and the in-memory model that was trained.
"""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip(
    "bitsandbytes",
    reason="bitsandbytes is not importable: pip install bitsandbytes==0.50.2 (the quant extra) to test QOFT",
)

from peft import OFTConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from psoft_export import adapter_io, quantized  # noqa: E402
from psoft_export.adapters import OftConfig, OftLinear, PsoftConfig, PsoftLinear, adapter_layers, inject  # noqa: E402
from psoft_export.errors import UserInputError  # noqa: E402
from psoft_export.merge import merge  # noqa: E402
from psoft_export.subspace import principal_subspace, psoft_factors  # noqa: E402
from psoft_export.train import TrainConfig, prepare, save_trained, train, train_loop  # noqa: E402
from psoft_export.verify import verify  # noqa: E402
from tests.conftest import MODELS, load_model, model_inputs, outputs, rel_err, require  # noqa: E402
from tests.test_adapters_oft import randomize, to_peft  # noqa: E402

LLAMA = MODELS / "llama"
DATA = MODELS.parent / "data"
BLOCK = 16
TOL = 1e-5
FAST = dict(method="oft", quantize="nf4", block_size=BLOCK, seq_len=64, batch_size=8, log_every=5, warmup=0.0)
PSOFT = dict(method="psoft", quantize="nf4", rank=32, seq_len=64, batch_size=8, log_every=5, warmup=0.0)


def load_nf4(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The llama fixture loaded 4-bit exactly as ``train --quantize nf4`` loads it (``dtype``: its --precision)."""
    model = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=dtype, **quantized.load_kwargs("nf4", dtype, "cpu"))
    quantized.prepare_model(model)
    return model.eval()


@pytest.mark.parametrize("cayley", ["exact", "neumann"])
def test_oft_over_nf4_matches_peft(cayley):
    """Same NF4 base, same generators (PEFT's exact mode is cayley(-Q): negated by ``to_peft``)."""
    ours = load_nf4()
    layers = inject(ours, OftConfig(block_size=BLOCK, cayley=cayley, neumann_terms=5))
    assert all(quantized.is_quantized(layer.base_layer) for layer in layers.values())
    theirs = get_peft_model(
        load_nf4(),
        OFTConfig(
            r=0,
            oft_block_size=BLOCK,
            target_modules="all-linear",
            use_cayley_neumann=cayley == "neumann",
            num_cayley_neumann_terms=5,
        ),
    ).eval()
    peft_layers = {n: m for n, m in theirs.base_model.model.named_modules() if hasattr(m, "oft_R")}
    assert set(layers) == set(peft_layers), "all-linear selects different 4-bit modules than PEFT"
    assert all(quantized.is_quantized(m.get_base_layer()) for m in peft_layers.values()), "PEFT's base is not 4-bit"
    randomize(layers)
    to_peft(layers, theirs, cayley)
    inputs = model_inputs("llama")
    y_ours, y_peft = outputs(ours, inputs), outputs(theirs, inputs)
    assert rel_err(y_ours, outputs(load_nf4(), inputs)) > 1e-3, "the adapter should change the output"
    err = rel_err(y_ours, y_peft)
    assert err <= TOL, f"OFT {cayley} over NF4: output rel err vs PEFT's OFT over the same base {err:.2e} > {TOL}"


def test_forward_rotates_the_input_and_never_dequantizes(monkeypatch):
    """``y = (x R) dequant(W)^T``, to float32 rounding, with no dequantized weight built by our code."""
    model = load_nf4()
    base = model.model.layers[0].mlp.down_proj
    layer = OftLinear(base, OftConfig(block_size=BLOCK))
    randomize({"down": layer})
    W = quantized.dequantized_weight(base).double()  # the oracle, built before the guard below
    R = layer.rotation().detach().double()
    monkeypatch.setattr(
        "psoft_export.adapters.oft.dequantized_weight",
        lambda module: pytest.fail("the forward pass dequantized the base weight"),
    )
    x = torch.randn(5, base.in_features, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    expected = (x.double() @ R) @ W.T
    err = rel_err(y, expected)
    assert err <= TOL, f"OFT over a 4-bit layer: rel err vs (x R) dequant(W)^T in float64 {err:.2e} > {TOL}"
    y.square().sum().backward()
    assert layer.q.grad is not None and float(layer.q.grad.abs().max()) > 0, "no gradient reached the rotation"
    assert base.weight.dtype == torch.uint8 and base.weight.grad is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_the_loaded_models_own_dequantization(dtype):
    """The merge never needs the 4-bit model: quantizing the source weight (in the dtype the model was loaded in)
    with the recorded settings gives the weights transformers stored, bit for bit."""
    model = load_nf4(getattr(torch, dtype))
    source = load_file(LLAMA / "model.safetensors")
    record = {
        "library": "bitsandbytes",
        "quant_type": "nf4",
        "blocksize": 64,
        "double_quant": False,
        "modules": [],
        "quantized_from": dtype,
    }
    names = quantized.quantized_modules(model)
    assert len(names) == 14 and "lm_head" not in names
    for name in names:
        got = quantized.round_trip(source[f"{name}.weight"], record)
        assert torch.equal(got, quantized.dequantized_weight(model.get_submodule(name))), name


def test_training_keeps_the_base_4bit(tmp_path):
    """Memory of the frozen base (parameters, buffers, quant states) after training steps and an eval: at most 0.3x
    its float32 size for the quantized layers; nothing dequantized persists; bitsandbytes' lossy CPU repack is off."""
    cfg = TrainConfig(**{**FAST, "steps": 3, "eval_every": 2})
    run = prepare(LLAMA, DATA / "train.jsonl", cfg, eval_data=DATA / "eval.jsonl")
    train_loop(run, tmp_path)
    model = run.model
    names = quantized.quantized_modules(model)
    float_model = load_model("llama")
    f32 = sum(float_model.get_submodule(n.removesuffix(".base_layer")).weight.numel() * 4 for n in names)
    q_bytes = 0
    for name in names:
        module = model.get_submodule(name)
        w, state = module.weight, module.weight.quant_state
        assert w.dtype == torch.uint8 and w.numel() * 2 == module.in_features * module.out_features, name
        assert not getattr(state, "packing_format_for_cpu", False), f"{name} was repacked (bf16 absmax) during eval"
        q_bytes += w.numel() + state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
    assert q_bytes <= 0.3 * f32, f"4-bit layers hold {q_bytes} bytes, {q_bytes / f32:.3f}x their float32 size > 0.3x"
    # Everything else the frozen base holds is what the float model holds outside those layers: no dense copy anywhere.
    whole = quantized.base_nbytes(model)
    f32_whole = sum(t.numel() * t.element_size() for t in list(float_model.parameters()) + list(float_model.buffers()))
    assert whole <= f32_whole - f32 + q_bytes, (
        f"the frozen base holds {whole} bytes, more than its float parts plus the 4-bit layers "
        f"({f32_whole - f32 + q_bytes}): a dequantized copy persists"
    )
    print(
        f"4-bit layers {q_bytes / f32:.3f}x float32; whole frozen base {whole / f32_whole:.3f}x (embeddings and "
        "head stay float)"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("qoft") / "adapter"
    history = []
    train(LLAMA, DATA / "train.jsonl", out, TrainConfig(**{**FAST, "steps": 24, "lr": 2e-2}), on_log=history.append)
    return out, history


def test_loss_falls_over_nf4(trained):
    out, history = trained
    first = sum(h["loss"] for h in history[:4]) / 4
    last = sum(h["loss"] for h in history[-4:]) / 4
    assert first - last >= 0.08, (
        f"QOFT: mean loss of the first 4 steps {first:.4f}, last 4 {last:.4f}; expected a fall of at least 0.08"
    )
    meta = adapter_io.read_meta(out)
    assert meta["train"]["quantize"] == "nf4"
    record = meta["quantized_base"]
    assert (record["quant_type"], record["blocksize"], record["double_quant"], record["quantized_from"]) == (
        "nf4",
        64,
        False,
        "float32",
    )
    assert len(record["modules"]) == 14 and set(meta["targets"]) <= set(record["modules"])


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 8e-3)])
def test_merge_folds_into_the_dequantized_weights(trained, tmp_path, dtype, tol):
    """Each exported weight is ``dequant(W) R^T`` (the 4-bit model's own dequantization and rotation, computed here
    in float64), rounded to ``dtype`` (bfloat16: 2^-8 relative); the export's logits match the 4-bit model that was
    trained. Folding into the original float weights instead would be far off."""
    adapter, _ = trained
    summary = merge(LLAMA, adapter, tmp_path / "out", "safetensors", dtype=dtype)
    assert summary["verification"]["ok"], summary["verification"]
    assert verify(tmp_path / "out", LLAMA, adapter).ok, "psoft-export verify must judge it against the same base"
    q = json.loads((tmp_path / "out" / "export.json").read_text())["quantized_base"]
    assert q == summary["quantized_base"] and q["written_as"] == dtype and q["dequantized"] == 14
    model = load_nf4()
    layers = adapter_io.load_adapter(model, adapter, LLAMA)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    source = load_file(LLAMA / "model.safetensors")
    for name in q["modules"]:
        module = model.get_submodule(name)
        W = quantized.dequantized_weight(module.base_layer if name in layers else module).double()
        if name in layers:
            R = layers[name].rotation().detach().double()
            W = W @ R.T
        err = rel_err(exported[f"{name}.weight"], W)
        assert err <= tol, f"{name}: exported weight vs dequant(W) R^T {err:.2e} > {tol} ({dtype})"
    naive = source[f"{name}.weight"].double() @ R.T  # (the last module is adapted: down_proj)
    assert rel_err(exported[f"{name}.weight"], naive) > 1e-2, "the fold must not use the original float weights"
    gap = q["vs_trained_model"]
    bound = 1e-5 if dtype == "float32" else 5e-2
    assert gap["as_trained_rel_err"] <= bound, f"export vs the trained 4-bit model {gap['as_trained_rel_err']:.2e}"
    print(
        f"{dtype}: export vs trained 4-bit model {gap['as_trained_rel_err']:.2e}, vs bitsandbytes' CPU inference "
        f"kernel {gap['bnb_cpu_inference_rel_err']:.2e}"
    )


def test_unsupported_routes_are_refused(trained, tmp_path):
    adapter, _ = trained
    for kwargs in ({"to": "safetensors", "split": True}, {"to": "onnx", "dtype": "float32"}):
        with pytest.raises(
            UserInputError, match="exports merged --to safetensors, merged --to gguf, --split --to gguf"
        ):
            merge(LLAMA, adapter, tmp_path / "out", **kwargs)
    layer = next(iter(adapter_layers(_nf4_with(adapter)).values()))
    with pytest.raises(UserInputError, match="quantized base layer"):
        layer.merge()


# GGUF routes of a QOFT adapter: (split, quant, bound on the error against the trained 4-bit model, measured). The
# export holds dequant(W) R^T (merged) or dequant(W) + a rank-32 LoRA form of dequant(W)(R^T - I) (split: the
# fixture's k/v projections cap the rank at 32), re-rounded to the file's type: the cost is that second rounding.
GGUF_ROUTES = [
    (False, None, 1e-5),  # measured 4.1e-7
    (False, "q8_0", 5e-2),  # 2.2e-2
    (False, "q4_0", 3e-1),  # 1.6e-1
    (True, "q8_0", 5e-2),  # 2.4e-2 (float32 base: 1.4e-2, the rank-32 truncation)
    (True, "q4_0", 3e-1),  # 1.8e-1
]


@pytest.mark.parametrize("split,quant,bound", GGUF_ROUTES)
def test_gguf_routes_report_what_requantizing_cost(trained, tmp_path, split, quant, bound):
    """Merged and split GGUF exports of a QOFT adapter, verified in llama.cpp, say what was requantized and report the
    error against the 4-bit model that was trained (run in llama.cpp, against bitsandbytes' model in PyTorch)."""
    require("llama_cpp")
    adapter, _ = trained
    summary = merge(LLAMA, adapter, tmp_path / "out", "gguf", split=split, quant=quant, lora_rank=32 if split else None)
    assert summary["verification"]["ok"], summary["verification"]
    q = summary["quantized_base"]
    assert q["written_as"] == (quant or "float32") and q["dequantized"] == 14
    assert (q["requantized_as"] is None) == (quant is None) and (quant is None or quant.upper() in q["requantized_as"])
    gap = q["vs_trained_model"]["as_trained_rel_err"]
    assert gap <= bound, f"gguf split={split} {quant}: export vs the trained 4-bit model {gap:.2e} > {bound}"
    if split:  # the base file holds the dequantized 4-bit weights, rounded to the file's type
        from gguf import GGUFReader
        from gguf.quants import dequantize

        from converters.gguf_stream import round_as_written

        t = next(t for t in GGUFReader(tmp_path / "out" / "model.gguf").tensors if t.name == "blk.1.ffn_down.weight")
        W = load_file(LLAMA / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
        record = adapter_io.read_meta(adapter)["quantized_base"]
        expected = round_as_written(quantized.round_trip(W, record), quant)
        assert torch.equal(torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(W.shape)), expected)
    print(f"gguf split={split} {quant}: export vs trained 4-bit model {gap:.2e}")


def _nf4_with(adapter):
    model = load_nf4()
    adapter_io.load_adapter(model, adapter, LLAMA)
    return model


@pytest.mark.parametrize("method", ["oft", "psoft"])
@pytest.mark.parametrize("model", ["gpt2", "qwen2"])
def test_merge_other_layouts(tmp_path, model, method):
    """GPT-2's Conv1D weights are stored transposed but quantized as ``W`` (transformers transposes them first): the
    streamed fold must round-trip ``W``, not the stored ``W^T``. Qwen2: biases stay float beside the 4-bit weights.
    PSOFT's factors (from the decomposition, in ``(out, in)`` layout) meet the same round trip."""
    adapter = tmp_path / "adapter"
    cfg = {**FAST, "steps": 3, "lr": 2e-2} if method == "oft" else {**PSOFT, "rank": 8, "steps": 3, "lr": 2e-2}
    train(MODELS / model, DATA / "train.jsonl", adapter, TrainConfig(**cfg))
    record = adapter_io.read_meta(adapter)["quantized_base"]
    assert bool(record["fan_in_fan_out"]) == (model == "gpt2")
    summary = merge(MODELS / model, adapter, tmp_path / "out", "safetensors")
    assert summary["verification"]["ok"], summary["verification"]
    gap = summary["quantized_base"]["vs_trained_model"]["as_trained_rel_err"]
    assert gap <= TOL, f"{model}: export vs the trained 4-bit model {gap:.2e} > {TOL}"


def test_classification_over_a_quantized_base_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="language-modelling data only"):
        prepare(MODELS / "bert", DATA / "classify.jsonl", TrainConfig(**{**FAST, "steps": 1}))


@pytest.mark.parametrize("method", ["oft", "psoft"])
def test_resume_over_nf4_reproduces_the_uninterrupted_run(tmp_path, method):
    """The checkpoint holds the config (``quantize`` included): a resumed QOFT (or PSOFT over NF4) run reloads the
    same 4-bit base (and, PSOFT, its decomposition of the original weights) and continues bit for bit (CPU)."""
    cfg = TrainConfig(**{**(FAST if method == "oft" else PSOFT), "steps": 4, "lr": 2e-2, "save_every": 2})
    ref = []
    train(LLAMA, DATA / "train.jsonl", tmp_path / "ref", cfg, on_log=ref.append)

    def stop_at_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        train(LLAMA, DATA / "train.jsonl", out, cfg, on_log=stop_at_3)
    resumed = []
    train(LLAMA, DATA / "train.jsonl", out, cfg, resume=True, on_log=resumed.append)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in ref[2:]], "resumed QOFT losses differ (CPU, bitwise)"
    assert adapter_io.read_meta(out)["quantized_base"] == adapter_io.read_meta(tmp_path / "ref")["quantized_base"]


def test_an_8bit_layer_is_recognized_and_dequantized():
    """8-bit layers are not trained here (docs/train.md says why), but they are recognized, so an OFT layer over one
    refuses an in-place merge, and its weight is read back as the training-mode kernel uses it."""
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        LLAMA, dtype=torch.float32, device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    ).train()
    base = model.model.layers[0].mlp.down_proj
    assert quantized.is_quantized(base)
    x = torch.randn(3, base.in_features, requires_grad=True)
    err = rel_err(base(x), x.detach().double() @ quantized.dequantized_weight(base).double().T)
    assert err <= TOL, f"8-bit layer (training kernel) vs x dequant(W)^T {err:.2e} > {TOL}"
    with pytest.raises(UserInputError, match="quantized base layer"):
        OftLinear(base, OftConfig(block_size=BLOCK)).merge()


def test_a_repacked_layer_is_read_back_without_damage():
    """bitsandbytes' CPU inference repack (switched off in training) rounds absmax to bfloat16 and transposes it;
    reading such a layer's weight gives the original within that rounding (2^-8), and leaves the layer as it was."""
    base = load_nf4().model.layers[0].mlp.down_proj
    before = quantized.dequantized_weight(base)
    base.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        base(torch.randn(2, base.in_features))
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    err = rel_err(quantized.dequantized_weight(base), before)
    assert err <= 2**-8, f"repacked layer read back {err:.2e} from its weights (> bf16 absmax rounding 2^-8)"
    assert base.weight.quant_state.packing_format_for_cpu and base.weight.quant_state.absmax.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ PSOFT over NF4
# PSOFT's update is low rank, so over a 4-bit base it runs beside the 4-bit kernel: y = base4bit(x) + s (x A^T)
# (R - I)^T B^T. A and B come from the run's decomposition of the original float weights (the safetensors source):
# the update is float PSOFT's own and the merge folds the stored factors into dequant(quant(W)).


def _exact_fold(layer: PsoftLinear) -> torch.Tensor:
    """``dequant(W) + s B (R - I) A`` in float64, from the 4-bit layer and the adapter's own tensors."""
    core = layer.scaling * (layer.rotation().detach().double() - torch.eye(layer.rank, dtype=torch.float64))
    return quantized.dequantized_weight(layer.base_layer).double() + layer.B.double() @ core @ layer.A.double()


@pytest.fixture(scope="module")
def psoft_trained(tmp_path_factory):
    """PSOFT trained over NF4 (rank 32, 24 steps), saved as ``train`` saves it; also the trained model's logits and
    exact folds, read from the in-memory model that ran the steps (the oracle an export must reproduce)."""
    out = tmp_path_factory.mktemp("qpsoft") / "adapter"
    run = prepare(
        LLAMA, DATA / "train.jsonl", TrainConfig(**PSOFT, steps=24, lr=2e-2), decompose_into=out / "decomposition"
    )
    history = train_loop(run, out)["history"]
    save_trained(run, out, LLAMA, history)
    model = run.model.eval()
    layers = adapter_layers(model)
    assert all(isinstance(m, PsoftLinear) and quantized.is_quantized(m.base_layer) for m in layers.values())
    folds = {name: _exact_fold(layer) for name, layer in layers.items()}
    return out, history, outputs(model, model_inputs("llama")), folds


def test_psoft_over_nf4_trains_and_records_its_factors(psoft_trained):
    out, history, _, _ = psoft_trained
    first = sum(h["loss"] for h in history[:4]) / 4
    last = sum(h["loss"] for h in history[-4:]) / 4
    assert first - last >= 0.1, f"PSOFT over NF4: mean loss of the first 4 steps {first:.4f}, last 4 {last:.4f}"
    meta = adapter_io.read_meta(out)
    assert meta["method"] == "psoft" and meta["train"]["quantize"] == "nf4"
    record = meta["quantized_base"]
    assert record["psoft_factors_from"] == "original" and set(meta["targets"]) <= set(record["modules"])
    # No PEFT form: PEFT's PSOFT refuses a 4-bit base (test_peft_psoft_refuses_the_nf4_base), so none is written.
    assert not meta["peft_form"]["faithful"] and "refuses a quantized base" in meta["peft_form"]["reason"]
    assert not (out / adapter_io.WEIGHTS_FILE).exists() and not (out / adapter_io.CONFIG_FILE).exists()
    print(f"PSOFT r=32 over NF4: mean loss of the first 4 steps {first:.3f}, last 4 {last:.3f}")


def test_psoft_forward_over_4bit_is_the_kernel_plus_the_low_rank_update(monkeypatch):
    """``y = x dequant(W)^T + s x A^T (R - I)^T B^T`` (float64 recompute, 1e-5 relative to the output scale: float32
    arithmetic; bitsandbytes' exact CPU kernel pinned by ``quantized.prepare_model``), the base computed by the 4-bit
    layer itself: no dequantized weight built by our code, no fused node over its packed codes."""
    model = load_nf4()
    name = "model.layers.0.mlp.down_proj"
    base = model.get_submodule(name)
    original = load_file(LLAMA / "model.safetensors")[f"{name}.weight"]
    cfg = PsoftConfig(rank=16, alpha=16.0)
    layer = PsoftLinear(base, cfg, factors=psoft_factors(principal_subspace(original, 16), cfg.scaling, cfg.init))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.q.copy_(0.3 * torch.randn(layer.q.shape, generator=gen))
        layer.vector_a.copy_(1 + 0.2 * torch.randn(16, generator=gen))
        layer.vector_b.copy_(1 + 0.2 * torch.randn(16, generator=gen))
    expected_W = _exact_fold(layer)  # the oracle, built before the guards below
    base_W = quantized.dequantized_weight(base).double()
    monkeypatch.setattr(
        "psoft_export.adapters.psoft.dequantized_weight", lambda m: pytest.fail("the forward dequantized the base")
    )
    monkeypatch.setattr(
        "psoft_export.adapters.fused.psoft_linear", lambda *a, **k: pytest.fail("fused node over packed 4-bit codes")
    )
    calls = []
    base.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(5, base.in_features, generator=gen)
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        err = rel_err(y, x.double() @ expected_W.T)
        assert err <= TOL, f"PSOFT over a 4-bit layer (train={training}): rel err vs float64 recompute {err:.2e}"
    assert len(calls) == 2, "the 4-bit layer did not compute the base product"
    assert rel_err(y, x.double() @ base_W.T) > 1e-2, "the adapter should change the output"
    y.square().sum().backward()
    assert layer.q.grad is not None and float(layer.q.grad.abs().max()) > 0, "no gradient reached the rotation"
    assert base.weight.dtype == torch.uint8 and base.weight.grad is None
    with pytest.raises(UserInputError, match="quantized base layer"):
        layer.merge()
    print(f"PSOFT over a 4-bit layer vs float64 recompute: {err:.2e}")


def test_psoft_without_factors_takes_the_dequantized_weights_subspace():
    """Handed no factors (``inject`` on a 4-bit model, no decomposition), a layer can only read the weight it computes
    with: the dequantized one; the record says so."""
    base = load_nf4().model.layers[1].self_attn.o_proj
    cfg = PsoftConfig(rank=8, alpha=8.0)
    layer = PsoftLinear(base, cfg)
    A, B = psoft_factors(principal_subspace(quantized.dequantized_weight(base).double(), 8), cfg.scaling, cfg.init)
    assert layer.factors_from == "dequantized"
    err = rel_err(layer.B @ layer.A, B @ A)  # B A: the subspace's top-r part, free of the SVD's sign choices
    assert err <= 1e-5, f"B A vs the dequantized weight's top-8 part (float64 SVD) {err:.2e}"
    original = load_file(LLAMA / "model.safetensors")["model.layers.1.self_attn.o_proj.weight"]
    A0, B0 = psoft_factors(principal_subspace(original.double(), 8), cfg.scaling, cfg.init)
    assert rel_err(layer.B @ layer.A, B0 @ A0) > 1e-2, "the original weight's subspace was used"
    assert quantized.psoft_factors_from({"o": layer}) == {"psoft_factors_from": "dequantized"}


def test_peft_psoft_refuses_the_nf4_base():
    """Where PEFT refuses: its PSOFT over the very base ``train --method psoft --quantize nf4`` trains over."""
    from peft import PsoftConfig as PeftPsoftConfig

    TrainConfig(method="psoft", quantize="nf4")  # accepted: the refusal is gone
    with pytest.raises(TypeError, match="PSOFT init requires float32/float16/bfloat16"):
        get_peft_model(load_nf4(), PeftPsoftConfig(r=8, target_modules="all-linear"))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 8e-3)])
def test_psoft_merge_folds_into_the_dequantized_weights(psoft_trained, tmp_path, dtype, tol):
    """Each exported weight is the exact fold ``dequant(W) + s B (R - I) A`` of the model that was trained (float64,
    from its 4-bit layers and adapter), rounded to ``dtype``; the export's logits match that model, and the reported
    error against the trained 4-bit model is within the bar. Folding into the original float weights is far off."""
    adapter, _, trained_logits, folds = psoft_trained
    summary = merge(LLAMA, adapter, tmp_path / "out", "safetensors", dtype=dtype)
    assert summary["verification"]["ok"], summary["verification"]
    q = summary["quantized_base"]
    assert q["written_as"] == dtype and q["dequantized"] == 14 and q["requantized_as"] is None
    exported = load_file(tmp_path / "out" / "model.safetensors")
    source = load_file(LLAMA / "model.safetensors")
    worst = 0.0
    for name, W in folds.items():
        err = rel_err(exported[f"{name}.weight"], W)
        worst = max(worst, err)
        assert err <= tol, f"{name}: exported weight vs dequant(W) + s B (R - I) A {err:.2e} > {tol} ({dtype})"
    record = adapter_io.read_meta(adapter)["quantized_base"]
    naive = source[f"{name}.weight"].double() + (W - quantized.round_trip(source[f"{name}.weight"], record).double())
    assert rel_err(exported[f"{name}.weight"], naive) > 1e-2, "the fold must not use the original float weights"
    gap = q["vs_trained_model"]["as_trained_rel_err"]
    bound = 1e-5 if dtype == "float32" else 5e-2
    assert gap <= bound, f"{dtype}: export vs the trained 4-bit model {gap:.2e} > {bound}"
    if dtype == "float32":  # and against the very model that ran the steps, not a reload of the adapter
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        err = rel_err(outputs(merged, model_inputs("llama")), trained_logits)
        assert err <= TOL, f"export vs the in-memory trained 4-bit model {err:.2e} > {TOL}"
        print(f"PSOFT float32 export vs the in-memory trained model: {err:.2e}")
    print(
        f"PSOFT {dtype}: weights vs exact fold {worst:.2e}; export vs trained 4-bit model {gap:.2e}, vs bitsandbytes' "
        f"CPU inference kernel {q['vs_trained_model']['bnb_cpu_inference_rel_err']:.2e}"
    )


# GGUF routes of a PSOFT-over-NF4 adapter: (split, quant, bound on the error against the trained 4-bit model). The
# split's LoRA form is exact (rank r, lora_A = (R - I) A, lora_B = s B): only the GGUF rounding costs.
PSOFT_GGUF_ROUTES = [
    (False, None, 1e-5),
    (False, "q8_0", 5e-2),
    (False, "q4_0", 3e-1),
    (True, None, 1e-5),
    (True, "q8_0", 5e-2),
    (True, "q4_0", 3e-1),
]


@pytest.mark.parametrize("split,quant,bound", PSOFT_GGUF_ROUTES)
def test_psoft_gguf_routes(psoft_trained, tmp_path, split, quant, bound):
    require("llama_cpp")
    adapter = psoft_trained[0]
    summary = merge(LLAMA, adapter, tmp_path / "out", "gguf", split=split, quant=quant)
    assert summary["verification"]["ok"], summary["verification"]
    q = summary["quantized_base"]
    assert q["written_as"] == (quant or "float32") and q["dequantized"] == 14
    assert (q["requantized_as"] is None) == (quant is None)
    gap = q["vs_trained_model"]["as_trained_rel_err"]
    assert gap <= bound, f"PSOFT gguf split={split} {quant}: export vs the trained 4-bit model {gap:.2e} > {bound}"
    inference = q["vs_trained_model"]["bnb_cpu_inference_rel_err"]
    print(f"PSOFT gguf split={split} {quant}: export vs trained 4-bit model {gap:.2e} (bnb CPU kernel {inference:.2e})")
