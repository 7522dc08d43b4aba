"""``psoft-export merge``: fold the rotations into the weights, or split base and adapter, and export.

Routes (``converters/`` does the format work and its table, ``converters.FORMATS``, says what each format accepts;
this module checks the request against it, plans, writes through the format's module, verifies and publishes):

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
from pathlib import Path
from typing import Callable, Optional

from torch import nn

import converters
from converters import FORMATS, Job
from psoft_export import __version__, adapter_io, quantized
from psoft_export.adapters.lora import approximated_model, lora_form  # noqa: F401  (re-exported)
from psoft_export.atomic import MARKER, atomic_output_dir, check_output_dir, mark
from psoft_export.checkpoint import INDEX, SINGLE, load_config
from psoft_export.errors import UserInputError, VerificationError
from psoft_export.models import model_kind, reference_model
from psoft_export.peft_lora import peft_lora_config, write_lora_dir  # noqa: F401  (re-exported)
from psoft_export.streamed import Stream, stream_plan
from psoft_export.verification import EXPORT_FILE, EXPORT_FORMAT, trained_model_gap, verify_export

SOURCE = "source"  # --dtype default: the source's dtype where the route keeps it (merged safetensors), else float32
UNVERIFIED = ".unverified"  # suffix of the directory a failed verification leaves the export in
DTYPES = tuple(dict.fromkeys(d for f in FORMATS.values() for d in f.dtypes))  # every --dtype some format writes


# ------------------------------------------------------------------------------------------ routes


def _merged(to: str, model, model_dir: Path, tmp: Path, dtype: str, quant: Optional[str]) -> list[str]:
    """The in-memory merged route of format ``to`` (the streamed one is :mod:`psoft_export.streamed`)."""
    return converters.module(to).write_merged(Job(model, model_dir, Path(), dtype, quant), tmp)


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
    """``(dtype, where it comes from)``: ``--dtype`` as given, else the source's for merged safetensors and GGUF
    (bf16 stays bf16), else float32 (what ONNX takes, and what a split export's checks run in)."""
    if dtype not in (None, SOURCE):
        return dtype, "--dtype"
    fmt = FORMATS.get(to)
    if fmt is not None and fmt.streamed and not split and any((model_dir / f).is_file() for f in (SINGLE, INDEX)):
        from converters.safetensors import source_dtype

        source = source_dtype(model_dir)
        if source in fmt.dtypes:
            return source, "source"
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


# ------------------------------------------------------------------------------------------ a quantized base (QOFT)


def quantized_base(adapter_dir: Path, to: str, split: bool) -> Optional[dict]:
    """The adapter's ``quantized_base`` record (``None``: trained over float weights); refuses the routes that do not
    reproduce a quantized base yet (:attr:`converters.Format.quantized_base`)."""
    record = quantized.record_of(adapter_io.read_meta(adapter_dir))
    if record is not None and ("split" if split else "merged") not in FORMATS[to].quantized_base:
        routes = [
            f"{'--split' if r == 'split' else 'merged'} --to {f.name}"
            for f in FORMATS.values()
            for r in f.quantized_base
        ]
        raise UserInputError(
            f"{adapter_dir} was trained over a {record['quant_type']} base: it exports {', '.join(routes)} "
            "(the dequantized base); use one of those"
        )
    return record


def _dequantize_in_export(
    stream: Optional[Stream], record: dict, dtype: str, quant: Optional[str], method: str
) -> dict:
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
        "folded_into": "dequant(quant(W)) of every quantized weight, as trained, then the adapter's update ("
        + ("W R^T" if method == "oft" else "W + s B (R - I) A")
        + ")",
    }


# ------------------------------------------------------------------------------------------ the verb


