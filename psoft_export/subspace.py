"""Principal subspace of a weight: the truncated SVD PSOFT adapts inside, and the ``A``/``B`` factors built from it.

Pure math, no I/O. ``decompose`` stores what these return so nothing downstream re-runs an SVD.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from psoft_export.errors import UserInputError

SVD_BACKENDS = ("exact", "full", "lowrank")
# Float64 Gram work is done a slab of rows/columns at a time, so no float64 copy of a big weight exists.
SLAB_BYTES = 16 << 20
INITS = ("psoft", "pissa")


@dataclass(frozen=True)
class Subspace:
    """Rank-``r`` truncated SVD ``W ≈ U diag(S) Vh`` of an ``(out, in)`` weight, float32.

    Attributes:
        U: ``(out, r)`` orthonormal columns.
        S: ``(r,)`` singular values, descending.
        Vh: ``(r, in)`` orthonormal rows.
        spectrum: all ``min(out, in)`` singular values, descending, or ``None`` (randomized SVD).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    spectrum: Optional[torch.Tensor] = None  # every singular value (descending), when the method yields them
    angle_bound: Optional[float] = None  # computed bound (rad) on the largest principal angle to the exact subspace

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


def principal_subspace(W: torch.Tensor, rank: int, *, svd: str = "exact", niter: int = 10, seed: int = 0) -> Subspace:
    """Rank-``rank`` truncated SVD of ``W`` ``(out, in)``; factors in float32 (float64 stays float64).

    - ``exact`` (default): :func:`gram_subspace`, the smaller Gram matrix's ``eigh`` refined in float64 until a
      computed bound puts the subspace within 1e-7 rad of the exact one (float64 ``eigh`` if it never does).
    - ``full``: ``torch.linalg.svd(full_matrices=False)`` in the weight's precision (PEFT's default; in float32
      its subspace is off by about ``eps32 * s_1 / (s_r - s_{r+1})`` rad, large on flat spectra).
    - ``lowrank``: ``torch.svd_lowrank`` with ``q=rank`` and ``niter`` power iterations under a forked RNG seeded
      with ``seed`` (what PEFT does for ``psoft_svd="lowrank"``).
    """
    if W.ndim != 2:
        raise UserInputError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise UserInputError(f"weight dtype {W.dtype} is not floating point: PSOFT needs a float weight")
    check_rank(rank, *W.shape)
    if svd == "exact":
        return gram_subspace(W, rank)
    W = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    if svd == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return Subspace(U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous(), S)
    if svd == "lowrank":
        devices = [] if W.device.type == "cpu" else [W.device]
        kwargs = {} if W.device.type == "cpu" else {"device_type": W.device.type}
        with torch.random.fork_rng(devices=devices, **kwargs):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=rank, niter=niter)
        return Subspace(U[:, :rank].contiguous(), S[:rank].contiguous(), V[:, :rank].t().contiguous())
    raise UserInputError(f"unknown SVD backend {svd!r}: choose one of {', '.join(SVD_BACKENDS)}")


