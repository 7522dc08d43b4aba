"""``psoft-export verify``: run an export in its own runtime and compare it with the PyTorch model plus adapter.

The work is the library module :mod:`psoft_export.verification` (``merge`` runs the same checks before it publishes);
its names and the model loaders of :mod:`psoft_export.models` are re-exported here for the Python API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from psoft_export.adapters.lora import approximated_model
from psoft_export.models import (  # noqa: F401  (re-exported)
    DEFAULT_TEXTS,
    base_skeleton,
    fixed_inputs,
    load_base,
    masked,
    model_kind,
    reference_model,
    torch_outputs,
)
from psoft_export.verification import (  # noqa: F401  (re-exported)
    EXPORT_FILE,
    EXPORT_FORMAT,
    RUNTIMES,
    TOLERANCES,
    Report,
    read_export,
    read_inputs,
    verify_export,
)


def verify(
    export_dir: str | Path,
    model_dir: str | Path,
    adapter_dir: str | Path,
    inputs: Optional[str | Path] = None,
    allow_pickle: bool = False,
) -> Report:
    """Verify ``export_dir`` (written by ``merge``) against ``model_dir`` with ``adapter_dir``."""
    export_dir, model_dir, adapter_dir = Path(export_dir), Path(model_dir), Path(adapter_dir)
    info = read_export(export_dir)
    texts = read_inputs(inputs)
    kind, _ = model_kind(model_dir, adapter_dir)
    compare_to = None
    if info.get("lora_rank"):  # a requested approximation: check the files against what was meant to be written
        reference = reference_model(model_dir, adapter_dir, allow_pickle)[0]
        compare_to = approximated_model(reference, info["lora_rank"])
        return verify_export(export_dir, info, model_dir, reference, kind, texts, compare_to)
    return verify_export(
        export_dir,
        info,
        model_dir,
        lambda: reference_model(model_dir, adapter_dir, allow_pickle)[0],
        kind,
        texts,
        streamed_adapter=adapter_dir if unit_by_unit(export_dir, info, model_dir, adapter_dir, allow_pickle) else None,
    )


def unit_by_unit(export_dir: Path, info: dict, model_dir: Path, adapter_dir: Path, allow_pickle: bool) -> bool:
    """Whether a merged export can be verified one unit at a time (bounded memory): merged safetensors, GGUF or ONNX
    of a safetensors checkpoint that holds every tensor, over a float base (a 4-bit base's reference dequantizes it)."""
    from psoft_export import adapter_io, quantized
    from psoft_export.streamed import stream_plan

    if info["split"] or info.get("lora_rank") or info["to"] not in ("safetensors", "gguf", "onnx"):
        return False
    if quantized.record_of(adapter_io.read_meta(adapter_dir)) is not None:
        return False
    kind, classes = model_kind(model_dir, adapter_dir)
    to = "gguf" if info["to"] == "gguf" else "safetensors"  # ONNX: what its merged HF directory is written as
    stream, _ = stream_plan(model_dir, adapter_dir, "float32", kind, classes, allow_pickle, to)
    return stream is not None
