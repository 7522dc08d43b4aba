"""The streamed merged export, planned (merged safetensors and GGUF): the model's meta skeleton, the adapter as read,
the fold of each adapted weight, the heads saved with the adapter, the output files. The converters write it tensor
by tensor (``converters/safetensors.py``, ``converters/gguf_stream.py``); ``merge`` decides when to use it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

from psoft_export import adapter_io
from psoft_export.adapters import fold_weight, select_targets
from psoft_export.adapters.layout import is_fan_in_fan_out
from psoft_export.checkpoint import INDEX, SINGLE, load_tokenizer, loading_kwargs
from psoft_export.errors import UserInputError
from psoft_export.models import base_skeleton


def saved_heads(model: torch.nn.Module, adapter, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The head tensors saved with ``adapter`` (a classifier's new head) by ``model``'s names, each head checked to
    fit ``model`` as ``load_state_dict`` would check it in the in-memory route (on the meta device: no copy)."""
    extra = {}
    for name, state in adapter_io.head_state(model, adapter.head_tensors, adapter.heads).items():
        try:
            model.get_submodule(name).load_state_dict({k: v.to("meta") for k, v in state.items()})
        except RuntimeError as exc:
            raise UserInputError(
                f"{adapter_dir}: saved head {name} does not fit this model ({str(exc).splitlines()[0]})"
            ) from None
        extra.update({f"{name}.{p}": t for p, t in state.items()})
    return extra


class Stream:
    """A streamed merged safetensors or GGUF export, planned: the meta skeleton, the adapter as read, the fold per
    adapted weight, the head tensors saved with the adapter, and the output files (GGUF: the source tensors by the
    model's names)."""

    def __init__(
        self,
        model_dir: Path,
        adapter_dir: Path,
        dtype: str,
        kind: str,
        classes: Optional[list],
        to: str = "safetensors",
    ) -> None:
        from converters import gguf_stream
        from converters import safetensors as conv

        self.model_dir, self.adapter_dir, self.dtype, self.to = model_dir, adapter_dir, dtype, to
        self.skeleton = base_skeleton(model_dir, kind, classes, adapter_dir)
        self.adapter = adapter_io.read_adapter(adapter_dir, self.skeleton, model_dir)
        self.extra = saved_heads(self.skeleton, self.adapter, adapter_dir)
        self.fold = {
            f"{name}.weight": functools.partial(self._fold, name, is_fan_in_fan_out(self.skeleton.get_submodule(name)))
            for name in select_targets(self.skeleton, self.adapter.targets)
        }  # what inject would adapt
        self.files = (
            conv.plan(model_dir, self.skeleton, dtype, self.extra)
            if to == "safetensors"
            else gguf_stream.plan(model_dir, self.skeleton)
        )

    def _fold(self, name: str, fan_in_fan_out: bool, weight: torch.Tensor) -> torch.Tensor:
        return fold_weight(weight, fan_in_fan_out, lambda base: adapter_io.adapter_layer(self.adapter, name, base))

    def write(self, out: Path) -> list[str]:
        from converters import safetensors as conv

        if self.to == "gguf":
            from converters import gguf_stream

            return gguf_stream.export_merged(self.model_dir, out, self.skeleton, self.dtype, self.fold, self.files)
        conv.export_merged(self.model_dir, out, self.skeleton, self.dtype, self.fold, self.extra, self.files)
        load_tokenizer(self.model_dir).save_pretrained(out)
        return sorted(p.name for p in out.iterdir())


def stream_plan(
    model_dir: Path,
    adapter_dir: Path,
    dtype: str,
    kind: str,
    classes: Optional[list],
    allow_pickle: bool,
    to: str = "safetensors",
) -> tuple[Optional[Stream], Optional[str]]:
    """The streamed export, or why this checkpoint takes the in-memory route (pickled weights; a tensor the model
    class initializes because the files lack it)."""
    from converters.safetensors import NotStreamable

    if not any((model_dir / f).is_file() for f in (SINGLE, INDEX)):
        return None, "no safetensors weights"
    loading_kwargs(model_dir, allow_pickle)  # the checks from_pretrained's route makes first
    try:
        return Stream(model_dir, adapter_dir, dtype, kind, classes, to), None
    except NotStreamable as exc:
        return None, str(exc)
