"""The two layouts a linear layer comes in: ``nn.Linear`` stores ``W`` as ``(out, in)``, transformers' GPT-2
``Conv1D`` stores ``W^T`` as ``(in, out)`` (PEFT's ``fan_in_fan_out``). Every formula in this package is in
``nn.Linear`` layout; these helpers transpose at the edge."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def is_fan_in_fan_out(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an ``(out, in)`` tensor: a view sharing storage, so in-place edits reach the module."""
    return module.weight.T if is_fan_in_fan_out(module) else module.weight


def features(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)``; a bitsandbytes layer's weight is packed codes, so its attributes tell."""
    from psoft_export.adapters.bnb import is_quantized

    if is_quantized(module):
        return module.out_features, module.in_features
    out_f, in_f = weight_out_in(module).shape
    return out_f, in_f


def linear_around(weight: torch.Tensor, fan_in_fan_out: bool) -> nn.Module:
    """A bias-free ``nn.Linear`` (``weight`` ``(out, in)``) or ``Conv1D`` (``weight`` ``(in, out)`` when
    ``fan_in_fan_out``) holding ``weight`` itself, no copy: a base layer for an adapter layer without the model."""
    out_f, in_f = weight.T.shape if fan_in_fan_out else weight.shape
    with torch.device("meta"):  # the constructors allocate a weight of their own: nothing, on meta
        module = Conv1D(out_f, in_f) if fan_in_fan_out else nn.Linear(in_f, out_f, bias=False)
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.bias = None
    return module
