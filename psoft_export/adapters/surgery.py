"""Model surgery: which modules to adapt, and swapping them for adapter layers and back.

Target rules follow PEFT's so a config means the same thing in both: a list matches a module whose name equals
an entry or ends with ``.entry``; a string is a regex that must match the whole name; ``all-linear`` is every
``nn.Linear``/``Conv1D`` except the output head (and a sequence-classification head).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from psoft_export.adapters.layout import features, is_linear, linear_around
from psoft_export.adapters.oft import OftConfig, OftLinear, fitting_block_sizes, group_rotations
from psoft_export.adapters.psoft import PsoftConfig, PsoftLinear
from psoft_export.errors import UserInputError

ALL_LINEAR = "all-linear"
CLASSIFIER_HEADS = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES
ADAPTER_TYPES = (PsoftLinear, OftLinear)
Targets = Union[str, Iterable[str]]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]

_REGEX_CHARS = set("^$*+?[](){}|\\")


def parse_targets(text: str) -> Targets:
    """CLI form: ``all-linear``, a comma-separated list of names, or a regex (any of ``^$*+?[](){}|\\``)."""
    text = text.strip()
    if not text:
        raise UserInputError("--targets is empty: give all-linear, names like q_proj,v_proj, or a regex")
    if text.lower() == ALL_LINEAR:
        return ALL_LINEAR
    if any(ch in _REGEX_CHARS for ch in text):
        try:
            re.compile(text)
        except re.error as exc:
            raise UserInputError(f"--targets {text!r} is not a valid regex: {exc}") from None
        return text
    return [name.strip() for name in text.split(",") if name.strip()]


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear(module)]


def _head_names(model: nn.Module) -> set[str]:
    heads: list[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    heads += [m for n in CLASSIFIER_HEADS if isinstance(m := getattr(model, n, None), nn.Module)]
    ids = {id(h) for h in heads}
    names = {name for name, module in model.named_modules() if id(module) in ids}
    # A classifier head can be a small MLP (e.g. RoBERTa's); exclude everything under it.
    return names | {n for n, _ in model.named_modules() for h in names if n.startswith(h + ".")}


def _matches(name: str, targets: Targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _summarise(names: list[str]) -> str:
    """Module names shortened to their distinct last components, for a one-line error."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.rsplit(".", 1)[-1], None)
    return ", ".join(seen) or "(none)"


def select_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the linear modules ``targets`` selects, in model order; a clear error when none match."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = _head_names(model)
        chosen = [n for n in linear_module_names(model) if n not in heads]
    else:
        if not isinstance(targets, str):
            targets = list(targets)
            if not targets:
                raise UserInputError("no targets given: use all-linear, a list of module names, or a regex")
        matched = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
        wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not is_linear(m) and not _has_linear(m)]
        chosen = [n for n, m in matched if is_linear(m)]
        if wrong and not chosen:
            raise UserInputError(
                f"targets {_show(targets)} matched {', '.join(wrong[:3])}: only nn.Linear/Conv1D layers can be "
                f"adapted; linear modules are: {_summarise(linear_module_names(model))}"
            )
    if not chosen:
        raise UserInputError(
            f"no module matched targets {_show(targets)}; this model's linear modules are: "
            f"{_summarise(linear_module_names(model))} (use names, a regex, or all-linear)"
        )
    return chosen


def _has_linear(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def _show(targets: Targets) -> str:
    return repr(targets) if isinstance(targets, str) else ",".join(targets)


def inject(
    model: nn.Module,
    config: Union[PsoftConfig, OftConfig],
    targets: Targets = ALL_LINEAR,
    factors: Optional[Factors] = None,
) -> dict[str, nn.Module]:
    """Replace each target with an adapter layer, freeze everything else, and return ``{name: layer}``.

    ``factors`` maps a module name to its stored PSOFT ``(A, B)`` (from ``decompose``); without it PSOFT
    computes the subspace from the weight. The model keeps its forward signature and its output at init.
    """
    if adapter_layers(model):
        raise UserInputError("the model already has adapter layers: merge or reload it before injecting again")
    names = select_targets(model, targets)
    if factors is not None:
        missing = [n for n in names if n not in factors]
        if missing:
            raise UserInputError(
                f"the decomposition has no factors for {len(missing)} target(s), e.g. {missing[0]}: "
                "re-run decompose with the same --targets"
            )
    if isinstance(config, OftConfig):
        _check_block_size(model, names, config.block_size)
    layers: dict[str, nn.Module] = {}
    for name in names:  # build every layer first: a bad target leaves the model untouched
        base = model.get_submodule(name)
        if isinstance(config, PsoftConfig):
            layers[name] = PsoftLinear(base, config, None if factors is None else factors[name], name=name)
        else:
            layers[name] = OftLinear(base, config, name=name)
    model.requires_grad_(False)
    for name, layer in layers.items():
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
        for p_name, param in layer.named_parameters():  # not via requires_grad_(True): a 4-bit base holds ints
            param.requires_grad_(not p_name.startswith("base_layer."))
    if isinstance(config, OftConfig):
        group_rotations(model)
    return layers


def _check_block_size(model: nn.Module, names: list[str], block: int) -> None:
    """One error naming every layer the block size does not fit, and the sizes that fit them all."""
    widths = {name: features(model.get_submodule(name))[1] for name in names}
    failing = [f"{n} (in={w})" for n, w in widths.items() if w % block]
    if not failing:
        return
    common = math.gcd(*widths.values())
    fits = ", ".join(map(str, fitting_block_sizes(common, block))) or "none (no common divisor >= 2)"
    shown = ", ".join(failing[:3]) + (f" and {len(failing) - 3} more" if len(failing) > 3 else "")
    raise UserInputError(
        f"block size {block} does not divide the input size of {len(failing)} target layer(s): "
        f"{shown}; block sizes that fit every target: {fits}"
    )


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every adapter layer in ``model``, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter parameters, ``{"<module>.<q|vector_a|vector_b>": param}``."""
    return {
        f"{name}.{p_name}": p
        for name, layer in adapter_layers(model).items()
        for p_name, p in layer.named_parameters(recurse=False)
    }


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layers back: a model with no trace of
    the adapter, ready for ``save_pretrained`` and export."""
    for name, layer in adapter_layers(model).items():
        layer.merge()
        parent, child = _parent(model, name)
        setattr(parent, child, layer.base_layer)
    return model


@torch.no_grad()
def fold_weight(
    weight: torch.Tensor, fan_in_fan_out: bool, make_layer: Callable[[nn.Module], nn.Module]
) -> torch.Tensor:
    """:func:`merge_and_unload` for one weight, without the model (streamed exports).

    ``weight`` ``(out, in)`` (``(in, out)`` when ``fan_in_fan_out``, GPT-2's ``Conv1D``) becomes the base of the
    adapter layer ``make_layer(base)`` builds (its parameters loaded); the layer's own ``merge`` folds the update
    in place, so the result is bit for bit what merging a built model gives. Returns the merged weight, in
    ``weight``'s layout and dtype (the tensor itself, modified).
    """
    layer = make_layer(linear_around(weight, fan_in_fan_out))
    if not isinstance(layer, ADAPTER_TYPES):
        raise TypeError(f"make_layer must return an adapter layer, not {type(layer).__name__}")
    layer.merge()
    return layer.base_layer.weight.detach()


def unload(model: nn.Module) -> nn.Module:
    """Put the base layers back without merging (undoing a merge first where one was done)."""
    for name, layer in adapter_layers(model).items():
        layer.unmerge()
        parent, child = _parent(model, name)
        setattr(parent, child, layer.base_layer)
    return model
