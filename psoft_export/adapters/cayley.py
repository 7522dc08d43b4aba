"""Orthogonal parameterisations shared by PSOFT and OFT: skew-symmetric generators and Cayley transforms.

Convention (ours, for both methods): ``cayley(Q) = (I + Q)(I - Q)^{-1}``, and the Cayley–Neumann series
approximates that same matrix. PEFT's OFT exact mode uses the transpose, ``(I - Q)(I + Q)^{-1}``, which equals
``cayley(-Q)``: interop with it negates the generator instead of switching conventions here.
"""

from __future__ import annotations

import functools

import torch

from psoft_export.errors import UserInputError


@functools.lru_cache(maxsize=64)
def _triu_indices(size: int) -> torch.Tensor:
    return torch.triu_indices(size, size, 1)


def num_skew_params(size: int) -> int:
    """Number of free parameters of a ``size x size`` skew-symmetric matrix: ``size (size - 1) / 2``."""
    return size * (size - 1) // 2


def skew_symmetric(params: torch.Tensor, size: int) -> torch.Tensor:
    """Build ``Q = T - T^T`` from the strict upper triangle ``T``.

    Args:
        params: ``(..., size (size - 1) / 2)``, row-major order of ``torch.triu_indices(size, size, 1)``
            (the order PEFT uses, so parameters copy across unchanged).
    Returns:
        ``(..., size, size)`` skew-symmetric.
    """
    rows, cols = _triu_indices(size).to(params.device).unbind(0)
    upper = params.new_zeros(*params.shape[:-1], size, size)
    upper[..., rows, cols] = params
    return upper - upper.transpose(-1, -2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rotations are computed in float32 at least: ``linalg.solve`` fails in half precision on GPU."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cayley(Q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform ``(I + Q)(I - Q)^{-1}`` of a (batch of) skew-symmetric ``(..., n, n)``.

    Orthogonal for any skew-symmetric ``Q`` (``I - Q`` is always invertible). The solve runs in float64 and
    the result is rounded to float32 (float64 input stays float64): a float32 solve leaves
    ``||R^T R - I||_F`` at 1e-6..4e-5 for n = 33..512, the float64 one below 1e-6 (see docs/adapters.md).
    ``n x n`` solves are cheap next to the layers they feed. ``solve_ex`` without its error check: on CUDA,
    ``linalg.solve`` checks LAPACK's status on the host, a device sync in every adapted layer's forward and
    backward (``I - Q`` cannot be singular, so there is nothing to check).
    """
    out_dtype = compute_dtype(Q.dtype)
    Q = Q.to(torch.float64)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    return torch.linalg.solve_ex(eye - Q, eye + Q, left=False, check_errors=False).result.to(out_dtype)


@functools.lru_cache(maxsize=32)
def neumann_coefficients(terms: int) -> tuple[float, ...]:
    """Coefficients ``c_k`` of ``R = sum_k c_k Q^k``, PEFT's Cayley–Neumann series with ``terms`` terms.

    ``(I + Q)(I - Q)^{-1} = I + 2Q + 2Q^2 + ...``; PEFT truncates it as ``I + 2(Q + ... + Q^{t-2}) + Q^{t-1}``
    (so the last term halves), except that its loop makes ``t = 3`` equal to ``t = 4``. We reproduce that
    exactly so PEFT adapters keep their function. Even ``t`` (odd degree) is the orthogonality-preserving
    choice: ``R(Q)^T R(Q) = I - Q^{2(t-1)}`` then, against ``I - 2Q^{t-1} + ...`` for odd ``t``.
    """
    if terms < 1:
        raise UserInputError(f"neumann terms must be >= 1, got {terms}")
    if terms == 1:
        return (1.0,)
    if terms == 2:
        return (1.0, 2.0)
    degree = max(terms - 1, 3)
    return (1.0,) + (2.0,) * (degree - 1) + (1.0,)


def clip_frobenius(Q: torch.Tensor, eps: float) -> torch.Tensor:
    """Rescale each ``(n, n)`` matrix of ``Q`` so that ``||Q||_F <= eps`` (PEFT's ``cayley_neumann_eps``)."""
    norm = torch.linalg.matrix_norm(Q, ord="fro", keepdim=True)
    scale = torch.where(norm > eps, eps / (norm + 1e-12), torch.ones_like(norm))
    return Q * scale


def cayley_neumann(Q: torch.Tensor, terms: int, eps: float | None = None) -> torch.Tensor:
    """Cayley–Neumann approximation of ``cayley(Q)`` (no inverse: ``degree - 1`` matrix products, Horner form).

    Args:
        Q: ``(..., n, n)`` skew-symmetric.
        terms: number of series terms, PEFT's meaning (see :func:`neumann_coefficients`).
        eps: optional Frobenius-norm bound on ``Q`` applied first (the series needs ``||Q|| < 1``).
    """
    Q = Q.to(compute_dtype(Q.dtype))
    if eps is not None:
        Q = clip_frobenius(Q, eps)
    coeffs = neumann_coefficients(terms)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    if len(coeffs) == 1:
        return (coeffs[0] * eye).expand_as(Q).clone()
    R = coeffs[-1] * Q + coeffs[-2] * eye  # the first Horner step without its product by the identity
    for c in reversed(coeffs[:-2]):
        R = torch.matmul(R, Q) + c * eye
    return R


def orthogonal(params: torch.Tensor, size: int, mode: str, terms: int, eps: float | None) -> torch.Tensor:
    """The rotation ``(..., size, size)`` from skew parameters ``(..., size (size-1) / 2)``: ``mode`` exact|neumann."""
    Q = skew_symmetric(params, size)
    if mode == "exact":
        return cayley(Q)
    return cayley_neumann(Q, terms, eps)


def orthogonality_error(R: torch.Tensor) -> torch.Tensor:
    """``||R^T R - I||_F`` (largest over a batch), in float64: how far a rotation is from orthogonal."""
    R = R.detach().to(torch.float64)
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return torch.linalg.matrix_norm(R.transpose(-1, -2) @ R - eye).max()
