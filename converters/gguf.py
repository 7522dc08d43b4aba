"""GGUF export for llama.cpp: a merged Hugging Face model as a GGUF file, a LoRA-form adapter as a GGUF
LoRA adapter, and the llama.cpp runtime call that ``verify`` needs.

What llama.cpp (as vendored by llama-cpp-python 0.3.36) expects, and how this module meets it:

- Architectures: HF ``model_type`` ``llama`` and ``mistral`` load as GGUF arch ``llama``, ``qwen2`` as
  ``qwen2``. Names come from gguf-py's tensor-name map (``gguf.get_tensor_name_map``, the map llama.cpp's own
  converter uses: ``model.layers.N.self_attn.q_proj`` -> ``blk.N.attn_q`` ...), read for the tensor kinds in
  ``WRITTEN`` and for the names of a ``...ForCausalLM`` checkpoint only (see :func:`gguf_tensor`).
- RoPE layout: llama.cpp runs the ``llama`` arch with "normal" (interleaved-pair) RoPE, while HF rotates
  the two halves of each head. Its converter therefore reorders the rows of ``q_proj``/``k_proj`` (and
  their biases) per head: ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}] -> [x_0, y_0, x_1, y_1, ...]``; for ``k``
  the head count is the KV head count. ``qwen2`` uses NeoX RoPE (same as HF): no reordering. A LoRA
  update ``B A`` of q/k needs the same row reordering on ``B``.
- Tied embeddings: ``output.weight`` is optional; when it is absent llama.cpp reuses ``token_embd``.
  We omit it when ``tie_word_embeddings`` is true (a duplicate would double the file for nothing).
- Numpy shapes are written reversed as ggml ``ne``: an ``(out, in)`` weight becomes ``ne = [in, out]``.
- Types: 1-D tensors (norms, biases) stay F32 in every file type, as llama.cpp's converter does. Q8_0 and
  Q4_0 need rows whose length is a multiple of 32; other 2-D tensors fall back to F16 (as llama.cpp's
  converter does for Q8_0). Q4_0 files keep the output head (``output.weight``, or ``token_embd.weight``
  when the head is tied) finer, as llama.cpp's ``llama-quantize`` does (``OUTPUT_TYPES``): it picks Q6_K
  there when rows are a multiple of 256, else Q8_0; gguf-py cannot quantize Q6_K, so we write Q8_0 (finer
  than Q6_K). An untied ``token_embd`` is Q4_0, as in ``llama-quantize``'s Q4_0 files.
- Tokenizer: byte-level BPE as ``tokenizer.ggml.model = "gpt2"`` with tokens in their byte-level
  spelling (``Ġthe``), merges as ``"a b"`` strings, and ``tokenizer.ggml.pre`` naming the pre-tokenizer
  regex; llama.cpp refuses unknown ``pre`` names, and a wrong one silently changes tokenization, so we
  pick it from the tokenizer.json regex by exact match (table ``PRE_TOKENIZER_NAMES``) and refuse others.
- LoRA adapter files: ``general.type = "adapter"``, ``adapter.type = "lora"``, float32
  ``adapter.lora.alpha``, ``general.architecture`` equal to the base's (else "model arch and LoRA arch
  mismatch"). ``<name>.weight.lora_a`` has numpy shape ``(r, in)`` and ``.lora_b`` ``(out, r)`` (PEFT
  layout, no transpose); llama.cpp checks ``a.ne[0] == in``, ``b.ne[1] == out`` and ``a.ne[1] == b.ne[0]``
  ("lora_a tensor is not transposed" otherwise) and scales by ``alpha / r`` with ``r`` read from
  ``lora_b`` (``alpha == 0`` means scale 1 there, so we refuse it).
- RoPE scaling: ``linear`` becomes ``rope.scaling.type/factor``; ``llama3`` becomes a ``rope_freqs.weight``
  tensor of per-frequency divisors (llama.cpp has no llama3 scaling key); other types are refused.
- Runtime: llama-cpp-python keeps logits only with ``logits_all=True``. Its default F16 KV cache limits
  agreement with float32 torch to about 1e-3 relative; with the F32 KV cache ``run_logits`` asks for, a
  float32 file agrees to about 4e-7. ``run_logits`` also turns off llama.cpp's extra buffer types (its
  runtime weight repacking): on CPUs with AMX (Sapphire Rapids and later, CI's among them) the AMX repack
  of Q8_0 tensors this small segfaults in ``llama_decode``; without it the same file evaluates normally.

Checked against llama.cpp's own ``convert_hf_to_gguf.py`` (tests, ``--runslow``): same tensors bit for bit
and the same tokenizer and hyper-parameter keys; it adds only ``general.name``/``size_label`` and
``tokenizer.ggml.add_sep_token``. Pitfalls met: that converter recognises byte-level tokenizers only by
the hash of one encoded test string, so it refuses our trained fixture tokenizers, and a tokenizer.json with
``byte_fallback`` is taken for a sentencepiece ("llama") vocab; safetensors' numpy backend cannot read
bfloat16 (we read through torch); ``GGUFWriter.add_tensor_info`` reads a ``uint8`` dtype as a byte shape
(we pass logical shapes with a float dtype); ``Llama(vocab_only=True)`` has no ``add_bos_token()``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFType, GGUFValueType, GGUFWriter, Keys, LlamaFileType, RopeScalingType, TokenType
from gguf.constants import GGML_QUANT_SIZES, GGML_QUANT_VERSION, MODEL_ARCH_NAMES
from gguf.constants import MODEL_TENSOR as T
from gguf.quants import quantize
from gguf.tensor_mapping import TensorNameMap, get_tensor_name_map

from psoft_export.checkpoint import ModelSource
from psoft_export.errors import UserInputError

# HF config.model_type -> GGUF architecture.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# GGUF architectures whose q/k rows llama.cpp expects in interleaved-pair RoPE order.
ROPE_PERMUTED_ARCHS = frozenset({"llama"})

# GGUF architecture name -> gguf-py's architecture (the key of its tensor-name map).
_ARCH_ENUMS = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}

# The tensor kinds we write (names from gguf-py's map; Qwen2 adds q/k/v biases, suffix ".bias"): the ones whose
# hyper-parameters _write_hparams writes. The map knows more per architecture (MoE experts, fused qkv): refused.
WRITTEN = frozenset(
    {T.TOKEN_EMBD, T.OUTPUT_NORM, T.OUTPUT, T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM}
    | {T.FFN_GATE, T.FFN_UP, T.FFN_DOWN}
)
# The kinds a LoRA adapter may target: the linear layers of a block.
LORA_TARGETS = frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN})

# HF tensors that carry no weights llama.cpp needs.
SKIPPED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")

# tokenizer.json Split regex -> llama.cpp `tokenizer.ggml.pre` whose built-in regex is the same
# expression (llama-vocab.cpp lists the original regex next to each pre-tokenizer type).
PRE_TOKENIZER_NAMES = {
    # Llama 3: digits in groups of up to three.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2: single digits.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}

# dtype argument -> (GGML type of 2-D weights, general.file_type).
DTYPES = {
    "float32": (QType.F32, LlamaFileType.ALL_F32),
    "float16": (QType.F16, LlamaFileType.MOSTLY_F16),
    "bfloat16": (QType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# 2-D type -> the type of the output head in that file type (llama-quantize: Q6_K, or Q8_0 when rows are not a
# multiple of 256; gguf-py 0.19 has no Q6_K quantizer, so Q8_0 always). Types absent here use their own type.
OUTPUT_TYPES = {QType.Q4_0: QType.Q8_0}


Transform = Callable[[torch.Tensor], torch.Tensor]  # a float32 HF tensor -> the tensor to write (same layout)


@dataclass
class _Planned:
    """One tensor to write: its GGUF name, logical numpy shape, GGML type, and how to load it (float32)."""

    name: str
    shape: tuple[int, ...]
    qtype: QType
    load: Callable[[], np.ndarray]


# ---------------------------------------------------------------- reading the HF directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserInputError(f"{path} not found: pass a Hugging Face model directory")
    return json.loads(path.read_text(encoding="utf-8"))


def _gguf_arch(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserInputError(
            f"GGUF export supports model_type {', '.join(sorted(ARCHITECTURES))}, not {model_type!r}: "
            "export this model to safetensors or ONNX instead"
        )
    return ARCHITECTURES[model_type]


# ---------------------------------------------------------------- names and layout


@functools.lru_cache(maxsize=None)
def _name_map(arch: str, n_blocks: int) -> TensorNameMap:
    return get_tensor_name_map(_ARCH_ENUMS[arch], n_blocks)


def gguf_tensor(arch: str, hf_module: str, n_blocks: int) -> tuple[T, str] | None:
    """The kind and GGUF base name of HF module ``hf_module`` (e.g. ``model.layers.0.self_attn.q_proj`` ->
    ``(ATTN_Q, "blk.0.attn_q")``) in a GGUF ``arch`` model of ``n_blocks`` blocks, from gguf-py's tensor-name map;
    None for a kind not in ``WRITTEN``, and for a name outside a ``...ForCausalLM`` checkpoint's ``model.*`` and
    ``lm_head``: the map also reads Meta's original names (whose q/k rows are interleaved already, so the rope
    permutation would scramble them) and a base-model checkpoint's (no LM head: llama.cpp would reuse the embedding).
    """
    if hf_module != "lm_head" and not hf_module.startswith("model."):
        return None
    block = re.match(r"^model\.layers\.(\d+)\.", hf_module)  # a block the config lacks is still named (checked later)
    found = _name_map(arch, max(n_blocks, int(block[1]) + 1 if block else 0)).get_type_and_name(hf_module)
    return found if found is not None and found[0] in WRITTEN else None


def interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection ``(n_heads * head_dim, ...)`` from HF's half-split RoPE order to
    llama.cpp's interleaved pairs: per head ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}] -> [x_0, y_0, x_1, ...]``.
    Works for weights ``(out, in)``, biases ``(out,)`` and LoRA ``B`` ``(out, r)``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(arch: str, config: dict[str, Any], kind: T) -> int | None:
    """Head count to reorder the rows of a ``kind`` tensor with, or None when it keeps its order."""
    if arch not in ROPE_PERMUTED_ARCHS:
        return None
    n_head = config["num_attention_heads"]
    if kind == T.ATTN_Q:
        return n_head
    if kind == T.ATTN_K:
        return config.get("num_key_value_heads", n_head)
    return None


def _storage_type(shape: tuple[int, ...], wanted: QType, output: bool = False) -> QType:
    """1-D tensors stay F32; the output head (``output``) takes ``OUTPUT_TYPES[wanted]`` where there is one; a block
    type needs rows that are a multiple of its block (else F16, like llama.cpp)."""
    if len(shape) < 2:
        return QType.F32
    wanted = OUTPUT_TYPES.get(wanted, wanted) if output else wanted
    block, _ = GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else QType.F16


def _nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def _encode(array: np.ndarray, qtype: QType) -> np.ndarray:
    if qtype == QType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == QType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


# ---------------------------------------------------------------- hyper-parameters


def _rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or None
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("default", None):
        return None
    if kind not in ("linear", "llama3"):
        raise UserInputError(f"GGUF export supports rope_scaling types linear and llama3, not {kind!r}")
    return scaling


def llama3_rope_factors(config: dict[str, Any], scaling: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors ``(head_dim/2,)`` of Llama 3 RoPE scaling; llama.cpp reads them as
    ``rope_freqs.weight`` (transformers computes the same from config at load time)."""
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / config.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def _write_hparams(writer: GGUFWriter, config: dict[str, Any], file_type: LlamaFileType) -> None:
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(int(file_type))
    scaling = _rope_scaling(config)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


