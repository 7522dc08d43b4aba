"""Checks on the committed test fixtures built by ``fixtures/build.py``.

The fixtures are four tiny real Hugging Face checkpoints (llama, qwen2, gpt2, bert)
with decaying-spectrum weights, plus small JSONL data sets. These tests make sure they
load offline, run, look like trained weights, and are exactly what the build script
produces (so an accidental edit of a fixture file, or of the script, is caught).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

# Offline before transformers / huggingface_hub are imported (they read it at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODELS_DIR = FIXTURES / "models"
DATA_DIR = FIXTURES / "data"
MODEL_NAMES = ("llama", "qwen2", "gpt2", "bert")
DATA_FILES = ("train", "eval", "prompt_completion", "classify")

TOP_K = 8
MIN_TOP_K_ENERGY = 0.60
MIN_CONDITION = 20.0
MAX_FIXTURES_BYTES = 5 * 1024 * 1024


def _load_build_module():
    spec = importlib.util.spec_from_file_location("psoft_fixtures_build", FIXTURES / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _force_offline(mp: pytest.MonkeyPatch) -> None:
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants
    import transformers.utils.hub as tf_hub

    mp.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
    mp.setattr(tf_hub, "_is_offline_mode", True, raising=False)


@pytest.fixture(scope="module")
def loaded():
    """{name: (model, tokenizer)}, loaded once per module with the hub forced offline."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import is_offline_mode

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _force_offline(mp)
        assert is_offline_mode(), "HF offline mode could not be forced"
        for name in MODEL_NAMES:
            path = MODELS_DIR / name
            auto = AutoModelForMaskedLM if name == "bert" else AutoModelForCausalLM
            model = auto.from_pretrained(path)
            model.eval()
            tok = AutoTokenizer.from_pretrained(path)
            out[name] = (model, tok)
    return out


@pytest.fixture(scope="module")
def data():
    out = {}
    for split in DATA_FILES:
        path = DATA_DIR / f"{split}.jsonl"
        raw = path.read_bytes()
        assert raw.endswith(b"\n"), f"{path} must end with a newline"
        lines = raw.decode("utf-8").split("\n")[:-1]
        rows = []
        for i, line in enumerate(lines):
            assert line.strip(), f"{path}:{i + 1} is blank"
            rows.append(json.loads(line))
        out[split] = rows
    return out


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    build = _load_build_module()
    out_dir = tmp_path_factory.mktemp("fixtures_rebuild")
    paths = build.build_all(out_dir)
    return out_dir, paths


# ---------------------------------------------------------------------------
# Loading and running
# ---------------------------------------------------------------------------

