"""``psoft-export merge``: fold the rotations into the weights, or split base and adapter, and export.

Routes (``converters/`` does the format work, this module decides what goes where):

============  =================================================  ====================================================
``--to``      merged (default)                                   ``--split``
============  =================================================  ====================================================
safetensors   a complete HF model directory, no adapter trace    ``adapter/`` (the PEFT adapter) and, for PSOFT,
                                                                 ``lora/`` (its exact LoRA form, a PEFT LoRA dir)
onnx          optimum export, decoders with the KV cache         ``model.onnx`` with adapter inputs +
                                                                 ``adapter.onnx_adapter`` (ORT adapter format)
gguf          ``model.gguf`` (f32, f16, q8_0, q4_0)              ``model.gguf`` (base) + ``adapter.gguf`` (LoRA)
============  =================================================  ====================================================

OFT's update ``W (R^T - I)`` is full rank: a LoRA-only target (GGUF and the safetensors LoRA form) is refused
unless ``--lora-rank K`` asks for a truncated-SVD approximation, whose error is reported. Every export is
written to a temporary directory, verified in its runtime (unless ``--no-verify``) and only then renamed; an
export that fails verification is kept as ``OUT.unverified`` (``strict``: removed).

Merged safetensors and GGUF are streamed (``converters/safetensors.py``, ``converters/gguf_stream.py``): the model
is never built, each weight is read, folded by its adapter layer alone (:func:`psoft_export.adapters.fold_weight`) and
written (safetensors: in the source's dtype unless ``dtype`` says otherwise). Other routes build the float32 model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from psoft_export import __version__, adapter_io, quantized
from psoft_export.adapters import (
    OftLinear,
    adapter_layers,
    merge_and_unload,
)
from psoft_export.adapters.lora import approximated_model, lora_form  # noqa: F401  (re-exported)
from psoft_export.atomic import MARKER, atomic_output_dir, check_output_dir, mark
from psoft_export.checkpoint import INDEX, SINGLE, load_config, load_tokenizer
from psoft_export.errors import UserInputError, VerificationError
from psoft_export.models import model_kind, reference_model
from psoft_export.peft_lora import peft_lora_config, write_lora_dir  # noqa: F401  (re-exported)
from psoft_export.streamed import Stream, stream_plan
from psoft_export.verification import EXPORT_FILE, EXPORT_FORMAT, trained_model_gap, verify_export

FORMATS = ("safetensors", "onnx", "gguf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SOURCE = "source"  # --dtype default: the source's dtype where the route keeps it (merged safetensors), else float32
UNVERIFIED = ".unverified"  # suffix of the directory a failed verification leaves the export in
QUANTS = ("q8_0", "q4_0")
GGUF_TYPES = ("llama", "mistral", "qwen2")
STREAMED = ("safetensors", "gguf")  # merged exports written tensor by tensor from the source files
ADAPTER_FILES = (adapter_io.CONFIG_FILE, adapter_io.WEIGHTS_FILE, adapter_io.META_FILE, adapter_io.OURS_FILE)


# ------------------------------------------------------------------------------------------ routes


def _save_hf(model: nn.Module, model_dir: Path, out: Path, dtype: str) -> None:
    model = model.to(DTYPES[dtype])
    model.config.dtype = dtype
    model.save_pretrained(out, max_shard_size="2GB")
    load_tokenizer(model_dir).save_pretrained(out)


def _merged_hf(model: nn.Module, model_dir: Path, out: Path, dtype: str) -> None:
    import copy

    _save_hf(merge_and_unload(copy.deepcopy(model)), model_dir, out, dtype)


def _merged(to: str, model, model_dir: Path, tmp: Path, dtype: str, quant: Optional[str]) -> list[str]:
    if to == "safetensors":
        _merged_hf(model, model_dir, tmp, dtype)
        return sorted(p.name for p in tmp.iterdir())
    # The scratch HF directory lives inside the temporary output, so an interrupt at any moment (even while the
    # scratch is being created or removed) leaves nothing behind: the temporary output is removed whole.
    with tempfile.TemporaryDirectory(prefix=".psoft-merged-", dir=tmp) as scratch:
        _merged_hf(model, model_dir, Path(scratch), "float32")
        if to == "onnx":
            from converters import onnx as conv

            conv.export_merged(Path(scratch), tmp)
        else:
            from converters import gguf as conv

            conv.export_model(Path(scratch), tmp / "model.gguf", quant or dtype)
    return sorted(p.name for p in tmp.iterdir())


def _reference_loader(
    model: Optional[nn.Module], model_dir: Path, adapter_dir: Path, allow_pickle: bool, stage: Callable[[str], None]
) -> Callable[[], nn.Module]:
    """The reference for ``verify_export``, handed over rather than shared (it can then drop it before loading the
    export: one model in memory at a time); loaded on demand when the export did not need it."""
    held = [model]

    def load() -> nn.Module:
        if held[0] is None:
            stage("loading the reference model (float32, with the adapter)")
            return reference_model(model_dir, adapter_dir, allow_pickle)[0]
        return held.pop()

    return load


def resolve_dtype(model_dir: Path, to: str, split: bool, dtype: Optional[str]) -> tuple[str, str]:
    """``(dtype, where it comes from)``: ``--dtype`` as given, else the source's for merged safetensors (bf16
    stays bf16), else float32 (what ONNX and GGUF take, and what a split export's checks run in)."""
    if dtype not in (None, SOURCE):
        return dtype, "--dtype"
    if to == "safetensors" and not split and any((model_dir / f).is_file() for f in (SINGLE, INDEX)):
        from converters.safetensors import source_dtype

        return source_dtype(model_dir), "source"
    return "float32", "default"


def _keep_unverified(tmp: Path, out_dir: Path) -> Optional[Path]:
    """Move a failed export to ``OUT.unverified`` beside ``out_dir`` (replacing an earlier one of ours); ``None``
    when something psoft-export did not write is in the way."""
    from psoft_export.atomic import replace_dir

    kept = Path(out_dir).absolute().with_name(Path(out_dir).name + UNVERIFIED)
    if kept.exists() and not (kept.is_dir() and (kept / MARKER).is_file()):
        return None
    mark(tmp, "merge")
    replace_dir(tmp, kept)
    return kept


def _split(
    to: str,
    model,
    model_dir: Path,
    adapter_dir: Path,
    tmp: Path,
    dtype: str,
    quant: Optional[str],
    lora_rank: Optional[int],
    kind: str,
    record: Optional[dict] = None,
) -> tuple[list[str], dict]:
    layers = adapter_layers(model)
    if to == "safetensors":
        (tmp / "adapter").mkdir()
        for name in ADAPTER_FILES:
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, tmp / "adapter" / name)
        if (adapter_dir / adapter_io.DECOMPOSITION_DIR).is_dir():
            shutil.copytree(adapter_dir / adapter_io.DECOMPOSITION_DIR, tmp / "adapter" / adapter_io.DECOMPOSITION_DIR)
        is_oft = any(isinstance(l, OftLinear) for l in layers.values())
        if is_oft and lora_rank is None:
            return ["adapter"], {}
        return ["adapter", "lora"], write_lora_dir(model, model_dir, adapter_dir, tmp / "lora", lora_rank)
    if kind == "classify":
        raise UserInputError(
            f"a classification adapter carries a new head: export it merged (drop --split) for --to {to}"
        )
    if to == "onnx":
        from converters import onnx as conv

        if any(isinstance(l, OftLinear) for l in layers.values()) and lora_rank is None:
            conv.export_split(model_dir, tmp, oft_targets={n: l.block_size for n, l in layers.items()})
            with torch.no_grad():
                rotations = {n: l.rotation_blocks().expand(l.num_blocks, -1, -1).float() for n, l in layers.items()}
            conv.write_adapter(tmp / "adapter.onnx_adapter", oft=rotations)
            return sorted(p.name for p in tmp.iterdir()), {}
        factors, alpha, errors = lora_form(model, lora_rank)
        conv.export_split(model_dir, tmp, lora_targets=list(factors))
        conv.write_adapter(
            tmp / "adapter.onnx_adapter", lora=factors, scaling=alpha / next(iter(factors.values()))[0].shape[0]
        )
        return sorted(p.name for p in tmp.iterdir()), errors
    from converters import gguf as conv

    factors, alpha, errors = lora_form(model, lora_rank)  # QOFT: of the dequantized weights (reference_model's)
    base = quantized.base_transform(record, model_dir) if record is not None else None  # the base as trained
    conv.export_model(model_dir, tmp / "model.gguf", quant or dtype, transform=base)
    conv.export_lora_adapter(model_dir, factors, alpha, tmp / "adapter.gguf")
    return ["model.gguf", "adapter.gguf"], errors


