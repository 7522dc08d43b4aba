"""bitsandbytes layers as a base: recognizing them and reading the weight they compute with.

Layer-level only (no loading, no files), so the adapter layers can use it; ``psoft_export/quantized.py`` holds the
rest of QOFT (loading a 4-bit base, records, merging). bitsandbytes is imported only to dequantize.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

BNB_CLASSES = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes quantized linear layer (checked by class, so bitsandbytes is not imported for it)."""
    cls = type(module)
    return cls.__name__ in BNB_CLASSES and cls.__module__.startswith("bitsandbytes")


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` float32 weight a bitsandbytes layer computes with in training mode (a new tensor; for
    merging and reports, never for the forward pass)."""
    import bitsandbytes.functional as F

    weight = module.weight
    if weight.dtype == torch.int8:  # an 8-bit layer (not trained by psoft-export; for completeness). Its row scales
        scb = getattr(weight, "SCB", None)  # move to the layer's state at its first forward
        scb = scb if scb is not None else module.state.SCB
        return F.int8_vectorwise_dequant(weight.data, scb).to(torch.float32)
    state = weight.quant_state
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):  # undo the CPU repack on copies (the inverse mutates the
        absmax = state.absmax.T.reshape(-1).float()  # state and leaves absmax (bf16-rounded) transposed: fixed here)
        data, state = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.copy(state))
        if not state.nested:
            state.absmax = absmax
    return F.dequantize_4bit(data, state).to(torch.float32).reshape(module.out_features, module.in_features)