EXPECTED_CLASSES = {
    "llama": ("LlamaForCausalLM", "PreTrainedTokenizerFast"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2TokenizerFast"),
    "gpt2": ("GPT2LMHeadModel", "GPT2TokenizerFast"),
    "bert": ("BertForMaskedLM", "BertTokenizerFast"),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_loads_offline_and_runs(name, loaded, data):
    model, tok = loaded[name]
    model_cls, tok_cls = EXPECTED_CLASSES[name]
    assert type(model).__name__ == model_cls
    assert type(tok).__name__ == tok_cls
    files = {p.name for p in (MODELS_DIR / name).iterdir()}
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert ("generation_config.json" in files) == (name != "bert")

    vocab = len(tok)
    assert 800 <= vocab <= 1100, f"unexpected vocab size {vocab}"
    assert model.config.vocab_size == vocab
    assert model.get_input_embeddings().weight.shape[0] == vocab
    assert model.get_output_embeddings().weight.shape[0] == vocab

    texts = [row["text"] for row in data["eval"][:3]]
    texts.append(data["prompt_completion"][0]["prompt"] + data["prompt_completion"][0]["completion"])
    for text in texts:
        enc = tok(text, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        assert set(enc) <= {"input_ids", "attention_mask", "token_type_ids"}
        if name != "bert":
            assert "token_type_ids" not in enc
        if name == "bert":
            assert tok.unk_token_id not in ids, f"[UNK] in {text!r}"
        with torch.no_grad():
            logits = model(**enc).logits
        assert logits.shape == (1, len(ids), vocab)
        assert torch.isfinite(logits).all(), f"non-finite logits for {name}"
        assert logits.std() > 0
        if name != "bert":
            assert tok.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_and_ids(loaded):
    # llama: Llama-3 style, bos prepended by the post-processor, no pad.
    model, tok = loaded["llama"]
    bos, eos = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert (model.config.bos_token_id, model.config.eos_token_id) == (bos, eos)
    assert model.config.pad_token_id is None
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (bos, eos)
    ids = tok("The fox.")["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1 and eos not in ids

    # qwen2: no bos in the tokenizer; <|endoftext|> is eos and pad.
    model, tok = loaded["qwen2"]
    eot, ims, ime = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert tok.bos_token is None
    assert tok.eos_token_id == tok.pad_token_id == eot
    assert {ims, ime} <= set(tok.all_special_ids) and tok.unk_token_id is None
    assert model.config.eos_token_id == model.config.pad_token_id == eot
    assert model.config.bos_token_id == eot  # as in the Qwen2 base checkpoints
    assert model.generation_config.eos_token_id == eot
    assert model.generation_config.pad_token_id == eot
    assert tok("The fox.")["input_ids"][0] != eot
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    # gpt2: <|endoftext|> is bos, eos and unk; no pad.
    model, tok = loaded["gpt2"]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_token_id == tok.eos_token_id == tok.unk_token_id == eot
    assert tok.pad_token is None
    assert model.config.bos_token_id == model.config.eos_token_id == eot
    assert model.generation_config.eos_token_id == eot

    # bert: lower-cased WordPiece with the five BERT specials.
    model, tok = loaded["bert"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = tok.convert_tokens_to_ids(specials)
    assert len(set(ids)) == 5 and ids[1] == tok.unk_token_id
    assert [tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token] == specials
    assert model.config.pad_token_id == tok.pad_token_id
    enc = tok("The RED Fox.")["input_ids"]
    assert enc[0] == tok.cls_token_id and enc[-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens(enc[1:-1]) == ["the", "red", "fox", "."]
    assert any(t.startswith("##") for t in tok.get_vocab())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_architecture_sizes(name, loaded):
    cfg = loaded[name][0].config
    if name in ("llama", "qwen2"):
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
        assert cfg.max_position_embeddings == 256 and cfg.tie_word_embeddings is False
        assert cfg.rope_theta == 10000
        if name == "llama":
            assert cfg.rms_norm_eps == 1e-5
    elif name == "gpt2":
        assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_positions) == (64, 2, 4, 256)
        mlp = loaded[name][0].transformer.h[0].mlp
        assert mlp.c_fc.weight.shape == (64, 256)
    else:
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
        assert (cfg.intermediate_size, cfg.max_position_embeddings) == (128, 256)


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def _target_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from transformers.pytorch_utils import Conv1D

    seen, out = set(), {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            w = module.weight
            if id(w) not in seen:
                seen.add(id(w))
                out[f"{name}.weight"] = w.detach()
    return out


EXPECTED_TARGETS = {"llama": 16, "qwen2": 16, "gpt2": 10, "bert": 16}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weight_spectrum_decays(name, loaded):
    model, _ = loaded[name]
    targets = _target_weights(model)
    assert len(targets) == EXPECTED_TARGETS[name], sorted(targets)
    for key, w in targets.items():
        assert w.ndim == 2 and w.dtype == torch.float32
        s = torch.linalg.svdvals(w.double())
        energy = float((s[:TOP_K] ** 2).sum() / (s**2).sum())
        cond = float(s[0] / s[-1])
        assert energy > MIN_TOP_K_ENERGY, (
            f"{name}:{key}: top-{TOP_K} singular values hold {energy:.3f} of the energy, need > {MIN_TOP_K_ENERGY}"
        )
        assert cond > MIN_CONDITION, f"{name}:{key}: s[0]/s[-1] = {cond:.1f}, need > {MIN_CONDITION}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_norm_weights_not_trivial(name, loaded):
    model, _ = loaded[name]
    norms = [
        m.weight.detach()
        for m in model.modules()
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
    ]
    assert norms, f"{name}: no norm layers found"
    for w in norms:
        assert not torch.all(w == 1), f"{name}: a norm weight is still all ones"
        assert 0.02 < float(w.std()) < 0.1 and abs(float(w.mean()) - 1) < 0.05


def test_gpt2_conv1d_and_tied_head(loaded):
    from transformers.pytorch_utils import Conv1D

    model, _ = loaded["gpt2"]
    for block in model.transformer.h:
        for mod in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(mod, Conv1D), type(mod)
        assert block.attn.c_attn.weight.shape == (64, 192)  # Conv1D stores (in, out)
        assert block.mlp.c_proj.weight.shape == (256, 64)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.transformer.wte.weight
    stored = load_file(str(MODELS_DIR / "gpt2" / "model.safetensors"))
    assert "lm_head.weight" not in stored
    assert torch.equal(stored["transformer.wte.weight"], model.lm_head.weight)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_decoder_heads_untied(name, loaded):
    model, _ = loaded[name]
    head, emb = model.lm_head.weight, model.model.embed_tokens.weight
    assert head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)
    stored = load_file(str(MODELS_DIR / name / "model.safetensors"))
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(stored)


# ---------------------------------------------------------------------------
# Reproducibility: rebuilding gives exactly the committed files
# ---------------------------------------------------------------------------


def test_build_all_returns_model_dirs(rebuilt):
    out_dir, paths = rebuilt
    assert set(paths) == set(MODEL_NAMES)
    for name, path in paths.items():
        assert Path(path) == out_dir / "models" / name and (Path(path) / "config.json").is_file()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rebuild_matches_committed_model(name, rebuilt):
    out_dir, _ = rebuilt
    committed, fresh = MODELS_DIR / name, out_dir / "models" / name
    committed_files = sorted(p.name for p in committed.iterdir() if p.is_file())
    fresh_files = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert committed_files == fresh_files
    for fname in committed_files:
        if fname == "model.safetensors":
            continue
        assert (committed / fname).read_bytes() == (fresh / fname).read_bytes(), (
            f"{name}/{fname} differs from a fresh build"
        )
    a = load_file(str(committed / "model.safetensors"))
    b = load_file(str(fresh / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{name}: tensor {key} differs from a fresh build"


def test_rebuild_matches_committed_data(rebuilt):
    out_dir, _ = rebuilt
    for split in DATA_FILES:
        rel = Path("data") / f"{split}.jsonl"
        assert (FIXTURES / rel).read_bytes() == (out_dir / rel).read_bytes(), f"{rel} differs"


def test_no_absolute_paths_in_saved_text_files():
    for path in MODELS_DIR.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt", ".jinja"):
            text = path.read_text(encoding="utf-8")
            assert str(FIXTURES) not in text and "/tmp/" not in text, path
            assert "_name_or_path" not in text, path


def test_fixtures_size_budget():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < MAX_FIXTURES_BYTES, f"fixtures/ is {total / 1e6:.2f} MB, budget 5 MB"


# ---------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------


def _check_text(value, where):
    assert isinstance(value, str) and value.strip() and value == value.strip("\n"), where


def test_text_datasets(data):
    for split, (lo, hi) in {"train": (600, 1000), "eval": (80, 150)}.items():
        rows = data[split]
        assert lo <= len(rows) <= hi, f"{split}: {len(rows)} rows"
        for i, row in enumerate(rows):
            assert set(row) == {"text"}, f"{split}:{i + 1} keys {sorted(row)}"
            _check_text(row["text"], f"{split}:{i + 1}")
            assert row["text"][0].isupper() and row["text"].endswith("."), row["text"]
    train = {r["text"] for r in data["train"]}
    assert not train & {r["text"] for r in data["eval"]}, "eval overlaps train"


def test_prompt_completion_dataset(data):
    rows = data["prompt_completion"]
    assert 200 <= len(rows) <= 400
    prompts = []
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "completion"}, f"line {i + 1}: keys {sorted(row)}"
        _check_text(row["prompt"], f"line {i + 1}")
        _check_text(row["completion"], f"line {i + 1}")
        assert row["prompt"].startswith("Q: ") and row["prompt"].endswith(" A:")
        assert row["completion"].startswith(" ") and row["completion"].endswith(".")
        prompts.append(row["prompt"])
    assert len(set(prompts)) == len(prompts), "duplicate prompts"


def test_classify_dataset_balanced(data):
    rows = data["classify"]
    assert 300 <= len(rows) <= 500
    for i, row in enumerate(rows):
        assert set(row) == {"text", "label"}, f"line {i + 1}: keys {sorted(row)}"
        _check_text(row["text"], f"line {i + 1}")
        assert type(row["label"]) is int and row["label"] in (0, 1), row
    counts = Counter(row["label"] for row in rows)
    assert counts[0] == counts[1] == len(rows) // 2, f"unbalanced labels {dict(counts)}"
    labels = [row["label"] for row in rows]
    assert labels != sorted(labels), "labels are not shuffled"
