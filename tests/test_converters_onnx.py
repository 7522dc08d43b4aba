"""ONNX export (merged and adapter-split) against the float32 PyTorch/transformers model, the oracle.

Each fixture model is exported once per module. Errors are relative to the output scale (conftest.rel_err),
compared on real (unpadded) tokens; the bar is TOL.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters import onnx as cx
from psoft_export.adapters.layout import features, is_linear, weight_out_in
from psoft_export.errors import UserInputError
from tests.conftest import ALL_MODELS, DECODERS, MODELS, load_model, model_inputs, rel_err

TOL = 1e-4  # float32 ONNX Runtime vs float32 torch, relative to max |reference|
RANK, SCALING, BLOCK = 4, 2.0, 16
LAYER_MARKERS = (".layers.", ".h.", ".layer.")  # attention + MLP linears; not lm_head / the MLM head


def targets(name: str) -> list[str]:
    """Every attention and MLP linear layer of fixture ``name`` (HF names of the conftest model)."""
    model = load_model(name)
    return [n for n, m in model.named_modules() if is_linear(m) and any(k in n for k in LAYER_MARKERS)]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def reference(name: str, model: torch.nn.Module) -> torch.Tensor:
    """The oracle: logits (decoders) or BERT's last_hidden_state, float32, on the fixed padded batch."""
    inputs = model_inputs(name)
    with torch.no_grad():
        if name == "bert":
            return model.bert(**inputs).last_hidden_state
        return model(**inputs, position_ids=position_ids(inputs["attention_mask"])).logits


def onnx_out(name: str, onnx_dir, adapter=None, session=None) -> torch.Tensor:
    inputs = model_inputs(name)
    out = cx.run_logits(
        onnx_dir, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), adapter_path=adapter, session=session
    )
    return torch.from_numpy(next(iter(out.values())))


