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
    """``(out_features, in_features)``."""
    out_f, in_f = weight_out_in(module).shape
    return out_f, in_f
