"""llama.cpp's own converter as an independent oracle for our GGUF files (used by slow tests).

``convert_hf_to_gguf.py`` recognises tokenizers only by the hash of a fixed test string's encoding, so our
trained fixture tokenizers are refused; a real Llama-3 tokenizer rebuilt from the sdist's
``models/ggml-vocab-llama-bpe.gguf`` is accepted ("llama-bpe"). Helpers:

- ``llama_cpp_source()``: the llama-cpp-python sdist's ``vendor/llama.cpp`` (pip download, cached).
- ``tiny_llama3_dir(src, out_dir)``: a tiny random ``LlamaForCausalLM`` with that tokenizer, saved as HF.
- ``run_converter(src, model_dir, out_path)``: ``convert_hf_to_gguf.py`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path.home() / ".cache" / "psoft-export" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


def llama_cpp_source(cache: Path = CACHE) -> Path | None:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist, downloaded once with pip; None if pip fails."""
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        "-d",
        str(cache),
    ]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        return None
    tarballs = sorted(cache.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not tarballs:
        return None
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(cache, filter="data")
    return root if (root / "convert_hf_to_gguf.py").is_file() else None


# Llama 3's tokenizer.json settings (meta-llama/Meta-Llama-3-8B), which the GGUF vocab does not carry.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def _as_llama3(spec: dict, bos: str, bos_id: int) -> dict:
    """tokenizer.json of the GGUF rebuild, set up as Llama 3's: its Split regex, pure byte-level BPE."""
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            BYTE_LEVEL,
        ],
    }
    spec["decoder"] = dict(BYTE_LEVEL, add_prefix_space=True, use_regex=True)
    spec["model"].update(byte_fallback=False, ignore_merges=True, fuse_unk=False)
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    return spec


def llama3_tokenizer(src: Path):
    """The Llama-3 tokenizer rebuilt from llama.cpp's ``models/ggml-vocab-llama-bpe.gguf``.

    ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` gives the right vocab and merges but a hybrid
    pipeline (GPT-2 regex, byte fallback, a ``LlamaTokenizerFast`` that saves a bogus ``tokenizer.model``),
    which convert_hf_to_gguf.py then converts as a sentencepiece ("llama") vocab. We restore Llama 3's
    tokenizer.json settings and wrap it as ``PreTrainedTokenizerFast`` (tokenizer.json only), as Meta ships
    it; ``check_llama3_tokenizer`` verifies the result against llama.cpp's own tokenizer test vectors.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = src / "models" / "ggml-vocab-llama-bpe.gguf"
    rebuilt = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    spec = _as_llama3(json.loads(rebuilt.backend_tokenizer.to_str()), rebuilt.bos_token, rebuilt.bos_token_id)
    backend = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=rebuilt.bos_token, eos_token="<|end_of_text|>")


def llama3_test_vectors(src: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for llama-bpe: (text, ids without BOS)."""
    stem = src / "models" / "ggml-vocab-llama-bpe.gguf"
    texts = Path(f"{stem}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = Path(f"{stem}.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


def check_llama3_tokenizer(src: Path, tok) -> None:
    """Raise AssertionError unless ``tok`` reproduces llama.cpp's llama-bpe test vectors."""
    for text, want in llama3_test_vectors(src):
        got = tok(text, add_special_tokens=False)["input_ids"]
        assert got == want, f"rebuilt Llama-3 tokenizer: {text!r} -> {got}, llama.cpp expects {want}"


def tiny_llama3_dir(src: Path, out_dir: Path, seed: int = 0) -> Path:
    """A random tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) with the real Llama-3 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama3_tokenizer(src)
    check_llama3_tokenizer(src, tok)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits; widen them so errors show
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4.0)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def run_converter(src: Path, model_dir: Path, out_path: Path, outtype: str = "f32") -> None:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` (with its bundled gguf-py) on ``model_dir``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src)]))
    cmd = [
        sys.executable,
        str(src / "convert_hf_to_gguf.py"),
        str(model_dir),
        "--outfile",
        str(out_path),
        "--outtype",
        outtype,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{result.stderr[-4000:]}")