def err(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """rel_err on real tokens only (padded positions are not part of the function being compared)."""
    real = model_inputs(name)["attention_mask"].bool()
    return rel_err(got[real], ref[real])


def random_lora(name: str, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded LoRA factors in PEFT layout, A (r, in), B (out, r), large enough to move the outputs."""
    g, model = torch.Generator().manual_seed(seed), load_model(name)
    lora = {}
    for t in targets(name):
        out_f, in_f = features(model.get_submodule(t))
        lora[t] = (torch.randn(RANK, in_f, generator=g) / in_f**0.5, 0.05 * torch.randn(out_f, RANK, generator=g))
    return lora


def random_oft(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random orthogonal blocks (n, b, b) (QR of Gaussians) on every other target."""
    g, model = torch.Generator().manual_seed(seed), load_model(name)
    oft = {}
    for t in targets(name)[::2]:
        in_f = features(model.get_submodule(t))[1]
        oft[t] = torch.linalg.qr(torch.randn(in_f // BLOCK, BLOCK, BLOCK, generator=g)).Q
    return oft


def merged_lora(name: str, lora) -> torch.nn.Module:
    """W + s B A in nn.Linear layout (weight_out_in is a view, so Conv1D's (in, out) storage is updated)."""
    model = load_model(name)
    with torch.no_grad():
        for t, (A, B) in lora.items():
            weight_out_in(model.get_submodule(t)).add_(SCALING * B @ A)
    return model


def merged_oft(name: str, oft) -> torch.nn.Module:
    """W R^T with R = blockdiag(R_1..R_n)."""
    model = load_model(name)
    with torch.no_grad():
        for t, R in oft.items():
            W = weight_out_in(model.get_submodule(t))
            W.copy_(W @ torch.block_diag(*R).T)
    return model


@pytest.fixture(scope="module")
def merged_dirs(tmp_path_factory):
    dirs = {}
    for n in ALL_MODELS:
        dirs[n] = tmp_path_factory.mktemp(f"merged_{n}")
        cx.export_merged(MODELS / n, dirs[n])
    return dirs


@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory):
    dirs = {}
    for n in ALL_MODELS:
        out = tmp_path_factory.mktemp(f"split_{n}")
        cx.export_split(MODELS / n, out, lora_targets=targets(n), oft_targets={t: BLOCK for t in targets(n)})
        dirs[n] = out
    return dirs


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, split_dirs):
    """Per model: two LoRA adapter files (seeds 1, 2) and one OFT file, with their oracles' factors."""
    root, made = tmp_path_factory.mktemp("adapters"), {}
    for n in split_dirs:
        loras = {seed: random_lora(n, seed) for seed in (1, 2)}
        for seed, lora in loras.items():
            cx.write_adapter(root / f"{n}_lora{seed}.onnx_adapter", lora=lora, scaling=SCALING)
        oft = random_oft(n, 3)
        cx.write_adapter(root / f"{n}_oft.onnx_adapter", oft=oft)
        made[n] = {"root": root, "lora": loras, "oft": oft}
    return made


# ------------------------------------------------------------------------------------------------------ merged
@pytest.mark.parametrize("name", ALL_MODELS)
def test_merged_matches_transformers(name, merged_dirs):
    e = err(name, onnx_out(name, merged_dirs[name]), reference(name, load_model(name)))
    assert e < TOL, f"{name}: merged ONNX vs transformers float32 rel err {e:.2e} (tolerance {TOL})"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_merged_dir_is_complete(name, merged_dirs):
    files = {p.name for p in merged_dirs[name].iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files, files


def test_ort_generate_matches_transformers(merged_dirs):
    from optimum.onnxruntime import ORTModelForCausalLM

    tok = AutoTokenizer.from_pretrained(MODELS / "llama")
    ids = tok(["The red fox lives in the"], return_tensors="pt")
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    ort_model = ORTModelForCausalLM.from_pretrained(merged_dirs["llama"], provider="CPUExecutionProvider")
    got = ort_model.generate(**ids, **kwargs)
    want = AutoModelForCausalLM.from_pretrained(MODELS / "llama", dtype=torch.float32).eval().generate(**ids, **kwargs)
    assert got.shape[1] == ids["input_ids"].shape[1] + 5
    assert torch.equal(got, want), f"greedy tokens: ORTModelForCausalLM {got.tolist()} vs transformers {want.tolist()}"


# ------------------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("name", ALL_MODELS)
def test_split_without_adapter_is_base(name, split_dirs):
    e = err(name, onnx_out(name, split_dirs[name]), reference(name, load_model(name)))
    assert e < TOL, f"{name}: split ONNX, no adapter, vs base transformers rel err {e:.2e} (tolerance {TOL})"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_split_lora_matches_merged_weights(name, split_dirs, adapters):
    a = adapters[name]
    ref, base = reference(name, merged_lora(name, a["lora"][1])), reference(name, load_model(name))
    assert err(name, base, ref) > 1e-2, "the random LoRA must move the outputs, or this test proves nothing"
    e = err(name, onnx_out(name, split_dirs[name], a["root"] / f"{name}_lora1.onnx_adapter"), ref)
    assert e < TOL, f"{name}: split ONNX + LoRA adapter vs torch W + s·B·A rel err {e:.2e} (tolerance {TOL})"


@pytest.mark.parametrize("name", DECODERS)
def test_split_switches_adapters_on_one_session(name, split_dirs, adapters):
    a, session = adapters[name], cx.open_session(split_dirs[name])
    refs = {seed: reference(name, merged_lora(name, a["lora"][seed])) for seed in (1, 2)}
    refs[None] = reference(name, load_model(name))
    for seed in (1, 2, None, 1):
        path = None if seed is None else a["root"] / f"{name}_lora{seed}.onnx_adapter"
        e = err(name, onnx_out(name, split_dirs[name], path, session=session), refs[seed])
        assert e < TOL, f"{name}: adapter {seed} on a shared session vs torch merge rel err {e:.2e} (tol {TOL})"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_split_oft_matches_rotated_weights(name, split_dirs, adapters):
    a = adapters[name]
    ref, base = reference(name, merged_oft(name, a["oft"])), reference(name, load_model(name))
    assert err(name, base, ref) > 1e-2, "the random rotation must move the outputs, or this test proves nothing"
    e = err(name, onnx_out(name, split_dirs[name], a["root"] / f"{name}_oft.onnx_adapter"), ref)
    assert e < TOL, f"{name}: split ONNX + OFT adapter vs torch W R^T rel err {e:.2e} (tolerance {TOL})"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_describe_shows_overridable_inputs(name, split_dirs, adapters):
    record = json.loads(json.dumps(cx.describe(split_dirs[name])))
    expected = {f"{t}.{p}" for t in targets(name) for p in ("lora_A", "lora_B", "oft_R")}
    assert {o["name"] for o in record["overridable"]} == expected
    session_names = {i.name for i in cx.open_session(split_dirs[name]).get_overridable_initializers()}
    assert session_names == expected, "ORT must see every slot as an overridable initializer"
    slot = {o["name"]: o for o in record["overridable"]}
    first = targets(name)[0]
    assert slot[f"{first}.lora_A"]["shape"] == [64, f"{first}.rank"], "rank must be a symbolic dim"
    assert slot[f"{first}.lora_A"]["default_shape"] == [64, 0], "the default must be zero-rank"
    assert slot[f"{first}.oft_R"]["shape"] == [64 // BLOCK, BLOCK, BLOCK]
    assert record["opset"]["ai.onnx"] == cx.OPSET
    assert "input_ids" in {i["name"] for i in record["inputs"]} and record["outputs"][0]["name"] == "logits"


def test_write_adapter_layout(tmp_path):
    A, B = torch.randn(3, 8), torch.randn(5, 3)
    R = torch.linalg.qr(torch.randn(2, 4, 4)).Q
    info = cx.write_adapter(tmp_path / "a.onnx_adapter", lora={"m": (A, B)}, scaling={"m": 0.5}, oft={"o": R})
    assert info["parameters"] == {"m.lora_A": [8, 3], "m.lora_B": [3, 5], "o.oft_R": [2, 4, 4]}
    params = ort.AdapterFormat.read_adapter(str(tmp_path / "a.onnx_adapter")).get_parameters()
    np.testing.assert_array_equal(params["m.lora_A"].numpy(), A.T.numpy())
    np.testing.assert_allclose(params["m.lora_B"].numpy(), (0.5 * B).T.numpy(), rtol=1e-7)
    record = cx.describe(tmp_path / "a.onnx_adapter")
    assert record["parameters"]["o.oft_R"] == {"shape": [2, 4, 4], "dtype": "tensor(float)"}


def test_split_graph_defaults_are_zero_rank_and_identity(split_dirs):
    graph = onnx.load(str(split_dirs["llama"] / cx.MODEL_FILE)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    name = targets("llama")[0]
    assert inits[f"{name}.lora_A"].shape == (64, 0) and inits[f"{name}.lora_B"].shape[0] == 0
    np.testing.assert_array_equal(inits[f"{name}.oft_R"], np.tile(np.eye(BLOCK, dtype=np.float32), (4, 1, 1)))


def test_make_overridable_handles_external_data_and_renamed_initializers(tmp_path):
    """A graph whose parameter lost its name (found by value) and lives in model.onnx_data."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight, dummy = (rng.standard_normal(shape).astype(np.float32) for shape in ((64, 64), (64, 32)))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "onnx::MatMul_7"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "r"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(dummy, "onnx::MatMul_7")],
    )
    path = tmp_path / cx.MODEL_FILE
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", cx.OPSET)], ir_version=10)
    onnx.save(model, str(path), save_as_external_data=True, location=cx.EXTERNAL_DATA, size_threshold=0)
    slot = cx.Slot("m.lora_A", "m.base.lora_A", dummy, np.zeros((64, 0), np.float32), [64, "m.rank"])
    cx.make_overridable(path, [slot])
    assert (tmp_path / cx.EXTERNAL_DATA).is_file(), "external data must be rewritten, not dropped"
    session = cx.open_session(tmp_path)
    assert [i.name for i in session.get_overridable_initializers()] == ["m.lora_A"]
    x = np.ones((3, 64), np.float32)
    assert session.run(None, {"x": x})[0].shape == (3, 0), "the default is the zero-rank tensor"
    np.testing.assert_allclose(session.run(None, {"x": x, "m.lora_A": dummy})[0], x @ weight @ dummy, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "config, task",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "text-generation-with-past"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "text-generation-with-past"),
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "feature-extraction"),
        ({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}, "text-classification"),
    ],
)
def test_default_tasks(config, task):
    assert cx.resolve_task(config) == task


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UserInputError, match="model type 'mamba' is not supported"):
        cx.export_merged(tmp_path, tmp_path / "out")


def test_missing_config_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="no config.json"):
        cx.export_split(tmp_path, tmp_path / "out", lora_targets=["x"])


def test_block_size_not_dividing_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="does not divide in_features 64"):
        cx.export_split(MODELS / "llama", tmp_path, oft_targets={"model.layers.0.self_attn.q_proj": 24})


def test_unknown_target_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="no module named 'model.layers.9.q'"):
        cx.export_split(MODELS / "llama", tmp_path, lora_targets=["model.layers.9.q"])


def test_non_linear_target_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="not a linear layer"):
        cx.export_split(MODELS / "llama", tmp_path, lora_targets=["model.layers.0.mlp"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "bfloat16"}, "dtype 'bfloat16' is not supported"),
        ({"task": "fill-mask"}, "task 'fill-mask' is not available for llama"),
    ],
)
def test_bad_export_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        cx.export_merged(MODELS / "llama", tmp_path, **kwargs)


def test_bad_adapter_tensors_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="must be \\(r, in\\) and \\(out, r\\)"):
        cx.write_adapter(tmp_path / "a.onnx_adapter", lora={"m": (torch.zeros(3, 8), torch.zeros(5, 2))})
    with pytest.raises(UserInputError, match="expected blocks"):
        cx.write_adapter(tmp_path / "a.onnx_adapter", oft={"m": torch.zeros(4, 4)})
    with pytest.raises(UserInputError, match="no tensors"):
        cx.write_adapter(tmp_path / "a.onnx_adapter")


def test_a_model_past_protobufs_2_gb_skips_optimums_post_processing(tmp_path, monkeypatch):
    """optimum's post-processing re-serializes the whole model as one protobuf (to drop the duplicate of tied
    embeddings), which fails past 2 GB: a 1B Llama with tied embeddings crashed there ("Failed to serialize proto").
    Past the limit it is skipped; here the limit is lowered so the tiny tied GPT-2 takes that path (an export
    without optimum's post-processing) and still loads in ONNX Runtime and matches transformers (1e-4). The crash
    itself needs a real 2 GB model: benchmarks/scale.py --steps merge-onnx (docs/benchmarks.md)."""
    from psoft_export.merge import merge
    from tests.golden import ADAPTERS

    model = load_model("gpt2")
    assert not cx.too_big_for_post_process(model)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 1000)
    assert cx.too_big_for_post_process(model)
    info = merge(MODELS / "gpt2", ADAPTERS / "gpt2-psoft", tmp_path / "out", "onnx")
    assert info["verification"]["ok"], info["verification"]
    assert info["verification"]["outputs"]["logits"]["rel_err"] <= 1e-4