# ---------------------------------------------------------------- tokenizer


def _check_byte_level_bpe(tok_json: dict[str, Any]) -> None:
    if tok_json.get("model", {}).get("type") != "BPE" or '"ByteLevel"' not in json.dumps(tok_json.get("pre_tokenizer")):
        raise UserInputError(
            "GGUF export supports byte-level BPE tokenizers (tokenizer.json) only: "
            "convert this model with llama.cpp's convert_hf_to_gguf.py"
        )


def _pre_tokenizer_name(tok_json: dict[str, Any]) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    regexes = [s["pattern"]["Regex"] for s in steps if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
    if not regexes and any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"  # ByteLevel's built-in split is GPT-2's regex, llama.cpp's "gpt-2".
    if len(regexes) == 1 and regexes[0] in PRE_TOKENIZER_NAMES:
        return PRE_TOKENIZER_NAMES[regexes[0]]
    raise UserInputError(
        "the tokenizer's pre-tokenizer regex matches no llama.cpp pre-tokenizer we know: "
        "convert this model with llama.cpp's convert_hf_to_gguf.py"
    )


def _vocab(tok_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (byte-level spelling) and their llama.cpp token types, padded to ``vocab_size``."""
    by_id = {i: t for t, i in tok_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise UserInputError(f"tokenizer has token id {max(by_id)} >= config vocab_size {vocab_size}: fix config.json")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i not in added:
            types.append(TokenType.NORMAL)
        else:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def _special_id(kind: str, tok_config: dict[str, Any], config: dict[str, Any], ids: dict[str, int]) -> int | None:
    """Id of the ``kind`` (bos/eos/pad) token: tokenizer_config.json first, then config.json."""
    value = tok_config.get(f"{kind}_token")
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str) and value in ids:
        return ids[value]
    value = config.get(f"{kind}_token_id")
    return value if isinstance(value, int) else None


def _adds_bos(tok_json: dict[str, Any], tok_config: dict[str, Any], bos_id: int | None) -> bool:
    """Whether encoding prepends BOS: tokenizer_config's flag, else the post-processor's template."""
    if "add_bos_token" in tok_config:
        return bool(tok_config["add_bos_token"])
    post = tok_json.get("post_processor") or {}
    for proc in post.get("processors", [post]):
        if proc.get("type") == "TemplateProcessing" and proc.get("single"):
            first = proc["single"][0].get("SpecialToken", {}).get("id")
            ids = proc.get("special_tokens", {}).get(first, {}).get("ids", [])
            return bos_id is not None and ids[:1] == [bos_id]
    return False


def _write_tokenizer(writer: GGUFWriter, model_dir: Path, config: dict[str, Any]) -> None:
    tok_json = _read_json(model_dir / "tokenizer.json")
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    _check_byte_level_bpe(tok_json)
    tokens, types = _vocab(tok_json, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]])
    ids = {t: i for i, t in enumerate(tokens)}
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id}
    special = {kind: _special_id(kind, tok_config, config, ids) for kind in adders}
    for kind, token_id in special.items():
        if token_id is not None:
            adders[kind](token_id)
    writer.add_add_bos_token(_adds_bos(tok_json, tok_config, special["bos"]))


# ---------------------------------------------------------------- export


def _tensor_order(name: str) -> tuple[int, int, str]:
    """Embeddings, then blocks in order, then the output head (the order llama.cpp's converter writes)."""
    block = re.match(r"^blk\.(\d+)\.", name)
    if block:
        return (1, int(block[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def tensor_names(hf_names: list[str], config: dict[str, Any], arch: str) -> list[tuple[str, str, int | None]]:
    """``(gguf name, hf name, rope heads or None)`` for each HF tensor that goes into the GGUF file; rope heads
    set means the rows are interleaved (:func:`interleave_rope_rows`)."""
    tied = bool(config.get("tie_word_embeddings", False))
    out = []
    for hf_name in hf_names:
        if SKIPPED_TENSORS.match(hf_name) or (tied and hf_name == "lm_head.weight"):
            continue
        module, _, suffix = hf_name.rpartition(".")
        found = gguf_tensor(arch, module, config["num_hidden_layers"]) if suffix in ("weight", "bias") else None
        if found is None:
            raise UserInputError(f"cannot map tensor {hf_name!r} to GGUF arch {arch!r}: export a plain HF checkpoint")
        out.append((f"{found[1]}.{suffix}", hf_name, _rope_heads(arch, config, found[0])))
    return out


def output_head(hf_names: list[str], config: dict[str, Any]) -> str | None:
    """The HF name of the tensor llama.cpp uses as the output head: ``lm_head.weight``, or the token embedding when
    the file has no ``output.weight`` (tied embeddings)."""
    names = {name: hf_name for name, hf_name, _ in tensor_names(hf_names, config, _gguf_arch(config))}
    return names.get("output.weight", names.get("token_embd.weight"))


def _plan(
    source: ModelSource, config: dict[str, Any], arch: str, wanted: QType, transform: Mapping[str, Transform]
) -> list[_Planned]:
    head = output_head(source.keys(), config)
    plan = [
        _Planned(
            name,
            source.shape(hf_name),
            _storage_type(source.shape(hf_name), wanted, output=hf_name == head),
            _loader(source, hf_name, heads, transform.get(hf_name)),
        )
        for name, hf_name, heads in tensor_names(source.keys(), config, arch)
    ]
    return sorted(plan + _extra_tensors(config), key=lambda p: _tensor_order(p.name))


class TensorComparison:
    """The tensor-by-tensor comparison of a merged GGUF file with expected HF tensors, fed one tensor at a time
    (:meth:`check`, e.g. while a verification pass holds it) and finished with a loader for the rest."""

    def __init__(self, gguf_path: Path, model_dir: Path, hf_names: list[str]) -> None:
        config = _read_json(Path(model_dir) / "config.json")
        self.path = gguf_path
        self.stored = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
        self.entries = {hf: (name, heads) for name, hf, heads in tensor_names(hf_names, config, _gguf_arch(config))}
        self.errors: dict[str, tuple[float, float]] = {}
        self.file = None

    def __enter__(self) -> "TensorComparison":
        self.file = open(self.path, "rb")  # read, not the reader's memory map: its touched pages would stay resident
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def check(self, hf_name: str, tensor: torch.Tensor) -> None:
        """Compare the file's tensor for ``hf_name`` (if the file holds one) with ``tensor``, a block of rows at a
        time (no tensor-sized float64 copies)."""
        from gguf.quants import dequantize

        if hf_name not in self.entries:
            return
        name, heads = self.entries[hf_name]
        if name not in self.stored:
            raise UserInputError(f"{self.path} has no tensor {name}: not a merge of this model")
        ref = tensor.detach().to(torch.float32).numpy()
        ref = ref if heads is None else interleave_rope_rows(ref, heads)
        ref = ref.reshape(ref.shape[0] if ref.ndim else 1, -1)
        t, diff, scale = self.stored[name], 0.0, 0.0
        row_bytes = t.n_bytes // ref.shape[0]
        self.file.seek(t.data_offset)
        for i in range(0, ref.shape[0], ROWS):
            rows = len(ref[i : i + ROWS])
            raw = np.fromfile(self.file, np.uint8, row_bytes * rows).reshape(rows, -1)
            got = dequantize(raw, t.tensor_type).reshape(ref[i : i + ROWS].shape)
            diff = max(diff, float(np.abs(got - ref[i : i + ROWS]).max(initial=0.0)))
            scale = max(scale, float(np.abs(ref[i : i + ROWS]).max(initial=0.0)))
        self.errors[name] = (diff / max(scale, 1e-30) if ref.size else 0.0, diff)

    def finish(self, load) -> dict[str, tuple[float, float]]:
        """Check every tensor not checked yet with ``load(hf_name)``; the errors by GGUF name."""
        for hf_name, (name, _) in self.entries.items():
            if name not in self.errors:
                self.check(hf_name, load(hf_name))
        return self.errors


ROWS = 1024  # rows per block when comparing a file's tensors


def _loader(
    source: ModelSource, hf_name: str, rope_heads: int | None, transform: Transform | None = None
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        tensor = source.tensor(hf_name).to(torch.float32)
        array = (tensor if transform is None else transform(tensor)).numpy()
        return array if rope_heads is None else interleave_rope_rows(array, rope_heads)

    return load


def _extra_tensors(config: dict[str, Any]) -> list[_Planned]:
    scaling = _rope_scaling(config)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return []
    factors = llama3_rope_factors(config, scaling)
    return [_Planned("rope_freqs.weight", factors.shape, QType.F32, lambda: factors)]


def export_model(
    model_dir: Path,
    out_path: Path,
    dtype: str = "float32",
    source: ModelSource | None = None,
    transform: Mapping[str, Transform] | None = None,
) -> dict[str, Any]:
    """Write the HF model in ``model_dir`` (config.json, tokenizer.json, safetensors) as GGUF ``out_path``.

    ``dtype``: float32 | float16 | bfloat16 | q8_0 | q4_0 for 2-D weights (1-D tensors stay float32; q4_0 keeps the
    output head Q8_0). Tensors are
    read and written one at a time: from ``source`` when given (another directory's weights), each widened to
    float32 and, where ``transform`` has its HF key, replaced by ``transform[key](tensor)`` (the streamed merge
    folds the adapter there). Returns ``{"arch", "tensors", "dtype", "bytes"}``.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in DTYPES:
        raise UserInputError(f"GGUF dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    config = _read_json(model_dir / "config.json")
    arch = _gguf_arch(config)
    wanted, file_type = DTYPES[dtype]
    plan = _plan(source or ModelSource(model_dir), config, arch, wanted, transform or {})
    writer = GGUFWriter(out_path, arch)
    writer.add_type(GGUFType.MODEL)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    _write_hparams(writer, config, file_type)
    _write_tokenizer(writer, model_dir, config)
    for p in plan:
        # A float dtype with raw_dtype makes gguf-py keep the logical shape (uint8 would mean bytes).
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in plan:
        try:
            writer.write_tensor_data(_encode(p.load(), p.qtype))
        except OSError as exc:  # numpy's tofile reports a short write without errno: on a file, the disk is full
            if exc.errno is None and "requested and" in str(exc):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_path)) from exc
            raise
    writer.close()
    return {"arch": arch, "tensors": len(plan), "dtype": dtype, "bytes": out_path.stat().st_size}


# ---------------------------------------------------------------- LoRA adapter


def _lora_base(arch: str, module: str, n_blocks: int) -> tuple[T, str]:
    found = gguf_tensor(arch, module, n_blocks)
    if found is None or found[0] not in LORA_TARGETS:
        raise UserInputError(
            f"cannot export a LoRA update of {module!r} to GGUF: llama.cpp adapters take the attention and "
            "MLP linear layers only; merge the update into the model instead"
        )
    return found


def _lora_arrays(
    module: str, a: torch.Tensor, b: torch.Tensor, weight_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Check ``A (r, in)`` and ``B (out, r)`` against the base weight ``(out, in)``; float32 numpy copies."""
    ok = a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1]
    if not ok or (b.shape[0], a.shape[1]) != tuple(weight_shape):
        raise UserInputError(
            f"LoRA factors of {module!r} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
            f"expected A (r, {weight_shape[1]}) and B ({weight_shape[0]}, r)"
        )
    as_np = lambda t: t.detach().to("cpu", torch.float32).contiguous().numpy()  # noqa: E731
    return as_np(a), as_np(b)


def export_lora_adapter(
    model_dir: Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, out_path: Path
) -> dict[str, Any]:
    """Write a llama.cpp LoRA adapter GGUF for the base model in ``model_dir``.

    ``lora`` maps HF module names (``model.layers.0.self_attn.q_proj``) to ``(A (r, in), B (out, r))`` in
    ``nn.Linear`` layout; the update is ``(alpha / r) B A``. Returns ``{"arch", "modules", "alpha", "bytes"}``.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not alpha > 0:
        raise UserInputError(f"LoRA alpha must be > 0, got {alpha} (llama.cpp reads 0 as scale 1)")
    config = _read_json(model_dir / "config.json")
    arch = _gguf_arch(config)
    source = ModelSource(model_dir)
    weights = set(source.keys())
    tensors = {}
    for module, (a, b) in lora.items():
        kind, base = _lora_base(arch, module, config["num_hidden_layers"])
        if f"{module}.weight" not in weights:
            raise UserInputError(f"LoRA module {module!r} has no weight in {model_dir}: check the module names")
        a_np, b_np = _lora_arrays(module, a, b, source.shape(f"{module}.weight"))
        heads = _rope_heads(arch, config, kind)
        tensors[f"{base}.weight"] = (a_np, b_np if heads is None else interleave_rope_rows(b_np, heads))
    writer = GGUFWriter(out_path, arch)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
    for name in sorted(tensors, key=_tensor_order):
        writer.add_tensor(f"{name}.lora_a", tensors[name][0])
        writer.add_tensor(f"{name}.lora_b", tensors[name][1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": arch, "modules": len(tensors), "alpha": float(alpha), "bytes": out_path.stat().st_size}


# ---------------------------------------------------------------- runtime and inspection


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserInputError("llama.cpp runtime missing: pip install llama-cpp-python==0.3.36") from exc
    return llama_cpp


@contextlib.contextmanager
def _no_weight_repacking(llama_cpp):
    """``Llama(...)`` built inside loads with ``use_extra_bufts = False`` (llama.cpp's ``--no-repack``), which
    ``Llama`` has no argument for: its model parameters come from ``llama_model_default_params``, wrapped here
    for the duration of the call (see the module docstring: AMX repacking segfaults on small Q8_0 tensors)."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def run_logits(gguf_path: Path, token_ids: list[int], lora_path: Path | None = None) -> np.ndarray:
    """llama.cpp's logits ``(n_tokens, vocab)`` float32 for ``token_ids`` (one sequence, no sampling),
    optionally with a LoRA adapter GGUF applied at scale 1. Uses an F32 KV cache (see module docstring)."""
    llama_cpp = _import_llama_cpp()
    with _no_weight_repacking(llama_cpp):
        llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            lora_path=None if lora_path is None else str(lora_path),
            logits_all=True,
            n_ctx=max(64, len(token_ids)),
            n_batch=max(64, len(token_ids)),
            n_threads=2,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            verbose=False,
        )
    try:
        llm.eval(list(token_ids))
        return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    finally:
        llm.close()


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and bytes -> JSON-serializable Python values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def describe(gguf_path: Path, max_array: int = 16) -> dict[str, Any]:
    """JSON-serializable summary of a GGUF file for golden records.

    ``metadata``: key -> value, sorted by key; arrays longer than ``max_array`` (token lists, merges) are
    recorded as ``{"array_len": n}``. ``tensors``: ``[{"name", "ne", "type"}]`` in file order, ``ne`` in
    ggml order (the numpy shape reversed).
    """
    reader = GGUFReader(gguf_path)
    metadata: dict[str, Any] = {}
    for key in sorted(reader.fields):
        field = reader.fields[key]
        if key.startswith("GGUF."):
            continue  # header fields (version, counts), not metadata
        if field.types[0] == GGUFValueType.ARRAY and len(field.data) > max_array:
            metadata[key] = {"array_len": len(field.data)}
        else:
            metadata[key] = _plain(field.contents())
    tensors = [{"name": t.name, "ne": [int(n) for n in t.shape], "type": t.tensor_type.name} for t in reader.tensors]
    return {"metadata": metadata, "tensors": tensors}


# ------------------------------------------------------------------------------------------ the format interface
# (converters/__init__.py): merged and split exports of a model held in memory, and the export run in llama.cpp.
# Merged GGUF is normally streamed (converters/gguf_stream.py); write_merged serves the models it cannot stream.


def write_merged(job, out: Path) -> list[str]:
    """The merged model's float32 HF directory (``safetensors.merged_scratch``) converted (``job.quant`` or dtype)."""
    from converters.safetensors import merged_scratch

    with merged_scratch(job, out) as scratch:
        export_model(scratch, out / "model.gguf", job.written_as)
    return sorted(p.name for p in out.iterdir())


def write_split(job, out: Path) -> tuple[list[str], dict]:
    """``model.gguf`` (the base; for a QOFT adapter the dequantized base it was trained over) and ``adapter.gguf``
    (the adapter's LoRA form, computed from the same weights)."""
    from psoft_export import quantized
    from psoft_export.adapters.lora import lora_form

    factors, alpha, errors = lora_form(job.model, job.lora_rank)
    base = quantized.base_transform(job.record, job.model_dir) if job.record is not None else None
    export_model(job.model_dir, out / "model.gguf", job.written_as, transform=base)
    export_lora_adapter(job.model_dir, factors, alpha, out / "adapter.gguf")
    return ["model.gguf", "adapter.gguf"], errors


def run(export_dir: Path, info: dict, inputs, kind: str, model_dir: Path) -> dict:
    """llama.cpp's logits for each input row (its real tokens; padded positions zero)."""
    adapter = export_dir / "adapter.gguf" if info["split"] else None
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        tokens = ids[mask.bool()].tolist()
        logits = run_logits(export_dir / "model.gguf", tokens, adapter)
        rows.append(np.pad(logits, ((0, ids.numel() - len(tokens)), (0, 0))))
    return {"": np.stack(rows)}
