"""Merged safetensors export, streamed: source shards in, merged shards out, one tensor at a time.

The model is never built. A meta-device skeleton of the class the in-memory route loads (``verify.load_base``)
names the output tensors. An adapted weight is read from the source files (``checkpoint.ModelSource``), widened to
float32 (what the in-memory route loads), handed to ``fold`` (the caller folds it with the adapter layer's own
math), cast to the output dtype and written straight into the output file, whose header is computed first from the
shapes; any other tensor is cast the same way, or, when its dtype does not change, its bytes are copied without
loading it. Peak memory: the adapter plus one adapted weight's working set (its float32 copy and the fold's
temporaries, about 4x the float32 weight for OFT); no shard is ever held.

The files are what ``save_pretrained`` writes for the same model, byte for byte (tests/test_stream.py): the same
tensor names (tied duplicates dropped, a task model's heads and prefixes as its class has them), the header in
safetensors' own order (dtype, then name) and padding, ``{"format": "pt"}`` metadata, config and generation config
from ``save_pretrained`` itself. The layout follows the source: a single ``model.safetensors`` stays one file; a
sharded source gives the same shard files, each tensor in the shard its source tensor was in, and an index.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from psoft_export.checkpoint import (
    INDEX,
    SINGLE,
    ModelSource,
    prefix_variants,
    read_header,
    st_dtype,
    unmap_freed_tensors,
)
from psoft_export.errors import UserInputError

# safetensors' serialization order (its Rust ``Dtype`` enum, highest first): tensors are laid out by dtype, then
# name. Checked against the library in tests/test_stream.py.
SERIALIZE_ORDER = (
    "U64",
    "I64",
    "F64",
    "C64",
    "F32",
    "U32",
    "I32",
    "BF16",
    "F16",
    "U16",
    "I16",
    "F8_E8M0",
    "F8_E4M3",
    "F8_E5M2",
    "I8",
    "U8",
    "F6_E3M2",
    "F6_E2M3",
    "F4",
    "BOOL",
)
ST_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# The source dtype an export keeps by default (float64 is not an export dtype: it is written as float32).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # --dtype
EXPORT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}
FLOATS = ("F64", "F32", "F16", "BF16")
METADATA = {"format": "pt"}


class NotStreamable(Exception):
    """The checkpoint cannot be exported tensor by tensor (e.g. the model class initializes a tensor the files do
    not hold): the caller takes the in-memory route, which does what ``from_pretrained`` does."""


@dataclass
class Entry:
    """One output tensor: where it comes from (a source key or a saved head tensor), its shape and dtype name."""

    key: str
    source_key: Optional[str]
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass
class OutFile:
    name: str
    entries: list[Entry] = field(default_factory=list)


def source_dtype(model_dir: Path) -> str:
    """The export dtype that keeps the source's: the floating dtype holding most of the checkpoint's bytes."""
    source = ModelSource(model_dir)
    sizes: dict[str, int] = {}
    for key in source.keys():
        if source.dtype(key) in FLOATS:
            sizes[source.dtype(key)] = sizes.get(source.dtype(key), 0) + _nbytes(source.shape(key), source.dtype(key))
    return EXPORT_DTYPES[max(sizes, key=sizes.get)] if sizes else "float32"


def output_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` that ``save_pretrained`` writes for ``model`` (meta device is fine): its state dict with
    tied duplicates dropped (the first registered name is kept, e.g. ``transformer.wte.weight`` over
    ``lm_head.weight``, which is the name transformers declares tied and drops)."""
    keep: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():  # keep_vars: tied names give one object
        if id(tensor) not in seen:
            seen.add(id(tensor))
            keep[key] = tuple(tensor.shape)
    return keep


