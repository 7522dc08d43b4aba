"""PSOFT: orthogonal rotation ``R`` (``r x r``) inside the principal subspace of a frozen weight.

Effective weight ``W + s B (R - I) A`` with ``s = alpha / r``; ``A`` ``(r, in)`` and ``B`` ``(out, r)`` are frozen
buffers from the SVD (``psoft_export.subspace``), ``R = diag(vector_b) C(Q) diag(vector_a)`` is trained.
See docs/adapters.md (PSOFT) for the math and PEFT's conventions.

Over a bitsandbytes 4-bit base (``train --quantize``) the base layer is only ever called: ``y = base4bit(x) +
s ((x A^T) (R - I)^T) B^T``, the low-rank update beside the 4-bit kernel, so the function is
``dequant(quant(W)) + s B (R - I) A`` and no dequantized weight is formed in the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from psoft_export.adapters import cayley as cay
from psoft_export.adapters import fused
from psoft_export.adapters.bnb import dequantized_weight, is_quantized
from psoft_export.adapters.layout import features, is_fan_in_fan_out, is_linear, weight_out_in
from psoft_export.errors import UserInputError
from psoft_export.subspace import INITS, SVD_BACKENDS, check_rank, principal_subspace, psoft_factors

CAYLEY_MODES = ("exact", "neumann")


@dataclass
class PsoftConfig:
    """What a user configures for PSOFT. Field metadata carries the help text the CLI shows."""

    rank: int = field(default=32, metadata={"help": "Rank r of the principal subspace; R is r x r."})
    alpha: float = field(
        default=32.0, metadata={"help": "Scaling s = alpha / r. Cancels out of the function with psoft init."}
    )
    init: str = field(
        default="psoft",
        metadata={"help": "psoft: A = V_r^T (orthonormal rows, geometry-preserving); pissa: symmetric split."},
    )
    svd: str = field(default="full", metadata={"help": "SVD backend: full (exact) or lowrank (randomized)."})
    niter: int = field(default=10, metadata={"help": "Power iterations for the lowrank SVD."})
    seed: int = field(default=0, metadata={"help": "Seed of the lowrank SVD's random projection."})
    cayley: str = field(
        default="exact", metadata={"help": "exact: (I+Q)(I-Q)^-1 by a solve; neumann: truncated series."}
    )
    neumann_terms: int = field(
        default=6,
        metadata={"help": "Terms of the Cayley-Neumann series (PEFT's count). Even values keep R orthogonal."},
    )
    neumann_eps: Optional[float] = field(
        default=None, metadata={"help": "Clip ||Q||_F to this bound (0 < eps < 1) before the series."}
    )
    vector_a: bool = field(default=True, metadata={"help": "Train a scaling vector on the input side of R."})
    vector_b: bool = field(default=True, metadata={"help": "Train a scaling vector on the output side of R."})
    orth: bool = field(default=True, metadata={"help": "Constrain R to be orthogonal (False: R is a free matrix)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter path's input."})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise UserInputError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise UserInputError(f"alpha must be > 0, got {self.alpha!r}")
        _choice("init", self.init, INITS)
        _choice("svd", self.svd, SVD_BACKENDS)
        _choice("cayley", self.cayley, CAYLEY_MODES)
        if self.niter < 0:
            raise UserInputError(f"niter must be >= 0, got {self.niter}")
        if not isinstance(self.neumann_terms, int) or isinstance(self.neumann_terms, bool) or self.neumann_terms < 1:
            raise UserInputError(f"neumann_terms must be an integer >= 1, got {self.neumann_terms!r}")
        if self.neumann_eps is not None and not 0.0 < self.neumann_eps < 1.0:
            raise UserInputError(f"neumann_eps must be in (0, 1), got {self.neumann_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserInputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


class PsoftLinear(nn.Module):
    """PSOFT around a frozen ``nn.Linear`` or ``Conv1D`` (``base_layer``).

    Buffers ``A`` ``(r, in)``, ``B`` ``(out, r)`` (float32); parameters ``q`` ``(r (r-1) / 2,)`` (or ``(r, r)``
    when ``orth=False``), ``vector_a`` and ``vector_b`` ``(r,)`` when enabled. At init ``R = I`` exactly, so the
    output equals the base layer's bit for bit. A 4-bit base without given ``factors`` takes them from its
    dequantized weight (``factors_from``: ``given``, ``weight`` or ``dequantized``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        config: PsoftConfig,
        factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        name: str = "",
    ) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise UserInputError(f"PSOFT adapts nn.Linear or Conv1D, not {type(base_layer).__name__} ({name})")
        self.base_layer = base_layer
        self.config = config
        self.out_features, self.in_features = features(base_layer)
        r = config.rank
        check_rank(r, self.out_features, self.in_features, name)
        self.factors_from = "given"
        if factors is None:  # a 4-bit base: the only weight at hand is the one the layer computes with
            self.factors_from = "dequantized" if is_quantized(base_layer) else "weight"
            W = dequantized_weight(base_layer) if is_quantized(base_layer) else weight_out_in(base_layer)
            sub = principal_subspace(W, r, svd=config.svd, niter=config.niter, seed=config.seed)
            factors = psoft_factors(sub, config.scaling, config.init)
        A, B = factors
        if tuple(A.shape) != (r, self.in_features) or tuple(B.shape) != (self.out_features, r):
            raise UserInputError(
                f"factors for {name or 'layer'} have shapes A{tuple(A.shape)} B{tuple(B.shape)}, expected "
                f"A({r}, {self.in_features}) B({self.out_features}, {r}): "
                "the decomposition is for another model or rank"
            )
        device = base_layer.weight.device
        dtype = cay.compute_dtype(base_layer.weight.dtype)  # float32 for a 4-bit base (uint8 codes)
        self.register_buffer("A", A.detach().to(device=device, dtype=dtype).contiguous())
        self.register_buffer("B", B.detach().to(device=device, dtype=dtype).contiguous())
        if config.orth:
            self.q = nn.Parameter(torch.zeros(cay.num_skew_params(r), device=device, dtype=dtype))
        else:
            self.q = nn.Parameter(torch.eye(r, device=device, dtype=dtype))
        self.vector_a = nn.Parameter(torch.ones(r, device=device, dtype=dtype)) if config.vector_a else None
        self.vector_b = nn.Parameter(torch.ones(r, device=device, dtype=dtype)) if config.vector_b else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.merged = False
        # How the training step computes the update (psoft_export.adapters.fused): "auto" picks per call between
        # the per-token low-rank path and a transient merged weight by FLOP count; "token"/"merged" force one;
        # "autograd" runs the unfused reference (three F.linear calls, autograd saves what it needs).
        self.path = "auto"

    @property
    def rank(self) -> int:
        return self.config.rank

    def orthogonal_part(self) -> torch.Tensor:
        """``C(Q)`` ``(r, r)``, the rotation without the scaling vectors (``q`` itself when ``orth=False``): what
        training watches for orthogonality."""
        c = self.config
        if c.orth:
            return cay.orthogonal(self.q, c.rank, c.cayley, c.neumann_terms, c.neumann_eps)
        return self.q.to(cay.compute_dtype(self.q.dtype))

    def rotation(self) -> torch.Tensor:
        """``R = diag(vector_b) C(Q) diag(vector_a)`` ``(r, r)`` in float32 (float64 for float64 layers)."""
        R = self.orthogonal_part()
        if self.vector_b is not None:
            R = self.vector_b[:, None] * R
        if self.vector_a is not None:
            R = R * self.vector_a[None, :]
        return R

    def _core(self) -> torch.Tensor:
        """``s (R - I)`` ``(r, r)``: the only part of the update that depends on trained parameters."""
        R = self.rotation()
        return self.scaling * (R - torch.eye(R.shape[0], dtype=R.dtype, device=R.device))

    def delta_weight(self) -> torch.Tensor:
        """``s B (R - I) A`` ``(out, in)`` in ``nn.Linear`` layout, float32."""
        return self.B @ self._core() @ self.A

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA form: ``lora_A = (R - I) A`` ``(r, in)``, ``lora_B = B`` ``(out, r)``, scaling ``alpha / r``."""
        core = self._core() / self.scaling
        return core @ self.A, self.B.clone()

    def _fusable(self) -> bool:
        """The fused node needs a float base weight, frozen ``A``, ``B`` and no active dropout (the adapter path sees
        the base's ``x``). A 4-bit base is called as it is, the update added beside it."""
        if self.path == "autograd" or self.A.requires_grad or self.B.requires_grad or is_quantized(self.base_layer):
            return False
        return isinstance(self.dropout, nn.Identity) or not self.training or self.dropout.p == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._fusable():
            base = self.base_layer
            return fused.psoft_linear(
                x, base.weight, base.bias, self.A, self.B, self._core(), is_fan_in_fan_out(base), self.path
            )
        y = self.base_layer(x)
        dtype = y.dtype
        xa = F.linear(self.dropout(x).to(dtype), self.A.to(dtype))
        return y + F.linear(F.linear(xa, self._core().to(dtype)), self.B.to(dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight in place: ``W <- W + s B (R - I) A``."""
        if self.merged:
            return
        self._check_float_base()
        W = weight_out_in(self.base_layer)
        W.add_(self.delta_weight().to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        W = weight_out_in(self.base_layer)
        W.sub_(self.delta_weight().to(W.dtype))
        self.merged = False

    def _check_float_base(self) -> None:
        if is_quantized(self.base_layer):
            raise UserInputError(
                "cannot merge into a quantized base layer in place: merge the adapter into the "
                "float model (psoft-export merge folds it into the dequantized weights)"
            )

    def extra_repr(self) -> str:
        c = self.config
        return f"rank={c.rank}, cayley={c.cayley}, vectors=({c.vector_a}, {c.vector_b}), merged={self.merged}"
