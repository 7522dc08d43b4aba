"""Principal subspace of a weight: the truncated SVD PSOFT adapts inside, and the ``A``/``B`` factors built from it.

Pure math, no I/O. ``decompose`` stores what these return so nothing downstream re-runs an SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from psoft_export.errors import UserInputError

SVD_BACKENDS = ("full", "lowrank")
INITS = ("psoft", "pissa")


@dataclass(frozen=True)
class Subspace:
    """Rank-``r`` truncated SVD ``W ≈ U diag(S) Vh`` of an ``(out, in)`` weight, float32.

    Attributes:
        U: ``(out, r)`` orthonormal columns.
        S: ``(r,)`` singular values, descending.
        Vh: ``(r, in)`` orthonormal rows.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def rank(self) -> int:
        return self.S.shape[0]


def check_rank(rank: int, out_features: int, in_features: int, where: str = "") -> None:
    limit = min(out_features, in_features)
    if not 0 < rank <= limit:
        at = f" for {where}" if where else ""
        raise UserInputError(
            f"rank {rank} is invalid{at} (shape {out_features}x{in_features}): choose 1 <= rank <= {limit}"
        )


def principal_subspace(
    W: torch.Tensor, rank: int, *, svd: str = "full", niter: int = 10, seed: int = 0
) -> Subspace:
    """Truncated SVD of ``W`` ``(out, in)`` in float32 (float64 stays float64).

    ``svd="full"`` is ``torch.linalg.svd(full_matrices=False)``; ``svd="lowrank"`` is ``torch.svd_lowrank``
    with ``q=rank`` and ``niter`` power iterations under a forked RNG seeded with ``seed`` (what PEFT does,
    so the same weight gives the same factors as PEFT's ``PsoftConfig`` on the same machine).
    """
    if W.ndim != 2:
        raise UserInputError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise UserInputError(f"weight dtype {W.dtype} is not floating point: PSOFT needs a float weight")
    check_rank(rank, *W.shape)
    W = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    if svd == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return Subspace(U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous())
    if svd == "lowrank":
        devices = [] if W.device.type == "cpu" else [W.device]
        kwargs = {} if W.device.type == "cpu" else {"device_type": W.device.type}
        with torch.random.fork_rng(devices=devices, **kwargs):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=rank, niter=niter)
        return Subspace(U[:, :rank].contiguous(), S[:rank].contiguous(), V[:, :rank].t().contiguous())
    raise UserInputError(f"unknown SVD backend {svd!r}: choose one of {', '.join(SVD_BACKENDS)}")


def psoft_factors(sub: Subspace, scaling: float, init: str = "psoft") -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` ``(r, in)`` and ``B`` ``(out, r)`` such that ``scaling * B @ A = U diag(S) Vh``.

    - ``psoft``: ``A = Vh`` (orthonormal rows), ``B = U diag(S) / scaling``.
    - ``pissa``: ``A = diag(sqrt(S / scaling)) Vh``, ``B = U diag(sqrt(S / scaling))``.
    """
    S = sub.S / scaling
    if init == "psoft":
        A, B = sub.Vh, sub.U * S
    elif init == "pissa":
        root = S.sqrt()
        A, B = root[:, None] * sub.Vh, sub.U * root
    else:
        raise UserInputError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
    return A.contiguous(), B.contiguous()


def energy_fraction(S_all: torch.Tensor, rank: int) -> float:
    """Fraction of spectral energy a rank keeps: ``sum(S[:rank]^2) / sum(S^2)``."""
    energy = S_all.double().square()
    return float(energy[:rank].sum() / energy.sum())
