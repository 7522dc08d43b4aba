"""converters/gguf.py: GGUF files run by llama.cpp (llama-cpp-python 0.3.36) against transformers float32
(the oracle), same token ids. Tolerances are relative to the output scale (``rel_err``) and were measured
first, then set a little above; each suite also shows that a wrong model exceeds them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import converters.gguf as gg
from psoft_export.errors import UserInputError
from tests.conftest import MODELS, load_model, rel_err, require
from tests.llama_cpp_tools import llama3_test_vectors, llama_cpp_source, run_converter, tiny_llama3_dir

# Fixed ids, BOS (id 0 in both fixtures) first.
TOKENS = [0, 17, 230, 5, 999, 42, 311, 8, 77, 640, 123, 2]
# dtype -> max relative error of llama.cpp (F32 KV cache) vs transformers float32. Measured on llama / qwen2:
# float32 3.1e-7 / 4.0e-7 (the brief's bar is 2e-3, which llama.cpp's default F16 KV cache needs),
# float16 4.8e-4 / 6.6e-4, bfloat16 4.1e-3 / 6.1e-3, q8_0 1.5e-2 / 1.7e-2, q4_0 1.95e-1 / 1.46e-1 (4-bit blocks on
# tiny random weights; the output head stays Q8_0).
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2, "q8_0": 2.5e-2, "q4_0": 2.5e-1}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TOL = 1e-5  # measured 5.6e-7 (llama) / 4.9e-7 (qwen2); the brief's bar is 2e-3
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def llama_cpp():
    return require("llama_cpp")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name, dtype)`` -> GGUF path of fixture ``name``, written once per module."""
    root, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(name: str, dtype: str = "float32") -> Path:
        if (name, dtype) not in cache:
            cache[name, dtype] = root / f"{name}-{dtype}.gguf"
            gg.export_model(MODELS / name, cache[name, dtype], dtype)
        return cache[name, dtype]

    return get