def plan(model_dir: Path, model: nn.Module, dtype: str, extra: Mapping[str, torch.Tensor]) -> list[OutFile]:
    """The output files and their tensors, from the skeleton ``model`` and the source's headers; ``extra`` holds
    tensors that come from elsewhere (a classifier head saved with the adapter). Raises :class:`NotStreamable`."""
    source = ModelSource(model_dir)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out_dtype = ST_NAMES[{"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]]
    sharded = (Path(model_dir) / INDEX).is_file()
    keys = set(source.keys())
    files: dict[str, OutFile] = {}
    for key, shape in output_keys(model).items():
        if key in extra:
            src, file, src_dtype = None, None, ST_NAMES[extra[key].dtype]
            src_shape = tuple(extra[key].shape)
        else:
            src = next((k for k in prefix_variants(key, prefix) if k in keys), None)
            if src is None:
                raise NotStreamable(f"{model_dir} has no tensor {key}: transformers initializes it when loading")
            file, src_dtype, src_shape = source.file(src), source.dtype(src), source.shape(src)
        if src_shape != shape:
            raise UserInputError(
                f"{model_dir}: {src or key} has shape {src_shape}, the model's config says {shape}: "
                "the checkpoint does not match its config"
            )
        name = src_dtype if src_dtype not in FLOATS else out_dtype
        # a sharded source keeps its layout; a head saved with the adapter joins the last shard
        target = (file or source.files[-1]) if sharded else SINGLE
        files.setdefault(target, OutFile(target)).entries.append(Entry(key, src, shape, name, _nbytes(shape, name)))
    return [files[name] for name in sorted(files)]


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = torch.empty(0, dtype=st_dtype(dtype)).element_size()
    for d in shape:
        n *= d
    return n


def ordered(entries: list[Entry]) -> list[Entry]:
    """The order safetensors lays tensors out in a file: dtype (see :data:`SERIALIZE_ORDER`), then name."""
    return sorted(entries, key=lambda e: (SERIALIZE_ORDER.index(e.dtype), e.key))


def header(entries: list[Entry], metadata: Mapping[str, str] = METADATA) -> bytes:
    """The safetensors header (length prefix included) for ``entries`` in file order, as the library writes it:
    compact JSON, ``__metadata__`` first, padded with spaces to a multiple of 8 bytes."""
    body: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in ordered(entries):
        body[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


Chunk = tuple[Path, int, int]  # raw bytes to copy from a source file: (path, offset, nbytes)
COPY_CHUNK = 16 * 2**20


def _write_file(path: Path, entries: list[Entry], produce: Callable[[Entry], torch.Tensor | Chunk]) -> int:
    """Write one safetensors file, producing each tensor only when its turn comes (a tensor, or a byte range to
    copy unchanged from the source). Returns the data size."""
    total = 0
    with open(path, "wb") as f:
        f.write(header(entries))
        for e in ordered(entries):
            t = produce(e)
            if isinstance(t, tuple):
                _copy_bytes(f, *t)
            else:
                t = t.contiguous()
                if tuple(t.shape) != e.shape or ST_NAMES.get(t.dtype) != e.dtype:
                    raise RuntimeError(f"{e.key}: produced {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
                if e.nbytes:
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            total += e.nbytes
            del t
    return total


def _copy_bytes(out, path: Path, offset: int, nbytes: int) -> None:
    with open(path, "rb") as src:
        src.seek(offset)
        while nbytes:
            chunk = src.read(min(nbytes, COPY_CHUNK))
            if not chunk:
                raise UserInputError(f"{path} is truncated: re-download or re-save the model")
            out.write(chunk)
            nbytes -= len(chunk)


def _producer(
    source: ModelSource, fold: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], extra: Mapping[str, torch.Tensor]
) -> Callable[[Entry], torch.Tensor | Chunk]:
    """Each output tensor as the in-memory route computes it: loaded in float32, folded, cast. Where that is the
    identity (not adapted, same dtype in and out) the source bytes are copied, never loaded."""

    def produce(e: Entry) -> torch.Tensor | Chunk:
        if e.source_key is not None and e.key not in fold and source.dtype(e.source_key) == e.dtype:
            return source.span(e.source_key)
        t = extra[e.key] if e.source_key is None else source.tensor(e.source_key)
        if e.dtype not in FLOATS:
            return t
        if e.key in fold:
            return fold[e.key](t.to(torch.float32)).to(st_dtype(e.dtype))  # the fold runs in float32, as in memory
        if t.dtype == torch.float64:
            t = t.to(torch.float32)  # what the in-memory route loads: float64 rounds twice there, so here too
        return t.to(st_dtype(e.dtype))

    return produce


def write_config(model: nn.Module, out_dir: Path, dtype: str) -> None:
    """config.json and generation_config.json exactly as ``save_pretrained`` writes them for ``model`` in ``dtype``
    (it runs on the skeleton with an empty state dict; the empty weights file it leaves is removed)."""
    model.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    model.config.dtype = dtype
    model.save_pretrained(out_dir, state_dict={})
    (Path(out_dir) / SINGLE).unlink(missing_ok=True)


def export_merged(
    model_dir: Path,
    out_dir: Path,
    model: nn.Module,
    dtype: str,
    fold: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    extra: Optional[Mapping[str, torch.Tensor]] = None,
    files: Optional[list[OutFile]] = None,
) -> dict:
    """Write the merged model into the existing ``out_dir``: weights (``fold[key]`` applied to the float32 tensor
    of each adapted weight), an index when the source is sharded, config and generation config (tokenizer: the
    caller's). ``model`` is the meta-device skeleton; ``files`` a :func:`plan` already made. Returns
    ``{files, tensors, bytes}``."""
    unmap_freed_tensors()
    extra = extra or {}
    files = files if files is not None else plan(model_dir, model, dtype, extra)
    write_config(model, out_dir, dtype)
    produce = _producer(ModelSource(model_dir), fold, extra)
    total = 0
    for out in files:
        total += _write_file(Path(out_dir) / out.name, out.entries, produce)
    if (Path(model_dir) / INDEX).is_file():
        index = {
            "metadata": {"total_parameters": model.num_parameters(), "total_size": total},
            "weight_map": {e.key: out.name for out in files for e in out.entries},
        }
        (Path(out_dir) / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"files": [out.name for out in files], "tensors": sum(len(o.entries) for o in files), "bytes": total}


def describe(export_dir: Path) -> dict:
    """JSON-serializable summary of a safetensors model directory: per weight file its metadata and tensors
    (``{name, dtype, shape}`` in file order), and the index's weight map when there is one."""
    export_dir = Path(export_dir)
    names = sorted(p.name for p in export_dir.glob("*.safetensors"))
    out: dict = {"files": {}, "index": None}
    for name in names:
        _, head = read_header(export_dir / name)
        meta = head.pop("__metadata__", {})
        tensors = sorted(head.items(), key=lambda kv: kv[1]["data_offsets"][0])
        out["files"][name] = {
            "metadata": meta,
            "tensors": [{"name": k, "dtype": v["dtype"], "shape": v["shape"]} for k, v in tensors],
        }
    if (export_dir / INDEX).is_file():
        out["index"] = json.loads((export_dir / INDEX).read_text())["weight_map"]
    return out


# ------------------------------------------------------------------------------------------ the format interface
# (converters/__init__.py): merged and split exports of a model held in memory, and the export run in transformers.


def _save_hf(model: nn.Module, model_dir: Path, out: Path, dtype: str) -> None:
    from psoft_export.checkpoint import load_tokenizer

    model = model.to(DTYPES[dtype])
    model.config.dtype = dtype
    model.save_pretrained(out, max_shard_size="2GB")
    load_tokenizer(model_dir).save_pretrained(out)


def save_merged_hf(model: nn.Module, model_dir: Path, out: Path, dtype: str) -> None:
    """``merge_and_unload`` of a copy of ``model`` saved as an HF directory (the input of the other converters)."""
    import copy

    from psoft_export.adapters import merge_and_unload

    _save_hf(merge_and_unload(copy.deepcopy(model)), model_dir, out, dtype)


@contextlib.contextmanager
def merged_scratch(job, out: Path) -> Iterator[Path]:
    """The merged model as a float32 HF directory inside ``out``, for the converters that start from one (so an
    interrupt at any moment leaves nothing behind: the caller removes ``out`` whole); removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=".psoft-merged-", dir=out) as scratch:
        if job.scratch is not None:  # streamed: the model is never built here (psoft_export/streamed.py)
            job.scratch.write(Path(scratch))
        else:
            save_merged_hf(job.model, job.model_dir, Path(scratch), "float32")
        yield Path(scratch)


def write_merged(job, out: Path) -> list[str]:
    save_merged_hf(job.model, job.model_dir, out, job.dtype)
    return sorted(p.name for p in out.iterdir())


def write_split(job, out: Path) -> tuple[list[str], dict]:
    """``adapter/`` (the adapter files as trained) and, where it is exact or asked for, ``lora/`` (its LoRA form)."""
    import shutil

    from psoft_export import adapter_io
    from psoft_export.adapters import OftLinear, adapter_layers
    from psoft_export.peft_lora import write_lora_dir

    (out / "adapter").mkdir()
    for name in (adapter_io.CONFIG_FILE, adapter_io.WEIGHTS_FILE, adapter_io.META_FILE, adapter_io.OURS_FILE):
        if (job.adapter_dir / name).is_file():
            shutil.copy2(job.adapter_dir / name, out / "adapter" / name)
    if (job.adapter_dir / adapter_io.DECOMPOSITION_DIR).is_dir():
        shutil.copytree(job.adapter_dir / adapter_io.DECOMPOSITION_DIR, out / "adapter" / adapter_io.DECOMPOSITION_DIR)
    is_oft = any(isinstance(layer, OftLinear) for layer in adapter_layers(job.model).values())
    if is_oft and job.lora_rank is None:
        return ["adapter"], {}
    return ["adapter", "lora"], write_lora_dir(job.model, job.model_dir, job.adapter_dir, out / "lora", job.lora_rank)


def run(export_dir: Path, info: dict, inputs, kind: str, model_dir: Path) -> dict:
    """The export in transformers: the merged directory itself; a split one as ``adapter/`` loaded by our reader and
    ``lora/`` applied by an independent one (:func:`apply_lora_dir`)."""
    from psoft_export import adapter_io
    from psoft_export.models import load_base, torch_outputs

    if not info["split"]:
        model = load_base(export_dir, kind, info.get("classes"))
        return {"": torch_outputs(model.float(), inputs, kind)}
    out = {}
    if (export_dir / "adapter").is_dir():
        model = load_base(model_dir, kind, info.get("classes"), export_dir / "adapter")
        adapter_io.load_adapter(model, export_dir / "adapter", model_dir)
        out["[adapter/]"] = torch_outputs(model, inputs, kind)
    if (export_dir / "lora").is_dir():
        model = load_base(model_dir, kind, info.get("classes"), export_dir / "adapter")
        if kind == "classify":
            adapter_io.load_heads(model, export_dir / "adapter")
        apply_lora_dir(model, export_dir / "lora")
        out["[lora/]"] = torch_outputs(model, inputs, kind)
    return out


def apply_lora_dir(model: nn.Module, lora_dir: Path) -> None:
    """``W += (alpha / r) B A`` for every tensor pair of a PEFT LoRA directory (an independent reader)."""
    from safetensors.torch import load_file

    from psoft_export import adapter_io
    from psoft_export.adapters.layout import weight_out_in

    config = json.loads((lora_dir / adapter_io.CONFIG_FILE).read_text())
    tensors = load_file(lora_dir / adapter_io.WEIGHTS_FILE)
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key, A in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key[len(adapter_io.PREFIX) : -len(".lora_A.weight")]
                B = tensors[key.replace(".lora_A.", ".lora_B.")]
                W = weight_out_in(model.get_submodule(module))
                W.add_((scale * B.double() @ A.double()).to(W.dtype))
