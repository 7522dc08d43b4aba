"""OFTv2: a block-diagonal orthogonal rotation of the input, applied input-centrically.

``R = diag(R_1, ..., R_n)`` ``(in, in)`` with blocks ``b x b``; the forward rotates the input block by block,
``x' = x R``, then runs the frozen layer: ``y = x' W^T``. ``W R`` is never formed in the forward pass
(cost ``O(tokens * in * b)``, no second copy of ``W``). Merge: ``W' = W R^T``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import nn

from psoft_export.adapters import cayley as cay
from psoft_export.adapters.bnb import dequantized_weight, is_quantized
from psoft_export.adapters.layout import features, is_linear, weight_out_in
from psoft_export.adapters.psoft import CAYLEY_MODES, _choice
from psoft_export.errors import UserInputError


@dataclass
class OftConfig:
    """What a user configures for OFTv2. Field metadata carries the help text the CLI shows."""

    block_size: int = field(default=32, metadata={"help": "Block size b; must divide every target's in_features."})
    cayley: str = field(
        default="neumann", metadata={"help": "exact: (I+Q)(I-Q)^-1 by a solve; neumann: truncated series."}
    )
    neumann_terms: int = field(
        default=6,
        metadata={"help": "Terms of the Cayley-Neumann series (PEFT's count). Even values keep R orthogonal."},
    )
    neumann_eps: Optional[float] = field(
        default=None, metadata={"help": "Clip each block's ||Q||_F to this bound (0 < eps < 1)."}
    )
    block_share: bool = field(default=False, metadata={"help": "One rotation block shared by all blocks."})

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise UserInputError(f"block_size must be an integer >= 2, got {self.block_size!r}")
        _choice("cayley", self.cayley, CAYLEY_MODES)
        if not isinstance(self.neumann_terms, int) or isinstance(self.neumann_terms, bool) or self.neumann_terms < 1:
            raise UserInputError(f"neumann_terms must be an integer >= 1, got {self.neumann_terms!r}")
        if self.neumann_eps is not None and not 0.0 < self.neumann_eps < 1.0:
            raise UserInputError(f"neumann_eps must be in (0, 1), got {self.neumann_eps}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def fitting_block_sizes(in_features: int, near: int, count: int = 4) -> list[int]:
    """Divisors of ``in_features`` (>= 2) closest to ``near``: what to suggest when a block size does not fit."""
    divisors = [d for d in range(2, in_features + 1) if in_features % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - near), d))[:count])


class OftLinear(nn.Module):
    """OFTv2 around a frozen ``nn.Linear``, ``Conv1D`` or bitsandbytes 4-bit ``Linear4bit`` (``base_layer``: a
    quantized base is only ever called, on the rotated input).

    Parameter ``q`` ``(n, b (b-1) / 2)`` (``n = 1`` with ``block_share``). At init ``R = I`` exactly.
    """

    def __init__(self, base_layer: nn.Module, config: OftConfig, name: str = "") -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise UserInputError(f"OFT adapts nn.Linear or Conv1D, not {type(base_layer).__name__} ({name})")
        self.base_layer = base_layer
        self.config = config
        self.out_features, self.in_features = features(base_layer)
        b = config.block_size
        if self.in_features % b:
            fits = ", ".join(map(str, fitting_block_sizes(self.in_features, b)))
            raise UserInputError(
                f"block size {b} does not divide in_features={self.in_features} of {name or 'layer'}: try {fits}"
            )
        self.num_blocks = self.in_features // b
        weight = base_layer.weight
        dtype = cay.compute_dtype(weight.dtype)
        stored = 1 if config.block_share else self.num_blocks
        self.q = nn.Parameter(torch.zeros(stored, cay.num_skew_params(b), device=weight.device, dtype=dtype))
        self.merged = False
        self._group: Optional[RotationGroup] = None  # set by group_rotations: blocks built with its siblings

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def rotation_blocks(self) -> torch.Tensor:
        """The blocks ``R_i`` ``(n, b, b)`` (``(1, b, b)`` when shared), float32 or float64."""
        c = self.config
        return cay.orthogonal(self.q, c.block_size, c.cayley, c.neumann_terms, c.neumann_eps)

    def rotation(self) -> torch.Tensor:
        """The full block-diagonal ``R`` ``(in, in)``; for tests and reports, never used in the forward pass."""
        blocks = self.rotation_blocks().expand(self.num_blocks, -1, -1)
        return torch.block_diag(*blocks.unbind(0))

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` block by block: ``(..., in) -> (..., in)``."""
        R = (self.rotation_blocks() if self._group is None else self._group.blocks(self)).to(x.dtype)
        b = self.block_size
        if R.shape[0] == 1:  # shared block: one plain matmul over (tokens * n, b)
            return (x.reshape(-1, b) @ R[0]).reshape(x.shape)
        xb = x.reshape(-1, self.num_blocks, b).transpose(0, 1)  # (n, tokens, b)
        return torch.bmm(xb, R).transpose(0, 1).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.base_layer(self.rotate_input(x))

    def base_weight(self) -> torch.Tensor:
        """``W`` ``(out, in)``: the base layer's weight, or the dequantized weight of a quantized base (a new
        tensor, for merging and reports: the forward pass never builds it)."""
        if is_quantized(self.base_layer):
            return dequantized_weight(self.base_layer)
        return weight_out_in(self.base_layer)

    def merged_weight(self) -> torch.Tensor:
        """``W R^T`` ``(out, in)`` in ``nn.Linear`` layout, float32 or float64."""
        R = self.rotation_blocks().expand(self.num_blocks, -1, -1)
        W = self.base_weight().to(R.dtype)
        Wb = W.reshape(self.out_features, self.num_blocks, self.block_size)
        return torch.einsum("onb,ncb->onc", Wb, R).reshape(W.shape)

    def delta_weight(self) -> torch.Tensor:
        """``W R^T - W`` ``(out, in)``: full rank in general (what a LoRA-only target would have to approximate)."""
        return self.merged_weight() - self.base_weight().to(self.q.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if is_quantized(self.base_layer):
            raise UserInputError(
                "cannot merge into a quantized base layer in place: merge the adapter into the "
                "float model (psoft-export merge folds it into the dequantized weights)"
            )
        self._check_invertible()
        W = weight_out_in(self.base_layer)
        W.copy_(self.merged_weight().to(W.dtype))
        self.merged = True

    def _check_invertible(self, floor: float = 1e-3) -> None:
        """Refuse to merge a (near-)singular rotation: the merge could not be undone and W would be lost.

        PEFT's Neumann polynomial with ``4 | (terms - 1)`` (its default 5) vanishes at eigenvalues ``+-i`` of Q.
        """
        smallest = float(torch.linalg.svdvals(self.rotation_blocks().to(torch.float64)).min())
        if smallest < floor:
            raise UserInputError(
                f"the OFT rotation is singular (smallest singular value {smallest:.1e}): merging would destroy the "
                "weight; train with an even --neumann-terms or a Neumann norm bound below 1"
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W = W' R^{-T}``, with the inverse solved in float64 (Neumann's ``R`` is only near-orthogonal)."""
        if not self.merged:
            return
        R = self.rotation_blocks().to(torch.float64).expand(self.num_blocks, -1, -1)
        W = weight_out_in(self.base_layer)
        Wb = W.to(torch.float64).reshape(self.out_features, self.num_blocks, self.block_size).transpose(0, 1)
        # W'_i = W_i R_i^T  =>  W_i = W'_i R_i^{-T}: solve X R_i^T = W'_i.
        orig = torch.linalg.solve(R.transpose(-1, -2), Wb, left=False).transpose(0, 1).reshape(W.shape)
        W.copy_(orig.to(W.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        c = self.config
        return f"block_size={c.block_size}, blocks={self.num_blocks}, share={c.block_share}, cayley={c.cayley}"


class RotationGroup:
    """OFT layers under one parent module (an attention block, an MLP) with one configuration: their rotation
    blocks are built in one batched Cayley transform (one chain of ``(sum n_i, b, b)`` products and its backward
    instead of one short chain per layer), on the first member's forward; each member takes its blocks once.

    Per-layer chains of ``(n, 32, 32)`` products cost their launch overhead, not their FLOPs, on CPU: on the
    benchmark Llama (hidden 512, 28 layers) building the rotations took 17-20 ms of a 140 ms step one layer at a
    time and 8-10 ms by parent (``docs/benchmarks.md``). The parent is inside any FSDP unit (a decoder layer), so
    every member's parameter is gathered when the group reads it. A member takes the blocks built for it only while
    its ``q`` is the same tensor at the same version, in the same grad and autocast mode, and only once
    (a second forward, e.g. gradient checkpointing's recomputation or the next micro-batch, builds them anew),
    and none survive a backward through the batch they came from (it frees the graph they share: a gradient hook
    drops them). The blocks are the per-layer ones to float rounding (the same products, batched). One difference:
    a member left out of a forward whose siblings ran gets a zero gradient, not none (AdamW then still moves it by
    its momentum and weight decay); every member of an attention block or an MLP runs in a model's forward.
    """

    def __init__(self, members: list[OftLinear]) -> None:
        self.members = members
        self._slots: dict[int, tuple[tuple, torch.Tensor]] = {}
        self._generation = 0

    @staticmethod
    def _state(q: torch.Tensor) -> tuple:
        """What a member's blocks depend on: its own parameter (each block is built from its own generator alone)
        and the modes they were built in."""
        device = q.device.type
        modes = (torch.is_grad_enabled(), torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return (*modes, q.data_ptr(), q._version, q.requires_grad)

    def blocks(self, layer: OftLinear) -> torch.Tensor:
        slot = self._slots.pop(id(layer), None)
        if slot is not None and slot[0] == self._state(layer.q):
            return slot[1]
        qs = [m.q for m in self.members]
        c = layer.config
        R = cay.orthogonal(torch.cat(qs), c.block_size, c.cayley, c.neumann_terms, c.neumann_eps)
        parts = R.split([q.shape[0] for q in qs])
        self._slots = {id(m): (self._state(m.q), part) for m, part in zip(self.members, parts) if m is not layer}
        self._generation += 1
        if R.requires_grad:  # a backward through any member's blocks frees the graph the others hang on
            R.register_hook(functools.partial(self._spent, self._generation))
        return parts[self.members.index(layer)]

    def _spent(self, generation: int, grad: torch.Tensor) -> None:
        if generation == self._generation:
            self._slots = {}

    def __deepcopy__(self, memo: dict) -> RotationGroup:  # the cached blocks (graph nodes) are not copied
        import copy

        return RotationGroup([copy.deepcopy(m, memo) for m in self.members])

    def __getstate__(self) -> dict:
        return {"members": self.members, "_slots": {}, "_generation": 0}


def group_rotations(model: nn.Module) -> int:
    """Link the OFT layers of ``model`` that share a parent and a configuration into :class:`RotationGroup` s;
    the number of groups. A layer alone stays ungrouped."""
    groups: dict[tuple, list[OftLinear]] = {}
    for name, module in model.named_modules():
        if isinstance(module, OftLinear):
            module._group = None
            c = module.config
            parent = name.rpartition(".")[0]
            key = (parent, c.block_size, c.cayley, c.neumann_terms, c.neumann_eps, module.q.dtype, module.q.device)
            groups.setdefault(key, []).append(module)
    linked = [members for members in groups.values() if len(members) > 1]
    for members in linked:
        group = RotationGroup(members)
        for m in members:
            m._group = group
    return len(linked)
