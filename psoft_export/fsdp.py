"""``train --fsdp``: the frozen base sharded across the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

What is sharded and what is replicated, and why:

- **Sharded: every parameter of the frozen base** (embeddings, attention and MLP weights, norms, the LM head), one
  FSDP unit per transformer block (the model's ``_no_split_modules``: ``LlamaDecoderLayer``, ``GPT2Block``, ...)
  plus the root for what lies outside the blocks. A rank holds 1/N of the base at rest; a block is all-gathered for
  its forward and again for its backward (``reshard_after_forward``), the root's parameters stay gathered for the
  whole step (FSDP2 does not reshard the root after forward). The base is frozen, so nothing of it is ever
  reduce-scattered and no rank holds a gradient or an optimizer state of it.
- **Replicated: the trainable tensors** (PSOFT's ``q`` and scaling vectors, OFT's rotation blocks, new heads),
  passed to ``fully_shard`` as ``ignored_params``: plain tensors on every rank, as without ``--fsdp``. They are small
  (PSOFT r=32 on Llama-2-7B: 125 k parameters; OFT b=32: 17.6 M, 1% of the base) and sharding them would buy
  1/N of that and of its Adam state while costing a reduce-scatter per block per micro-batch and a gather before
  every optimizer step, clipping norm and checkpoint. Replicated, the step keeps the one flat all-reduce of
  distributed.py (the same bytes as without ``--fsdp``), the same clipping, the same optimizer and the same
  checkpoints, which is why an FSDP run trains what one process trains.
- **Replicated: PSOFT's frozen factors A (r x in) and B (out x r)**, which are buffers, and FSDP2 shards parameters
  only. Per layer they are r (in + out) numbers against the weight's in x out: 3% of the base at r=32 on a
  2048-wide model (in float32 against a bf16 base: 6%), 12% at r=128. Sharding them would mean turning them into
  frozen parameters gathered with their block in every forward and backward; kept whole, the fused PSOFT kernel
  reads them as it does in one process.

Every FSDP forward is a collective (the all-gather of the block's shards), so every rank runs as many forward and
backward passes as the others: a rank with fewer micro-batches in a step (a short last batch) or fewer eval batches
runs a repeat of a real batch whose loss has weight 0 (distributed.py). The model is read whole into host memory by
every rank, then sharded and moved to the device: the device never holds more than its shard and the gathered
blocks; host memory holds the whole base per rank while loading (freed after sharding).

Saving: the trainable tensors are on every rank already. PSOFT's PEFT form is checked against PEFT's SVD of each
base weight, so each PSOFT target's weight is gathered (all ranks take part, one weight at a time) to rank 0's host
memory, where a copy of the adapter layers with whole base weights is written by the same ``save_adapter`` as a
single-process run; OFT needs no base weight. rank 0's host holds the targeted weights while it saves.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from psoft_export.adapters import PsoftLinear, adapter_layers


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one unit each: modules of a class the model names in
    ``_no_split_modules`` (what accelerate and HF use as the unit of placement), outermost first."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    return [m for m in found if not any(o is not m and m in set(o.modules()) for o in found)]


def shard(model: nn.Module, world, device: str) -> nn.Module:
    """Shard ``model``'s frozen parameters over the ranks of ``world`` (in place) and move the rest to ``device``:
    the trainable parameters and every buffer stay whole on each rank (module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in model.parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.to(device)
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
    mesh = init_device_mesh(device, (world.size,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    return model


def load_device(fsdp: bool, device: str) -> str:
    """Where the model is read before training: the host under ``--fsdp`` (sharded onto ``device`` afterwards)."""
    return "cpu" if fsdp else device


def local_bytes(model: nn.Module) -> dict:
    """Bytes this rank holds of ``model``: the base's shards, the replicated trainable tensors and the buffers."""
    from torch.distributed.tensor import DTensor

    out = {"sharded": 0, "trainable": 0, "buffers": 0, "other": 0}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        kind = "sharded" if isinstance(p, DTensor) else "trainable" if p.requires_grad else "other"
        out[kind] += local.numel() * local.element_size()
    out["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())
    return out


# ------------------------------------------------------------------------------------------------ saving


def for_saving(run):
    """``run`` as the adapter writer needs it: itself without ``--fsdp``; with it, every rank takes part in gathering
    the PSOFT targets' base weights and rank 0 gets ``run`` with a host copy of the adapter layers (whole base
    weights) and the heads in place of the sharded model; the other ranks get None."""
    if not getattr(run.cfg, "fsdp", False):
        return run
    from torch.distributed.fsdp import FSDPModule

    model, main = run.model, run.world.is_main
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # every base parameter a shard again, whatever the last forward left gathered
    copy = nn.Module()
    for name, layer in adapter_layers(model).items():
        params = layer.base_layer.named_parameters(recurse=False) if _needs_base(layer) else []
        whole = {n: _gathered(p) for n, p in params}
        if main:
            _put(copy, name, _host_copy(layer, whole))
    if not main:
        return None
    for head in run.heads:
        _put(copy, head, _host_module(model.get_submodule(head)))
    return dataclasses.replace(run, model=copy)


def _needs_base(layer: nn.Module) -> bool:
    return isinstance(layer, PsoftLinear)  # the PEFT-form check recomputes PEFT's SVD of the base weight


def _gathered(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the host (a collective for a shard: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    whole = p.full_tensor() if isinstance(p, DTensor) else p
    return whole.detach().cpu()


def _host_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (same class and attributes, no forward hooks) whose parameters and buffers are host
    tensors; a shard (a base parameter FSDP manages) is left out (None) and filled in by :func:`_host_copy`."""
    from torch.distributed.tensor import DTensor

    new = object.__new__(type(module))
    new.__dict__.update(module.__dict__)
    new._forward_hooks, new._forward_pre_hooks = {}, {}
    new._parameters = {
        n: None if p is None or isinstance(p, DTensor) else nn.Parameter(p.detach().cpu().clone(), p.requires_grad)
        for n, p in module._parameters.items()
    }
    new._buffers = {n: None if b is None else b.detach().cpu().clone() for n, b in module._buffers.items()}
    new._modules = {n: None if sub is None else _host_module(sub) for n, sub in module._modules.items()}
    return new


def _host_copy(layer: nn.Module, whole: dict) -> nn.Module:
    """The adapter layer on the host with its base layer's parameters ``whole`` (an OFT layer, saved from its
    rotation alone, is copied without them)."""
    new = _host_module(layer)
    for n, tensor in whole.items():
        new.base_layer._parameters[n] = nn.Parameter(tensor, requires_grad=False)
    return new


def _put(root: nn.Module, name: str, module: nn.Module) -> None:
    parent = root
    *path, last = name.split(".")
    for part in path:
        if part not in parent._modules:
            parent.add_module(part, nn.Module())
        parent = parent._modules[part]
    parent.add_module(last, module)