def torch_logits(model: torch.nn.Module, tokens: list[int] = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def gguf_logits(path: Path, lora: Path | None = None) -> torch.Tensor:
    return torch.from_numpy(gg.run_logits(path, TOKENS, lora))


def variant_dir(tmp_path: Path, name: str, config_update: dict, drop: tuple[str, ...] = ()) -> Path:
    """A copy of fixture ``name`` with config.json updated and tensors ``drop`` removed."""
    out = tmp_path / f"{name}-variant"
    shutil.copytree(MODELS / name, out)
    config = json.loads((out / "config.json").read_text()) | config_update
    (out / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(out / "model.safetensors").items() if k not in drop}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------- whole-model export


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_logits_match_transformers(llama_cpp, exported, name, dtype):
    err = rel_err(gguf_logits(exported(name, dtype)), torch_logits(load_model(name)))
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{name} {dtype}: llama.cpp vs transformers float32 rel err {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_tolerances_catch_a_wrong_model(llama_cpp, exported, name):
    """A 10% change of one o_proj (measured 4.7e-2 / 6.5e-2) exceeds every dtype's tolerance: the tests above
    can fail. (A 2% change gives 1e-2 / 1.3e-2: beyond the float32/float16 bars, within q8_0's.)"""
    model = load_model(name)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(1.1)
    err = rel_err(gguf_logits(exported(name)), torch_logits(model))
    bar = max(t for dtype, t in TOLERANCE.items() if dtype != "q4_0")
    assert err > bar, f"{name}: perturbed model rel err {err:.2e} should exceed the tolerances up to q8_0's"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_q4_0_tolerance_catches_a_wrong_model(llama_cpp, exported, name):
    """q4_0's bar is wide (4-bit weights): the q4_0 file against a model with one o_proj doubled (measured 4.3e-1 /
    5.2e-1) exceeds it, and against the right model (test above) it does not."""
    model = load_model(name)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(2.0)
    err = rel_err(gguf_logits(exported(name, "q4_0")), torch_logits(model))
    assert err > TOLERANCE["q4_0"], f"{name}: q4_0 file vs perturbed model rel err {err:.2e} <= {TOLERANCE['q4_0']}"


def test_q4_0_types_follow_llama_quantize(llama_cpp, exported, tmp_path):
    """Q4_0 for the 2-D weights and an untied token embedding, Q8_0 for the output head (the tied embedding when
    there is no output.weight), F32 for 1-D tensors, F16 for rows that are not a multiple of 32; each tensor holds
    exactly gguf-py's Q4_0 rounding of the source (the rounded reference verification uses)."""
    from converters.gguf_stream import round_as_written

    types = {t["name"]: t["type"] for t in gg.describe(exported("llama", "q4_0"))["tensors"]}
    assert types["token_embd.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert gg.describe(exported("llama", "q4_0"))["metadata"]["general.file_type"] == 2  # MOSTLY_Q4_0
    tied_dir = variant_dir(tmp_path, "llama", {"tie_word_embeddings": True}, drop=("lm_head.weight",))
    gg.export_model(tied_dir, tmp_path / "tied.gguf", "q4_0")
    assert {t["name"]: t["type"] for t in gg.describe(tmp_path / "tied.gguf")["tensors"]}["token_embd.weight"] == "Q8_0"
    assert gg._storage_type((8, 48), gg.QType.Q4_0) == gg.QType.F16
    source = load_file(MODELS / "llama" / "model.safetensors")
    stored = {t.name: t for t in GGUFReader(exported("llama", "q4_0")).tensors}
    from gguf.quants import dequantize

    for name, hf_name in [
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("output.weight", "lm_head.weight"),
    ]:
        got = torch.from_numpy(dequantize(stored[name].data, stored[name].tensor_type).reshape(source[hf_name].shape))
        assert torch.equal(got, round_as_written(source[hf_name], "q4_0", output=name == "output.weight")), name


def test_qk_permutation_matters(llama_cpp, monkeypatch, tmp_path):
    """Without llama.cpp's interleaved-RoPE row order for q/k, the llama export is wrong."""
    monkeypatch.setattr(gg, "ROPE_PERMUTED_ARCHS", frozenset())
    gg.export_model(MODELS / "llama", tmp_path / "unpermuted.gguf")
    err = rel_err(gguf_logits(tmp_path / "unpermuted.gguf"), torch_logits(load_model("llama")))
    assert err > 100 * TOLERANCE["float32"], f"unpermuted q/k rel err {err:.2e} should be far above tolerance"


def test_tied_embeddings_omit_output(llama_cpp, tmp_path):
    model_dir = variant_dir(tmp_path, "llama", {"tie_word_embeddings": True}, drop=("lm_head.weight",))
    gg.export_model(model_dir, tmp_path / "tied.gguf")
    names = [t["name"] for t in gg.describe(tmp_path / "tied.gguf")["tensors"]]
    assert "output.weight" not in names and "token_embd.weight" in names
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    err = rel_err(gguf_logits(tmp_path / "tied.gguf"), torch_logits(model))
    assert err <= TOLERANCE["float32"], f"tied llama: llama.cpp vs transformers rel err {err:.2e} > 1e-5"


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },  # wavelengths fall in all three llama3 regimes
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling(llama_cpp, tmp_path, scaling):
    model_dir = variant_dir(tmp_path, "llama", {"rope_scaling": scaling})
    gg.export_model(model_dir, tmp_path / "scaled.gguf")
    scaled = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got, want = gguf_logits(tmp_path / "scaled.gguf"), torch_logits(scaled)
    err = rel_err(got, want)
    assert err <= TOLERANCE["float32"], f"{scaling['rope_type']}: llama.cpp vs transformers rel err {err:.2e} > 1e-5"
    unscaled = rel_err(want, torch_logits(load_model("llama")))
    assert unscaled > 100 * TOLERANCE["float32"], f"scaling changes logits by only {unscaled:.2e}: test is blind"


def test_unknown_rope_scaling_is_refused(tmp_path):
    model_dir = variant_dir(tmp_path, "llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(UserInputError, match="rope_scaling"):
        gg.export_model(model_dir, tmp_path / "x.gguf")


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_tokenizer_matches_hf(llama_cpp, exported, name):
    """llama.cpp tokenizes with our tokens, merges, pre-tokenizer and BOS flag as transformers does
    (add_bos=True means "add special tokens": llama.cpp then prepends BOS only if the file says so)."""
    tok = AutoTokenizer.from_pretrained(MODELS / name)
    llm = llama_cpp.Llama(model_path=str(exported(name)), vocab_only=True, verbose=False)
    texts = ["The red fox lives in the north forest and eats berries.", "A small grey owl sleeps 12345 times!\n\n ok"]
    try:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=True) == tok(text)["input_ids"], text
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_unsupported_architectures_are_refused(tmp_path, name):
    with pytest.raises(UserInputError, match="llama, mistral, qwen2"):
        gg.export_model(MODELS / name, tmp_path / "x.gguf")


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="q4_0"):
        gg.export_model(MODELS / "llama", tmp_path / "x.gguf", dtype="q5_k")


def test_describe_structure(exported):
    desc = gg.describe(exported("qwen2", "q8_0"))
    json.dumps(desc)  # serializable
    meta = desc["metadata"]
    assert list(meta) == sorted(meta)
    assert meta["general.architecture"] == "qwen2" and meta["general.file_type"] == 7
    assert meta["qwen2.block_count"] == 2 and meta["qwen2.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.tokens"] == {"array_len": 1000}
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.add_bos_token"] is False
    tensors = {t["name"]: t for t in desc["tensors"]}
    assert len(tensors) == 3 + 2 * 12  # embd, norm, output; 9 weights + 3 q/k/v biases per block
    assert tensors["blk.0.attn_k.weight"] == {"name": "blk.0.attn_k.weight", "ne": [64, 32], "type": "Q8_0"}
    assert tensors["blk.1.attn_q.bias"]["type"] == "F32" and tensors["output_norm.weight"]["type"] == "F32"


# ---------------------------------------------------------------- LoRA adapters


def random_lora(name: str, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded rank-4 factors on every linear layer of every block; ||(alpha/r) B A||_F is ~10% of ||W||_F."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for module_name, module in load_model(name).named_modules():
        if module_name.rpartition(".")[2] in LORA_TARGETS:
            out_f, in_f = module.weight.shape
            lora[module_name] = (
                torch.randn(RANK, in_f, generator=g) / in_f**0.5,
                torch.randn(out_f, RANK, generator=g) * 0.005,
            )
    return lora


def merged_model(name: str, lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.nn.Module:
    model = load_model(name)
    with torch.no_grad():
        for module_name, (a, b) in lora.items():
            model.get_submodule(module_name).weight.add_((ALPHA / RANK) * b @ a)
    return model


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_lora_adapter_matches_merged_model(llama_cpp, exported, tmp_path, name):
    lora = random_lora(name)
    summary = gg.export_lora_adapter(MODELS / name, lora, ALPHA, tmp_path / "lora.gguf")
    assert summary["modules"] == 14
    want = torch_logits(merged_model(name, lora))
    err = rel_err(gguf_logits(exported(name), tmp_path / "lora.gguf"), want)
    assert err <= LORA_TOL, f"{name}: llama.cpp base+adapter vs transformers merged rel err {err:.2e} > {LORA_TOL:.0e}"
    effect = rel_err(torch_logits(load_model(name)), want)
    assert effect > 100 * LORA_TOL, f"{name}: the adapter changes logits by only {effect:.2e}: test is blind"


def test_lora_b_permutation_matters(llama_cpp, exported, monkeypatch, tmp_path):
    lora = random_lora("llama")
    monkeypatch.setattr(gg, "ROPE_PERMUTED_ARCHS", frozenset())
    gg.export_lora_adapter(MODELS / "llama", lora, ALPHA, tmp_path / "lora.gguf")
    err = rel_err(gguf_logits(exported("llama"), tmp_path / "lora.gguf"), torch_logits(merged_model("llama", lora)))
    assert err > 100 * LORA_TOL, f"unpermuted lora_b rel err {err:.2e} should be far above {LORA_TOL:.0e}"


def test_lora_adapter_metadata(tmp_path):
    gg.export_lora_adapter(MODELS / "llama", random_lora("llama"), ALPHA, tmp_path / "lora.gguf")
    desc = gg.describe(tmp_path / "lora.gguf")
    meta = desc["metadata"]
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == ALPHA
    tensors = {t["name"]: t["ne"] for t in desc["tensors"]}
    assert tensors["blk.0.attn_k.weight.lora_a"] == [64, RANK]  # numpy (r, in)
    assert tensors["blk.0.attn_k.weight.lora_b"] == [RANK, 32]  # numpy (out, r)
    assert tensors["blk.1.ffn_down.weight.lora_a"] == [128, RANK]


@pytest.mark.parametrize("module", ["lm_head", "model.embed_tokens", "model.norm", "model.layers.0.mlp"])
def test_unmappable_lora_module_is_refused(tmp_path, module):
    lora = {module: (torch.zeros(RANK, 64), torch.zeros(1000, RANK))}
    with pytest.raises(UserInputError, match="cannot export a LoRA update"):
        gg.export_lora_adapter(MODELS / "llama", lora, ALPHA, tmp_path / "x.gguf")


def test_bad_lora_input_is_refused(tmp_path):
    bad = {"model.layers.0.self_attn.k_proj": (torch.zeros(RANK, 64), torch.zeros(64, RANK))}
    with pytest.raises(UserInputError, match=r"expected A \(r, 64\) and B \(32, r\)"):
        gg.export_lora_adapter(MODELS / "llama", bad, ALPHA, tmp_path / "x.gguf")
    missing = {"model.layers.7.self_attn.q_proj": (torch.zeros(RANK, 64), torch.zeros(64, RANK))}
    with pytest.raises(UserInputError, match="has no weight"):
        gg.export_lora_adapter(MODELS / "llama", missing, ALPHA, tmp_path / "x.gguf")
    with pytest.raises(UserInputError, match="alpha must be > 0"):
        gg.export_lora_adapter(MODELS / "llama", random_lora("llama"), 0.0, tmp_path / "x.gguf")


def test_missing_runtime_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(UserInputError, match=r"pip install llama-cpp-python==0\.3\.36"):
        gg.run_logits(Path("x.gguf"), TOKENS)


# ---------------------------------------------------------------- llama.cpp's own converter (slow)


@pytest.mark.slow
def test_llama_cpp_converter_agrees(llama_cpp, tmp_path):
    """convert_hf_to_gguf.py (oracle 2) on a tiny Llama with a real Llama-3 tokenizer: same tokenizer data and
    tensors as ours, llama.cpp logits of both match transformers, and llama.cpp tokenizes our file as its
    llama-bpe test vectors say."""
    src = llama_cpp_source()
    if src is None:
        pytest.skip("pip download of the llama-cpp-python sdist failed (offline?)")
    model_dir = tiny_llama3_dir(src, tmp_path / "tiny-llama3")
    run_converter(src, model_dir, tmp_path / "theirs.gguf")
    gg.export_model(model_dir, tmp_path / "ours.gguf")
    assert_same_tokenizer_data(tmp_path / "theirs.gguf", tmp_path / "ours.gguf")
    tokens = [128000, 791, 2579, 39935, 6439, 304, 279, 10411, 13, 128001, 15, 220]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = torch_logits(model, tokens)
    theirs = torch.from_numpy(gg.run_logits(tmp_path / "theirs.gguf", tokens))
    ours = torch.from_numpy(gg.run_logits(tmp_path / "ours.gguf", tokens))
    tol = TOLERANCE["float32"]
    assert rel_err(theirs, want) <= tol, f"convert_hf_to_gguf vs transformers rel err {rel_err(theirs, want):.2e}"
    assert rel_err(ours, want) <= tol, f"export_model vs transformers rel err {rel_err(ours, want):.2e} > {tol:.0e}"
    assert rel_err(ours, theirs) <= 1e-6, f"export_model vs convert_hf_to_gguf rel err {rel_err(ours, theirs):.2e}"
    llm = llama_cpp.Llama(model_path=str(tmp_path / "ours.gguf"), vocab_only=True, verbose=False)
    try:
        for text, ids in llama3_test_vectors(src):
            assert llm.tokenize(text.encode(), add_bos=False) == ids, f"llama.cpp on our GGUF: {text!r}"
    finally:
        llm.close()


def assert_same_tokenizer_data(theirs: Path, ours: Path) -> None:
    """Tokenizer keys both files carry hold the same values (tokens, types, merges, pre, special ids)."""
    a, b = GGUFReader(theirs).fields, GGUFReader(ours).fields
    keys = sorted(k for k in a.keys() & b.keys() if k.startswith("tokenizer."))
    assert "tokenizer.ggml.merges" in keys and "tokenizer.ggml.pre" in keys, keys
    for key in keys:
        assert a[key].contents() == b[key].contents(), f"{key}: convert_hf_to_gguf and export_model differ"
