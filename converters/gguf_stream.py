"""Merged GGUF export, streamed: source tensors in, folded, written into the GGUF file one at a time.

The in-memory route (``merge._merged``) builds the float32 model with the adapter, merges it, saves it as a scratch
Hugging Face directory and converts that with :func:`converters.gguf.export_model`. This route writes the same file
without the model: the scratch directory holds only what ``save_pretrained`` writes besides the weights (config and
generation config of the meta skeleton, the tokenizer's files), and ``export_model`` reads the weights from the
source checkpoint under the names the skeleton gives them (:class:`Renamed`), each widened to float32 and, for an
adapted weight, folded by its adapter layer alone (``fold``, the same ``merge`` as ``merge_and_unload``) inside the
lazy loader, just before it is encoded and written. The GGUF writer writes the header first and then each tensor as it
comes, so peak memory is the adapter plus one weight's working set (its float32 copy, the fold's temporaries, the
rope-row permutation and the encoded copy). The file is byte-identical to the in-memory route's
(tests/test_gguf_stream.py).

Also here: :func:`round_as_written`, what the file holds for a float32 tensor (cast or quantized, then widened), from
which verification builds its rounded reference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize
from torch import nn

from converters import gguf
from psoft_export.checkpoint import ModelSource, load_tokenizer, unmap_freed_tensors

GGUF_FILE = "model.gguf"


class Renamed:
    """The source's tensors under the model's own names (``{model key: source key}``): the keys, shapes and tensors
    ``export_model`` reads, as the saved merged model would have them (prefixes resolved, tied duplicates and tensors
    the model does not have left out)."""

    def __init__(self, source: ModelSource, names: Mapping[str, str]) -> None:
        self.source, self.names = source, dict(names)

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self.names[key])

    def tensor(self, key: str) -> torch.Tensor:
        return self.source.tensor(self.names[key])


def plan(model_dir: Path, skeleton: nn.Module) -> Renamed:
    """The tensors the merged model has, found in the source (raises ``converters.safetensors.NotStreamable`` when
    one is missing and transformers would initialize it, ``UserInputError`` on a shape the config contradicts)."""
    from converters import safetensors as st

    files = st.plan(model_dir, skeleton, "float32", {})  # the same name resolution and checks as merged safetensors
    return Renamed(ModelSource(model_dir), {e.key: e.source_key for f in files for e in f.entries})


def export_merged(
    model_dir: Path,
    out_dir: Path,
    skeleton: nn.Module,
    dtype: str,
    fold: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    weights: Renamed | None = None,
) -> list[str]:
    """Write ``out_dir/model.gguf`` (``dtype``: float32, float16, q8_0 or q4_0) of the merged model: ``fold[key]``
    applied to the float32 tensor of each adapted weight. ``weights``: a :func:`plan` already made. Returns the files
    written."""
    from converters.safetensors import write_config

    unmap_freed_tensors()
    weights = weights if weights is not None else plan(model_dir, skeleton)
    # The scratch directory lives inside the (temporary) output, so an interrupt leaves nothing elsewhere.
    with tempfile.TemporaryDirectory(prefix=".psoft-merged-", dir=out_dir) as scratch:
        write_config(skeleton, Path(scratch), "float32")  # config.json as the in-memory route's save_pretrained
        load_tokenizer(model_dir).save_pretrained(scratch)
        gguf.export_model(Path(scratch), Path(out_dir) / GGUF_FILE, dtype, source=weights, transform=fold)
    return [GGUF_FILE]


HALF = {QType.F16: torch.float16, QType.BF16: torch.bfloat16}


def round_as_written(tensor: torch.Tensor, dtype: str, output: bool = False) -> torch.Tensor:
    """What a GGUF file of ``dtype`` (float32, float16, q8_0, q4_0) holds for the float32 HF tensor ``tensor``, widened
    back to float32 in ``tensor``'s layout: 1-D tensors stay float32, 2-D ones are cast or quantized exactly as the
    writer does (rows whose length is not a multiple of the block as F16; ``output``: the tensor is the output head,
    which a q4_0 file holds as Q8_0, :func:`converters.gguf.output_head`). The rope-row permutation the writer
    applies moves whole rows, and every type rounds within a row, so rounding in the HF layout gives the same values."""
    qtype = gguf._storage_type(tuple(tensor.shape), gguf.DTYPES[dtype][0], output)
    if qtype == QType.F32:
        return tensor.to(torch.float32)
    if qtype in HALF:  # gguf-py casts (F16) or rounds to nearest even (BF16) exactly as torch does, 10x faster here
        return tensor.detach().to(HALF[qtype]).to(torch.float32)
    array = tensor.detach().to(torch.float32).numpy()
    back = dequantize(gguf._encode(array, qtype), qtype).reshape(array.shape)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
