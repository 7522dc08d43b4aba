"""The rounded reference of a merged export: the PyTorch model of the weights the export actually stores.

``verify`` compares a merged safetensors or GGUF export with it (tight bars: the export is tested, not the precision
of its dtype): the float32 model with the adapter, merged in place, every tensor rounded exactly as the export stores
it (cast to float16/bfloat16, or quantized to Q8_0/Q4_0 with gguf-py's own functions, then widened to float32). Also
here: the tensor-by-tensor comparison of an export's files with those weights, a block of rows at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from psoft_export.errors import VerificationError


@torch.no_grad()
def rounded_reference(model: nn.Module, to: str, dtype: str) -> nn.Module:
    """``model`` (with its adapter) merged in place, then every floating tensor rounded as a merged ``to`` export of
    ``dtype`` stores it and widened back to float32: the PyTorch model of the export's exact weights."""
    from psoft_export.adapters import merge_and_unload
    from psoft_export.streamed_run import canonical_names

    model = merge_and_unload(model)
    state = model.state_dict(keep_vars=True)
    names = canonical_names(model)
    rounding = rounding_for(to, dtype, names, model.config.to_dict())
    seen: set[int] = set()
    for key, tensor in state.items():
        if tensor.is_floating_point() and id(tensor) not in seen:  # tied tensors once
            seen.add(id(tensor))
            tensor.data.copy_(rounding(names[key], tensor.data.to(torch.float32)))
    return model


def rounding_for(to: str, dtype: str, names: dict[str, str], config: dict):
    """``rounding(name, float32 tensor)``: the tensor as a merged ``to`` export of ``dtype`` stores it, widened back to
    float32. ``names`` maps every tensor name to its canonical one (tied names to one,
    :func:`psoft_export.streamed_run.canonical_names`); ``name`` is canonical. GGUF q4_0 holds the output head finer
    (Q8_0), whichever name it has."""
    if to == "gguf":
        from converters.gguf import output_head
        from converters.gguf_stream import round_as_written

        head = output_head(list(names), config)
        head = None if head is None else names[head]
        return lambda name, t: round_as_written(t, dtype, output=name == head) if t.is_floating_point() else t
    wanted = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return lambda name, t: t.to(wanted).to(torch.float32) if t.is_floating_point() else t


BLOCK_BYTES = 2 << 20  # float64 rows compared at a time (it runs while a verification unit is held)


class SafetensorsComparison:
    """The tensor-by-tensor comparison of a merged safetensors export with expected tensors, fed one tensor at a
    time (:meth:`check`) and finished with a loader for the rest (see ``converters.gguf.TensorComparison``)."""

    def __init__(self, export_dir: Path, model_dir: Path, names: list[str]) -> None:
        from psoft_export.checkpoint import ModelSource

        self.source, self.names = ModelSource(export_dir), set(names)
        self.keys = set(self.source.keys())
        self.errors: dict[str, tuple[float, float]] = {}

    def __enter__(self) -> "SafetensorsComparison":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def check(self, key: str, expected: torch.Tensor) -> None:
        if key not in self.keys:
            return
        got, ref = self.source.tensor(key), expected.detach()
        if tuple(got.shape) != tuple(ref.shape):
            raise VerificationError(f"{key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        diff, scale = 0.0, 0.0
        got, ref = got.reshape(got.shape[0] if got.dim() else 1, -1), ref.reshape(ref.shape[0] if ref.dim() else 1, -1)
        step = max(1, BLOCK_BYTES // (8 * max(1, got.shape[1])))  # blocks of rows: no tensor-sized float64 copies
        for i in range(0, got.shape[0] if got.numel() else 0, step):
            a, b = got[i : i + step].to(torch.float64), ref[i : i + step].to(torch.float64)
            diff, scale = max(diff, float((a - b).abs().max())), max(scale, float(b.abs().max()))
        self.errors[key] = (diff / max(scale, 1e-30) if got.numel() else 0.0, diff)

    def finish(self, load) -> dict[str, tuple[float, float]]:
        for key in sorted(self.keys):
            if key not in self.names:
                raise VerificationError(f"the export holds {key}, which the model does not have")
            if key not in self.errors:
                self.check(key, load(key))
        return self.errors


def comparison(to: str, export_dir: Path, model_dir: Path, names: list[str]):
    """The incremental form of :data:`WEIGHT_CHECKS` (a context manager with ``check`` and ``finish``)."""
    if to == "gguf":
        from converters.gguf import TensorComparison

        return TensorComparison(export_dir / "model.gguf", model_dir, names)
    return SafetensorsComparison(export_dir, model_dir, names)


# Formats whose merged exports are compared tensor by tensor (ONNX: logits only; its initializers are renamed and
# folded by the exporter).
def weight_errors(
    to: str, export_dir: Path, expected: Mapping[str, torch.Tensor], model_dir: Path
) -> dict[str, tuple[float, float]]:
    """``{name: (max |file - expected| / max |expected|, max |file - expected|)}`` for every tensor of a merged
    ``to`` export against ``expected`` (a state dict), the file's tensors read one at a time (GGUF: dequantized,
    rope rows as written)."""
    with comparison(to, export_dir, model_dir, list(expected)) as compare:
        return compare.finish(expected.__getitem__)


WEIGHT_CHECKS = {to: functools.partial(weight_errors, to) for to in ("safetensors", "gguf")}