def check_request(
    model_dir: Path, adapter_dir: Path, to: str, split: bool, dtype: str, quant: Optional[str], lora_rank: Optional[int]
) -> None:
    """Everything about the request that can be refused before any work."""
    if to not in FORMATS:
        raise UserInputError(f"unknown export format --to {to!r}: choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[to]
    if dtype not in DTYPES:
        raise UserInputError(f"unknown --dtype {dtype!r}: choose one of {SOURCE}, {', '.join(DTYPES)}")
    if quant is not None and quant not in fmt.quants:
        quants = [f"{q} (--to {f.name})" for f in FORMATS.values() for q in f.quants]
        raise UserInputError(f"--quant {quant} is not written by --to {to}: choose one of {', '.join(quants)}")
    if dtype not in fmt.dtypes:
        raise UserInputError(fmt.dtype_hint)
    if lora_rank is not None and (lora_rank <= 0 or not split):
        raise UserInputError("--lora-rank K (K > 0) is for --split exports of OFT adapters")
    config = load_config(model_dir)
    if fmt.model_types is not None and config.model_type not in fmt.model_types:
        others = [f"--to {f.name}" for f in FORMATS.values() if f.model_types is None]
        raise UserInputError(
            f"{to.upper()} export supports {', '.join(fmt.model_types)} models, not {config.model_type}: "
            f"use {' or '.join(others)}"
        )
    peft = adapter_io.read_config(adapter_dir)
    adapter_io.method_config(peft, str(adapter_dir))
    quantized_base(adapter_dir, to, split)
    kind, _ = model_kind(model_dir, adapter_dir)
    if split and kind == "classify" and not fmt.split_heads:
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
    kind, classes = model_kind(model_dir, adapter_dir)
    fmt = None if split else FORMATS.get(to)
    streamed = fmt is not None and fmt.streamed  # written tensor by tensor from the files
    from_scratch = fmt is not None and fmt.hf_scratch  # starts from a merged float32 HF directory (ONNX)
    stream = scratch = why = None
    if streamed or from_scratch:  # one or the other, by format; either way planned from the files alone
        stage(
            "planning the streamed export (no model is built)"
            if streamed
            else "planning the streamed merge the export starts from (no model is built)"
        )
        plan, why = stream_plan(
            model_dir,
            adapter_dir,
            (quant or dtype) if streamed else "float32",
            kind,
            classes,
            allow_pickle,
            to if streamed else "safetensors",
        )
        stream, scratch = (plan, None) if streamed else (None, plan)
    model = None
    if stream is None and scratch is None:
        stage("loading the model and the adapter")
        model, kind, classes = reference_model(model_dir, adapter_dir, allow_pickle)
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
    if streamed:
        info["streamed"] = stream is not None
    if from_scratch:
        info["scratch_streamed"] = scratch is not None
    if why:
        info["in_memory_because"] = why
    record = quantized_base(adapter_dir, to, split)
    if record is not None:
        info["quantized_base"] = _dequantize_in_export(stream, record, dtype, quant, info["method"])
    with atomic_output_dir(out_dir, overwrite, inputs=[model_dir, adapter_dir], command="merge") as tmp:
        stage(f"writing the {'split' if split else 'merged'} {to} export" + (" tensor by tensor" if stream else ""))
        if stream is not None:
            files, errors = stream.write(tmp), {}
        else:
            job = Job(model, model_dir, adapter_dir, dtype, quant, lora_rank, kind, record, scratch)
            route = converters.module(to)
            files, errors = route.write_split(job, tmp) if split else (route.write_merged(job, tmp), {})
        info["files"] = files
        if errors:
            info["lora_approximation"] = {"max_rel_err": max(errors.values()), "per_module": errors}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if verify:
            compare_to = approximated_model(model, lora_rank) if lora_rank else None
            load, model = _reference_loader(model, model_dir, adapter_dir, allow_pickle, stage), None
            stage("verifying it in its runtime")
            # A streamed export is verified unit by unit too (not over a 4-bit base: that reference dequantizes it)
            by_units = adapter_dir if (stream is not None or scratch is not None) and record is None else None
            report = verify_export(tmp, info, model_dir, load, kind, texts, compare_to, streamed_adapter=by_units)
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
        "scratch_streamed": info.get("scratch_streamed"),
        "verification": info.get("verification"),
        "lora_approximation": info.get("lora_approximation"),
        "quantized_base": info.get("quantized_base"),
    }
