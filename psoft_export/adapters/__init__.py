"""The adapter math: one module per method (``psoft``, ``oft``), their shared Cayley transforms (``cayley``),
and the model surgery that puts them into a transformers model (``surgery``)."""

from psoft_export.adapters.oft import OftConfig, OftLinear
from psoft_export.adapters.psoft import PsoftConfig, PsoftLinear
from psoft_export.adapters.surgery import (
    adapter_layers,
    adapter_parameters,
    fold_weight,
    inject,
    merge_and_unload,
    parse_targets,
    select_targets,
    unload,
)

__all__ = [
    "OftConfig",
    "OftLinear",
    "PsoftConfig",
    "PsoftLinear",
    "adapter_layers",
    "adapter_parameters",
    "fold_weight",
    "inject",
    "merge_and_unload",
    "parse_targets",
    "select_targets",
    "unload",
]
