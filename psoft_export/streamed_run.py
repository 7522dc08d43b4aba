"""Run a model one unit at a time, each unit's weights read when it runs and dropped after it: what lets
verification of a merged export run in memory bounded like the streamed export itself (issue 16).

A *unit* is a module transformers keeps whole when it splits a model across devices (``_no_split_modules``: a
decoder layer, a BERT layer) or a module outside them that holds weights of its own (the embeddings, the final norm,
the head). The model is built with its parameters on the meta device and its buffers real (rotary frequencies are
computed, not stored); a forward pre-hook on each unit gives its parameters real float32 tensors from a loader, a
forward hook puts the meta ones back. Peak: the largest unit's weights in float32 plus activations, instead of
the whole model.

The loader here, :func:`source_loader`, reads a model directory's files: the base model's (with :class:`Adapted`, the
adapter applied unit by unit, as trained or merged and rounded as an export stores it) or a merged export's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from psoft_export.checkpoint import ModelSource, prefix_variants

Loader = Callable[[str], torch.Tensor]


def runnable_skeleton(model_dir: Path, kind: str, classes: Optional[list], adapter_dir: Optional[Path]) -> nn.Module:
    """:func:`psoft_export.models.base_skeleton` with real buffers: parameters on the meta device, buffers computed
    on the CPU as ``from_pretrained`` would (rotary frequencies, position ids)."""
    from accelerate import init_empty_weights

    from psoft_export.models import base_skeleton

    with init_empty_weights(include_buffers=False):
        model = base_skeleton(model_dir, kind, classes, adapter_dir, meta=False)
    # init_empty_weights re-registers every assigned parameter as a new meta one, which unties tied embeddings:
    # tie them again outside it (an assignment, now kept).
    model.tie_weights()
    return model


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter and buffer name of ``model`` -> the name ``save_pretrained`` keeps for that tensor (tied
    duplicates map to the first registered name, e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
    first: dict[int, str] = {}
    names = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names[name] = first.setdefault(id(tensor), name)
    return names


def _units(model: nn.Module, whole: frozenset = frozenset()) -> list[tuple[str, nn.Module]]:
    """The modules hooked (pre-order: a unit's descendants are its own): those transformers never splits, those named
    in ``whole`` (the parents of adapted layers, so that swapping a layer happens before its parent calls it), and
    any other module holding parameters of its own."""
    split = set(getattr(model, "_no_split_modules", None) or [])
    units, inside = [], []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if type(module).__name__ in split or name in whole:
            units.append((name, module))
            inside.append(name)
        elif any(True for _ in module.parameters(recurse=False)):
            units.append((name, module))
    return units


@contextlib.contextmanager
def streamed(model: nn.Module, load: Loader, adapt=None, whole: frozenset = frozenset()) -> Iterator[nn.Module]:
    """``model`` (parameters on meta) runnable for the duration: each unit's parameters come from ``load(name)``
    (the full parameter name, float32) when the unit runs, and go back to meta after; ``adapt(prefix, unit)``, when
    given, runs after the load and returns what undoes it (:meth:`Adapted.hook`)."""
    hooks = []

    def params_of(prefix: str, unit: nn.Module) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
        out = []
        for mod_name, mod in unit.named_modules(prefix=prefix, remove_duplicate=False):
            for pname, param in mod.named_parameters(recurse=False):
                out.append((f"{mod_name}.{pname}" if mod_name else pname, mod, pname, param))
        return out

    for prefix, unit in _units(model, whole):
        entries = params_of(prefix, unit)

        undo: list[Callable[[], None]] = []

        def pre(module, args, entries=entries, prefix=prefix, undo=undo):
            for full, owner, pname, meta in entries:
                tensor = load(full)
                if tuple(tensor.shape) != tuple(meta.shape):
                    raise ValueError(f"{full}: loaded shape {tuple(tensor.shape)}, the model has {tuple(meta.shape)}")
                owner._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
            if adapt is not None:
                undo.append(adapt(prefix, module))

        def post(module, args, output, entries=entries, undo=undo):
            while undo:
                undo.pop()()
            for _, owner, pname, meta in entries:
                owner._parameters[pname] = meta
            return output

        hooks.append(unit.register_forward_pre_hook(pre))
        hooks.append(unit.register_forward_hook(post))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def outputs(
    model: nn.Module,
    load: Loader,
    inputs,
    kind: str,
    adapted: Optional["Adapted"] = None,
    rounding=None,
    on_tensor=None,
):
    """:func:`psoft_export.models.torch_outputs` of ``model`` run unit by unit with weights from ``load``; with
    ``adapted``, the adapter applied (as trained, or merged and rounded by ``rounding``: :meth:`Adapted.hook`)."""
    from psoft_export.models import torch_outputs

    adapt = None if adapted is None else adapted.hook(rounding, on_tensor)
    whole = frozenset() if adapted is None else adapted.parents
    with streamed(model, load, adapt, whole):
        return torch_outputs(model, inputs, kind)


def source_loader(model_dir: Path, model: nn.Module, extra: Optional[Mapping[str, torch.Tensor]] = None) -> Loader:
    """The tensors of ``model_dir`` by ``model``'s names, in float32 (or from ``extra``, the heads saved with an
    adapter): a base model's files, or a merged safetensors export's own (what loading it in transformers gives, one
    unit at a time)."""
    source, extra = ModelSource(model_dir), extra or {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = canonical_names(model)
    keys = set(source.keys())

    def load(name: str) -> torch.Tensor:
        key = names.get(name, name)
        if key in extra:
            return extra[key].to(torch.float32)
        src = next((k for k in prefix_variants(key, prefix) if k in keys), None)
        if src is None:
            raise KeyError(f"{model_dir} has no tensor {key}")
        t = source.tensor(src)
        return t.to(torch.float32) if t.is_floating_point() else t

    return load


class Adapted:
    """The adapter applied unit by unit, built here from the adapter directory (not from a writer's plan, so a
    writer's mistake is not repeated in the reference it is checked against): ``exact`` runs each adapted layer as
    trained (the float32 model with the adapter); otherwise each is merged with its own ``merge`` and every tensor
    of the unit passed through ``rounding(canonical name, tensor)`` (the rounded reference of a merged export)."""

    def __init__(self, model: nn.Module, model_dir: Path, adapter_dir: Path) -> None:
        from psoft_export import adapter_io
        from psoft_export.adapters import select_targets
        from psoft_export.streamed import saved_heads

        self.adapter = adapter_io.read_adapter(adapter_dir, model, model_dir)
        self.targets = set(select_targets(model, self.adapter.targets))
        self.parents = frozenset(t.rpartition(".")[0] for t in self.targets)
        self.extra = saved_heads(model, self.adapter, adapter_dir)
        self.names = canonical_names(model)
        self.model = model

    def rounded(self, load: Loader, rounding: Callable[[str, torch.Tensor], torch.Tensor]) -> Loader:
        """Each tensor of the merged model alone, rounded (the tensor-by-tensor comparison with an export's files):
        an adapted weight folded by its layer's own ``merge`` (:func:`psoft_export.adapters.fold_weight`)."""
        from psoft_export import adapter_io
        from psoft_export.adapters import fold_weight
        from psoft_export.adapters.layout import is_fan_in_fan_out

        def get(name: str) -> torch.Tensor:
            key = self.names.get(name, name)
            t = load(name)
            module, _, leaf = key.rpartition(".")
            if module in self.targets and leaf == "weight":
                fifo = is_fan_in_fan_out(self.model.get_submodule(module))
                t = fold_weight(t, fifo, lambda base: adapter_io.adapter_layer(self.adapter, module, base))
            return rounding(key, t)

        return get

    def hook(self, rounding: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None, on_tensor=None):
        """The per-unit step for :func:`streamed`: ``None`` rounding runs the adapter unmerged; ``on_tensor(canonical
        name, tensor)`` sees each rounded tensor while it is loaded (the comparison with the export's files)."""
        from psoft_export import adapter_io

        def adapt(prefix: str, unit: nn.Module) -> Callable[[], None]:
            swapped = []
            for name in sorted(t for t in self.targets if not prefix or t.startswith(prefix + ".")):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                base = getattr(parent, child)
                layer = adapter_io.adapter_layer(self.adapter, name, base)
                if rounding is None:
                    setattr(parent, child, layer)
                    swapped.append((parent, child, base))
                else:
                    layer.merge()  # folds into base's (loaded) weight in place
            if rounding is not None:
                for mod_name, mod in unit.named_modules(prefix=prefix):
                    for pname, param in mod.named_parameters(recurse=False):
                        full = f"{mod_name}.{pname}" if mod_name else pname
                        param.data = rounding(self.names.get(full, full), param.data)
                        if on_tensor is not None:
                            on_tensor(self.names.get(full, full), param.data)

            def undo() -> None:
                for parent, child, base in swapped:
                    setattr(parent, child, base)

            return undo

        return adapt