# ------------------------------------------------------------------------------------------ a quantized base (QOFT)


def quantized_base(adapter_dir: Path, to: str, split: bool) -> Optional[dict]:
    """The adapter's ``quantized_base`` record (``None``: trained over float weights); refuses the routes that do not
    reproduce a quantized base yet."""
    record = quantized.record_of(adapter_io.read_meta(adapter_dir))
    if record is not None and (to == "onnx" or (split and to != "gguf")):
        raise UserInputError(
            f"{adapter_dir} was trained over a {record['quant_type']} base: it exports merged --to "
            "safetensors or gguf, or --split --to gguf (the dequantized base + a LoRA form); use one of those"
        )
    return record


def _dequantize_in_export(stream: Optional[Stream], record: dict, dtype: str, quant: Optional[str]) -> dict:
    """Have the export fold into the dequantized weights the adapter was trained over, and say so. Streamed: each
    quantized weight is round-tripped before its fold; in memory: :func:`verify.reference_model` (the model this
    route merges) already holds the round-tripped weights."""
    if stream is not None:
        keys = set(stream.files.keys()) if stream.to == "gguf" else {e.key for f in stream.files for e in f.entries}
        quantized.round_trip_folds(stream.fold, record, keys.__contains__)
    return {
        "library": record["library"],
        "version": record.get("version"),
        "quant_type": record["quant_type"],
        "blocksize": record["blocksize"],
        "dequantized": len(record["modules"]),
        "modules": record["modules"],
        "written_as": quant or dtype,
        "requantized_as": quantized.requantized_as(quant, record["quant_type"]),
        "folded_into": "dequant(quant(W)) of every quantized weight, as trained, then R",
    }