def _slabs(n: int, width: int) -> list[slice]:
    step = max(1, SLAB_BYTES // (8 * max(width, 1)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _dense(W) -> torch.Tensor:
    return W.load() if hasattr(W, "load") else W


def gram(M: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``M^T M`` ``(n, n)`` of a tall ``M`` ``(m, n)`` in ``dtype``, a slab of rows at a time (each slab upcast on its
    own), so memory is the Gram matrix plus one slab."""
    if hasattr(M, "gram"):  # a checkpoint.StoredMatrix: read from its file
        return M.gram(dtype)
    n = M.shape[1]
    G = torch.zeros(n, n, dtype=dtype, device=M.device)
    for sl in _slabs(M.shape[0], n):
        X = M[sl].to(dtype)
        G.addmm_(X.T, X)
    return G


def _apply(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M X`` ``(m, k)`` in float64 for float64 ``X``, upcasting ``M`` a slab of rows at a time."""
    if hasattr(M, "apply"):
        return M.apply(X)
    return torch.cat([M[sl].to(torch.float64) @ X for sl in _slabs(M.shape[0], M.shape[1])])


def _apply_t(M: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``M^T Y`` ``(n, k)`` in float64, a slab of rows at a time."""
    if hasattr(M, "apply_t"):
        return M.apply_t(Y)
    out = torch.zeros(M.shape[1], Y.shape[1], dtype=torch.float64, device=M.device)
    for sl in _slabs(M.shape[0], M.shape[1]):
        out.addmm_(M[sl].to(torch.float64).T, Y[sl])
    return out


def _gram_apply(M, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M X, M^T M X)`` in float64 (a weight left in its file: one pass where its layout allows)."""
    if hasattr(M, "gram_apply"):
        return M.gram_apply(X)
    P = _apply(M, X)
    return P, _apply_t(M, P)


# Stop refining once the Davis-Kahan bound on the largest principal angle to the exact subspace is below this.
ANGLE_TOL = 1e-7
MAX_REFINEMENTS = 4


def eigh_in_place(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric ``G`` ``(n, n)``, which is destroyed.

    On CPU: LAPACK ``syevd`` through SciPy with ``overwrite_a``, so the eigenvectors take ``G``'s memory and the
    peak is ``G`` + syevd's ``2 n^2`` workspace = ``3 n^2``, where ``torch.linalg.eigh`` copies its input first
    (``4 n^2``, measured 4.2 n^2 at n = 2048). Elsewhere (CUDA): ``torch.linalg.eigh``. The exact subspace uses it
    where :class:`_Tridiagonal` does not apply (CUDA, float64 weights, the float64 fallback).
    """
    if G.device.type != "cpu":
        return torch.linalg.eigh(G)
    from scipy.linalg import eigh  # imported here: only the exact path needs SciPy's LAPACK

    G = G.contiguous()
    # G is symmetric, so its transpose (a Fortran-ordered view, what LAPACK overwrites without a copy) is G itself.
    lam, V = eigh(G.numpy().T, overwrite_a=True, driver="evd", check_finite=False)
    return torch.from_numpy(lam), torch.from_numpy(V)


class _Dense:
    """The Gram matrix's whole eigendecomposition (:func:`eigh_in_place`): the top ``rank`` eigenvectors start the
    refinement, the others (``Vc``, eigenvalues ``lc``) give its first-order correction."""

    def __init__(self, G: torch.Tensor, rank: int) -> None:
        lam, V = eigh_in_place(G)
        k = G.shape[0] - rank
        # Ascending order, never flipped whole (a flip copies n^2): the top block is the last ``rank`` columns.
        self.lam, self.top = lam.double(), V[:, k:].flip(1).double()
        self.Vc, self.lc = V[:, :k], self.lam[:k]  # views: no copy

    def correct(self, R: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """``sum_k v_k v_k^T R_j / (mu_j - lambda_k)`` over the eigenvectors outside the top block."""
        C = (self.Vc.T @ R.to(self.Vc.dtype)).double() / (mu[None, :] - self.lc[:, None])
        return (self.Vc @ C.to(self.Vc.dtype)).double()


class _Tridiagonal:
    """The float32 Gram matrix reduced to tridiagonal form in place (LAPACK ``ssytrd``, ``G = Q T Q^T``), then only
    what the refinement needs: every eigenvalue (``ssterf``), the top ``rank`` eigenvectors (``sstebz`` +
    ``sstein`` on ``T``, mapped back through ``Q`` with ``sormqr``) and the first-order correction as ``rank``
    shifted tridiagonal solves in float64 instead of products with the other ``n - rank`` eigenvectors.

    Against :class:`_Dense` this skips the divide-and-conquer and the ``2 n^3`` back-transformation of all ``n``
    eigenvectors: measured 0.30 s against 0.45-0.53 s at n = 2048 (2 threads), and ``2 n^2`` floats at the peak
    (``G`` and a copy of its Householder vectors) instead of ``3 n^2`` (docs/benchmarks.md, issue 11).
    Raises :class:`ArithmeticError` when LAPACK reports a failure (the caller falls back to float64 ``eigh``).
    """

    def __init__(self, G: torch.Tensor, rank: int) -> None:
        import numpy as np
        from scipy.linalg import lapack

        self.np, self.lapack = np, lapack
        n = self.n = G.shape[0]
        G = G.contiguous()
        # G is symmetric: its Fortran-ordered transpose is G, reduced in place (overwrite_a, no copy).
        lwork = int(lapack.ssytrd_lwork(n, lower=1)[0])
        c, d, e, tau, info = lapack.ssytrd(G.numpy().T, lower=1, lwork=max(1, lwork), overwrite_a=1)
        self._check("ssytrd", info)
        # Q = H(1) ... H(n-1), the reflectors below the subdiagonal: what LAPACK's ormtr passes to ormqr.
        self.refl = np.asfortranarray(c[1:, :-1]) if n > 1 else None
        del c, G
        self.tau = tau[: n - 1]
        lam, info = lapack.ssterf(d.copy(), e.copy())[:2]
        self._check("ssterf", info)
        self.lam = torch.from_numpy(np.sort(lam)).double()
        m, w, iblock, isplit, info = lapack.sstebz(d, e, 3, 0.0, 0.0, n - rank + 1, n, 0.0, b"B")
        self._check("sstebz", info if m == rank else -1)
        Z, info = lapack.sstein(d, e, w[:m], iblock, isplit)
        self._check("sstein", info)
        # Small products run in torch, LAPACK in SciPy: NumPy's own OpenBLAS would be a third thread pool contending
        # for the cores (measured 50-130 ms stalls on 2 cores for 2048x32 products).
        self.Z = torch.from_numpy(Z[:, np.argsort(-w[:m])].astype(np.float64))  # descending
        self.d64, self.off = d.astype(np.float64), -e.astype(np.float64)  # mu I - T: diagonal mu - d, off-diagonal -e
        self.lwork = None
        self.top = self._q(self.Z, b"N")

    @staticmethod
    def _check(routine: str, info: int) -> None:
        if info != 0:
            raise ArithmeticError(f"LAPACK {routine} failed (info {info})")

    def _q(self, X: torch.Tensor, trans: bytes) -> torch.Tensor:
        """``Q X`` (``trans=b"N"``) or ``Q^T X`` (``b"T"``) for ``X`` ``(n, k)``, in float32; float64 out."""
        out = self.np.array(X.numpy(), dtype=self.np.float32, order="F")
        if self.n > 1:
            if self.lwork is None:  # the blocked code's workspace: with less, LAPACK runs unblocked (6x slower)
                self.lwork = max(1, int(self.lapack.sormqr(b"L", b"N", self.refl, self.tau, out[1:], -1)[1][0]))
            cq, _, info = self.lapack.sormqr(b"L", trans, self.refl, self.tau, out[1:], self.lwork, overwrite_c=1)
            self._check("sormqr", info)
            out[1:] = cq
        return torch.from_numpy(out).double()

    def correct(self, R: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """``(mu_j I - G) ^-1`` on the complement of the top block, applied to each residual ``R_j``: in ``T``'s
        coordinates, the top eigenvectors projected out before and after a float64 tridiagonal solve."""
        Z = self.Z
        Y = self._q(R, b"T")
        Y = (Y - Z @ (Z.T @ Y)).numpy()
        X = torch.empty(Y.shape, dtype=torch.float64)
        for j, shift in enumerate(mu.tolist()):
            *_, x, info = self.lapack.dgtsv(self.off, shift - self.d64, self.off, Y[:, j : j + 1].copy())
            self._check("dgtsv", info)
            X[:, j] = torch.from_numpy(x[:, 0])
        return self._q(X - Z @ (Z.T @ X), b"N")


def _initial_basis(G: torch.Tensor, rank: int):
    """The eigendecomposition the refinement starts from: tridiagonal where SciPy's LAPACK serves (CPU, float32),
    the whole ``eigh`` elsewhere."""
    if G.device.type == "cpu" and G.dtype == torch.float32 and rank < G.shape[0]:
        return _Tridiagonal(G, rank)
    return _Dense(G, rank)


def gram_subspace(W: torch.Tensor, rank: int, tol: float = ANGLE_TOL) -> Subspace:
    """The exact top-``rank`` singular subspace of ``W`` ``(out, in)``, fast: the smaller Gram matrix's top
    eigenvectors in float32 for a first basis, then Rayleigh-Ritz refinement in float64 until the residual bound
    says so.

    The float32 eigenvectors are off by ``~ eps32 * s_1^2 / (s_i^2 - s_j^2)`` between directions ``i``, ``j``: on
    a flat-topped spectrum (real and random weights alike) that is a large angle. Each refinement computes
    ``G V`` exactly in float64 (``W^T (W V)``, slab by slab: no float64 copy of ``W``), re-diagonalizes inside the
    block, and removes the first-order error towards the other float32 eigenvectors; it converges
    quadratically (one step on an 8192x2048 random weight: bound 4e-3 -> 6e-8 rad). It stops when
    ``||G V - V diag(mu)||_F / (mu_r - lambda_{r+1}) <= tol`` (the sin-theta bound, stored as ``angle_bound``);
    if that does not happen in :data:`MAX_REFINEMENTS` steps (an ill-posed gap), a float64 ``eigh`` decides.
    Memory: on CPU the Gram matrix reduced to tridiagonal form in place (:class:`_Tridiagonal`, ``2 n^2`` floats
    at the peak), then ``n^2`` while refining; the weight itself only a slab at a time.
    """
    if isinstance(W, torch.Tensor) and W.device.type == "cpu":
        from psoft_export.stored import TensorMatrix

        W = TensorMatrix(W.detach())  # its products in SciPy's BLAS, like a weight left in its file
    if W.device.type != "cpu":
        return _refined_subspace(W.detach(), rank, tol)
    with scipy_threads():
        return _refined_subspace(W, rank, tol)


@contextlib.contextmanager
def scipy_threads():
    """Torch on one thread while SciPy's BLAS/LAPACK does the heavy work of the exact path on CPU: on few cores the
    two thread pools alternating stall each small operation for milliseconds while the other pool's threads spin
    (measured: MiniLM's exact decompose 3.5 s with both at 2 threads, 1.3 s like this). What torch still does
    there is rank x rank, n x rank or memory-bound."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _refined_subspace(W, rank: int, tol: float) -> Subspace:
    f64 = W.dtype == torch.float64
    M = W if W.shape[0] >= W.shape[1] else W.T  # tall: M^T M is the smaller Gram matrix
    n = M.shape[1]
    k = n - rank
    try:
        basis = _initial_basis(gram(M, torch.float64 if f64 else torch.float32), rank)
        Vt, lc = basis.top, basis.lam[:k]  # ``lc`` ascending, so ``lc[-1]`` is lambda_{r+1}
    except ArithmeticError:
        basis = None
    bound = float("inf")
    for _ in range(MAX_REFINEMENTS + 1 if basis is not None else 0):
        P, Z = _gram_apply(M, Vt)
        H = Vt.T @ Z
        mu, Y = torch.linalg.eigh((H + H.T) / 2)
        mu, Y = mu.flip(0), Y.flip(1)
        Vt, Z, P = Vt @ Y, Z @ Y, P @ Y  # P = M Vt still: the other side's vectors need no pass of their own
        residual = Z - Vt * mu
        gap = float(mu[-1] - lc[-1]) if rank < n else float("inf")
        bound = float(torch.linalg.norm(residual)) / gap if gap > 0 else float("inf")
        if bound <= tol:
            break
        try:
            Vt = torch.linalg.qr(Vt + basis.correct(residual, mu)).Q
        except ArithmeticError:
            break
    if not bound <= tol:  # never converged (or NaN): the float64 eigh decides
        basis = Vt = P = None  # the float32 basis goes before the float64 Gram matrix comes
        lam, V = eigh_in_place(gram(M, torch.float64))
        mu, Vt, lc = lam[k:].flip(0), V[:, k:].flip(1).contiguous(), lam[:k]
        del V
    del basis
    S = mu.clamp_min(0).sqrt()
    if S[-1] <= 1e-6 * S[0]:  # a direction at the rounding floor is undetermined: let an SVD pick one
        U, S_all, Vh = torch.linalg.svd(_dense(W).double(), full_matrices=False)
        return _finish(U[:, :rank], S_all, Vh[:rank], W.dtype, 0.0)
    X = (_apply(M, Vt) if P is None else P) / S  # the other side's singular vectors
    spectrum = torch.cat([S, lc.flip(0).clamp_min(0).sqrt()])
    U, V = (X, Vt) if M is W else (Vt, X)
    return _finish(U, spectrum, V.T, W.dtype, bound if math.isfinite(bound) else None)


def _finish(U, spectrum, Vh, dtype, bound) -> Subspace:
    out = torch.float64 if dtype == torch.float64 else torch.float32
    r = U.shape[1]
    return Subspace(
        U.to(out).contiguous(),
        spectrum[:r].to(out).contiguous(),
        Vh.to(out).contiguous(),
        spectrum.to(out).contiguous(),
        bound,
    )


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