# ------------------------------------------------------------------------------------------ the verb


def check_request(
    model_dir: Path, adapter_dir: Path, to: str, split: bool, dtype: str, quant: Optional[str], lora_rank: Optional[int]
) -> None:
    """Everything about the request that can be refused before any work."""
    if to not in FORMATS:
        raise UserInputError(f"unknown export format --to {to!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserInputError(f"unknown --dtype {dtype!r}: choose one of {SOURCE}, {', '.join(DTYPES)}")
    if quant is not None and (to != "gguf" or quant not in QUANTS):
        raise UserInputError(f"--quant {quant} is for --to gguf and must be one of {', '.join(QUANTS)}")
    if to == "onnx" and dtype != "float32":
        raise UserInputError(
            "ONNX exports are float32 (ONNX Runtime's CPU provider refuses mixed half graphs): use --dtype float32"
        )
    if to == "gguf" and dtype == "bfloat16":
        raise UserInputError(
            "GGUF exports are float32, float16 or --quant q8_0/q4_0: use --dtype float16 for half precision"
        )
    if lora_rank is not None and (lora_rank <= 0 or not split):
        raise UserInputError("--lora-rank K (K > 0) is for --split exports of OFT adapters")
    config = load_config(model_dir)
    if to == "gguf" and config.model_type not in GGUF_TYPES:
        raise UserInputError(
            f"GGUF export supports {', '.join(GGUF_TYPES)} models, not {config.model_type}: "
            "use --to safetensors or --to onnx"
        )
    peft = adapter_io.read_config(adapter_dir)
    adapter_io.method_config(peft, str(adapter_dir))
    quantized_base(adapter_dir, to, split)
    kind, _ = model_kind(model_dir, adapter_dir)
    if split and kind == "classify" and to != "safetensors":
        raise UserInputError(
            f"a classification adapter carries a new head: export it merged (drop --split) for --to {to}"
        )


def merge(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    to: str,
    *,
    split: bool = False,
    dtype: Optional[str] = SOURCE,
    quant: Optional[str] = None,
    lora_rank: Optional[int] = None,
    verify: bool = True,
    overwrite: bool = False,
    texts: Optional[list[str]] = None,
    allow_pickle: bool = False,
    strict: bool = False,
    on_stage: Optional[Callable[[str], None]] = None,
) -> dict:
    """Export ``model_dir`` with ``adapter_dir`` to ``out_dir`` as ``to``; verify; return the summary.

    ``dtype`` ``"source"`` (or ``None``) keeps the source's dtype for merged safetensors and means float32
    elsewhere. An export that fails verification is kept as ``OUT.unverified`` (``strict``: nothing is kept); either
    way :class:`VerificationError` is raised. ``on_stage`` is told each stage as it starts, for progress display.
    """
    stage = on_stage or (lambda name: None)
    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    if to in FORMATS:
        dtype, dtype_from = resolve_dtype(model_dir, to, split, dtype)
    else:
        dtype_from = "--dtype"
    check_request(model_dir, adapter_dir, to, split, dtype, quant, lora_rank)
    check_output_dir(out_dir, overwrite, inputs=[model_dir, adapter_dir])
    stream, why = None, None
    if to in STREAMED and not split:
        stage("planning the streamed export (no model is built)")
        stream, why = stream_plan(
            model_dir, adapter_dir, quant or dtype, *model_kind(model_dir, adapter_dir), allow_pickle, to
        )
    model = None
    if stream is None:
        stage("loading the model and the adapter")
        model, kind, classes = reference_model(model_dir, adapter_dir, allow_pickle)
    else:
        kind, classes = model_kind(model_dir, adapter_dir)
    info = {
        "format": EXPORT_FORMAT,
        "to": to,
        "split": split,
        "dtype": dtype,
        "dtype_from": dtype_from,
        "quant": quant,
        "lora_rank": lora_rank,
        "kind": kind,
        "classes": classes,
        "model": str(model_dir),
        "adapter": str(adapter_dir),
        "method": adapter_io.read_config(adapter_dir)["peft_type"].lower(),
        "psoft_export": __version__,
    }
    if to in STREAMED and not split:
        info["streamed"] = stream is not None
        if why:
            info["in_memory_because"] = why
    record = quantized_base(adapter_dir, to, split)
    if record is not None:
        info["quantized_base"] = _dequantize_in_export(stream, record, dtype, quant)
    with atomic_output_dir(out_dir, overwrite, inputs=[model_dir, adapter_dir], command="merge") as tmp:
        stage(f"writing the {'split' if split else 'merged'} {to} export" + (" tensor by tensor" if stream else ""))
        if stream is not None:
            files, errors = stream.write(tmp), {}
        elif split:
            files, errors = _split(to, model, model_dir, adapter_dir, tmp, dtype, quant, lora_rank, kind, record)
        else:
            files, errors = _merged(to, model, model_dir, tmp, dtype, quant), {}
        info["files"] = files
        if errors:
            info["lora_approximation"] = {"max_rel_err": max(errors.values()), "per_module": errors}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if verify:
            compare_to = approximated_model(model, lora_rank) if lora_rank else None
            load, model = _reference_loader(model, model_dir, adapter_dir, allow_pickle, stage), None
            stage("verifying it in its runtime")
            report = verify_export(tmp, info, model_dir, load, kind, texts, compare_to)
            info["verification"] = report.to_dict()
            (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if not report.ok:
                failed = f"{report.export} export disagrees with the PyTorch model: " + "; ".join(report.lines())
                kept = None if strict else _keep_unverified(tmp, out_dir)
                if kept is None:
                    raise VerificationError(
                        failed
                        + " — nothing was written"
                        + ("" if strict else f" ({out_dir}{UNVERIFIED} is in the way)")
                    )
                raise VerificationError(
                    failed + f" — the export is kept, unverified, in {kept} (--strict keeps nothing)"
                )
            if record is not None:
                stage("measuring the export against the quantized-base model that was trained")
                info["quantized_base"]["vs_trained_model"] = trained_model_gap(
                    tmp, model_dir, adapter_dir, kind, classes, record, texts, allow_pickle
                )
                (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return {
        "output": str(out_dir),
        **{k: info[k] for k in ("to", "split", "dtype", "dtype_from", "quant", "files")},
        "streamed": info.get("streamed"),
        "verification": info.get("verification"),
        "lora_approximation": info.get("lora_approximation"),
        "quantized_base": info.get("quantized_base"),
    }
