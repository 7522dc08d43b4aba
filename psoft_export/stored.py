"""Weights left in their safetensors files and read a band at a time: what keeps big-weight work within memory.

:class:`StoredMatrix` serves the exact subspace (``decompose``); :func:`unmap_freed_tensors` keeps freed tensor
memory from staying resident between weights (``decompose``, the streamed merge).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

from psoft_export.errors import UserInputError


def unmap_freed_tensors() -> None:
    """Have glibc serve every block of 1 MiB or more by ``mmap`` and unmap it on free. By default glibc raises its
    mmap threshold to the largest block freed so far (up to 32 MiB), after which tensor-sized blocks come from the
    heap and stay resident when freed: measured +77 MiB retained while streaming 9 MiB tensors, twice the working
    set. Process-wide and harmless; a no-op where there is no ``mallopt`` (not glibc)."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic raise)
    except (OSError, AttributeError):
        pass


def read_into(path: Path, offset: int, out: torch.Tensor) -> bool:
    """Fill the fresh tensor ``out`` with the file's bytes at ``offset`` (one read, no second copy); ``False`` when
    the file ends first. A fresh torch allocation is aligned like any parameter (see ``ModelSource.tensor``)."""
    nbytes = out.numel() * out.element_size()
    if not nbytes:
        return True
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) == nbytes


_RAW = {1: (np.int8, torch.int8), 2: (np.int16, torch.int16), 4: (np.int32, torch.int32), 8: (np.int64, torch.int64)}
STREAM_BYTES = 16 << 20  # what one read of StoredMatrix.stats holds (about)
BAND_BYTES = 4 << 20  # the float64 working copy of one band of a StoredMatrix product


def _blas():
    from scipy.linalg import blas  # imported here: only the exact subspace needs it

    return blas


def _as(band: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A band as a C-ordered NumPy array of ``dtype``, float32 or float64 (``.T`` of it is the Fortran view BLAS
    takes): no copy when it already is; NumPy widens float32 (1.6x faster than torch's cast on one thread)."""
    if band.dtype == dtype:
        return band.numpy()
    if band.dtype == torch.float32:
        return band.numpy().astype(np.float64)
    return band.to(dtype).numpy()


class BandedMatrix:
    """A 2-D matrix (or, after ``.T``, its transpose) whose products read it a band of stored rows at a time: the
    float64 products and the Gram matrix the exact subspace needs (:func:`psoft_export.subspace.gram_subspace`
    calls :meth:`gram`, :meth:`gram_apply` and :meth:`apply`), each one pass. They run in SciPy's BLAS, the library
    the eigensolver's LAPACK runs in: on few cores, switching between torch's thread pool and SciPy's stalls each
    small operation for milliseconds while the other pool's threads spin (measured: MiniLM's exact decompose
    3.5 s with torch's products, 1.3 s without; docs/benchmarks.md)."""

    ndim = 2
    device = torch.device("cpu")

    def __init__(self, stored: tuple[int, int], dtype: torch.dtype, transposed: bool) -> None:
        self.stored, self.dtype, self.transposed = tuple(stored), dtype, transposed
        self.shape = torch.Size(self.stored[::-1] if transposed else self.stored)
        self.itemsize = torch.empty(0, dtype=dtype).element_size()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def _read(self, start: int, stop: int) -> torch.Tensor:  # stored rows start:stop, C-contiguous
        raise NotImplementedError

    def _columns(self, start: int, stop: int) -> torch.Tensor:  # stored columns start:stop, C-contiguous
        raise NotImplementedError

    def _bands(self):
        """Bands of stored rows whose float64 working copy is about :data:`BAND_BYTES`."""
        rows, cols = self.stored
        step = max(1, BAND_BYTES // (8 * max(cols, 1)))
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            yield slice(start, stop), self._read(start, stop)

    def load(self) -> torch.Tensor:
        """The whole matrix (this view), for the rare paths that need it."""
        whole = self._read(0, self.stored[0])
        return whole.T.contiguous() if self.transposed else whole

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """``self @ X`` in float64."""
        blas = _blas()
        Xf = np.asfortranarray(X.numpy())
        if not self.transposed:  # a C-ordered band is its transpose in Fortran order: trans_a gives band @ X
            parts = [blas.dgemm(1.0, _as(band, torch.float64).T, Xf, trans_a=1) for _, band in self._bands()]
            return torch.from_numpy(np.concatenate(parts))
        out = np.zeros((self.shape[0], X.shape[1]), order="F")
        for sl, band in self._bands():  # self = S^T: out += band^T X[the band's rows]
            out = blas.dgemm(1.0, _as(band, torch.float64).T, np.asfortranarray(Xf[sl]), beta=1.0, c=out, overwrite_c=1)
        return torch.from_numpy(out)

    def apply_t(self, Y: torch.Tensor) -> torch.Tensor:
        """``self^T @ Y`` in float64."""
        return self.T.apply(Y)

    def gram_apply(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, self^T P)`` with ``P = self @ X``, in float64. Not transposed: one pass, each band read and widened
        once for both products (``self^T self X = sum_b B_b^T (B_b X)``); a transposed view needs all of ``P`` before
        its second product, so two passes."""
        if self.transposed:
            P = self.apply(X)
            return P, self.apply_t(P)
        blas = _blas()
        Xf = np.asfortranarray(X.numpy())
        parts, out = [], np.zeros((self.shape[1], X.shape[1]), order="F")
        for _, band in self._bands():
            b = _as(band, torch.float64).T  # Fortran (cols, rows)
            parts.append(blas.dgemm(1.0, b, Xf, trans_a=1))
            out = blas.dgemm(1.0, b, parts[-1], beta=1.0, c=out, overwrite_c=1)
        return torch.from_numpy(np.concatenate(parts)), torch.from_numpy(out)

    def gram(self, dtype: torch.dtype) -> torch.Tensor:
        """``self^T self`` in ``dtype`` (float32 or float64), a symmetric rank-k update (``syrk``: half the products
        of a full one) per band, each band upcast on its own. Only the triangle LAPACK reads is filled: the
        row-major tensor's upper one (its column-major lower one); :func:`psoft_export.subspace.eigh_in_place` and
        the tridiagonal reduction read that. Not transposed: bands of stored rows; transposed (``S S^T``): bands of
        stored columns of about :data:`STREAM_BYTES`."""
        blas, rows, cols = _blas(), *self.stored
        syrk = blas.ssyrk if dtype == torch.float32 else blas.dsyrk
        n = rows if self.transposed else cols
        G = np.zeros((n, n), dtype=np.float32 if dtype == torch.float32 else np.float64, order="F")
        if not self.transposed:
            for _, band in self._bands():  # G += band^T band: the Fortran view of a C band is band^T
                G = syrk(1.0, _as(band, dtype).T, beta=1.0, c=G, trans=0, lower=1, overwrite_c=1)
        else:
            step = max(1, STREAM_BYTES // (self.itemsize * max(rows, 1)))
            for start in range(0, cols, step):  # G += X X^T for a band X of stored columns
                X = _as(self._columns(start, min(start + step, cols)), dtype)
                G = syrk(1.0, X.T, beta=1.0, c=G, trans=1, lower=1, overwrite_c=1)
        return torch.from_numpy(G.T)  # row-major view of the same memory: no copy


class TensorMatrix(BandedMatrix):
    """An in-memory CPU tensor behind :class:`BandedMatrix`'s products (no float64 copy of it, SciPy's BLAS)."""

    def __init__(self, tensor: torch.Tensor, transposed: bool = False) -> None:
        super().__init__(tuple(tensor.shape), tensor.dtype, transposed)
        self.tensor = tensor.contiguous()

    @property
    def T(self) -> "TensorMatrix":
        return TensorMatrix(self.tensor, not self.transposed)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]

    def _columns(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[:, start:stop].contiguous()


class StoredMatrix(BandedMatrix):
    """A 2-D tensor in a safetensors file, never loaded whole: a view of the stored matrix (or, after ``.T``, of its
    transpose) whose products read bands of rows into fresh aligned tensors of the stored dtype. This is what
    lets the exact subspace of a weight run in memory proportional to its Gram matrix rather than to the weight."""

    def __init__(
        self, path: Path, offset: int, stored: tuple[int, int], dtype: torch.dtype, transposed: bool = False
    ) -> None:
        super().__init__(stored, dtype, transposed)
        self.path, self.offset = path, offset

    @property
    def T(self) -> "StoredMatrix":
        return StoredMatrix(self.path, self.offset, self.stored, self.dtype, not self.transposed)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        """Stored rows ``start:stop``: one read straight into a fresh (aligned) tensor."""
        cols = self.stored[1]
        out = torch.empty(stop - start, cols, dtype=self.dtype)
        if not read_into(self.path, self.offset + start * cols * self.itemsize, out):
            raise UserInputError(f"{self.path} is truncated: re-download or re-save the model")
        return out

    def _columns(self, start: int, stop: int) -> torch.Tensor:
        """Stored columns ``start:stop`` as a C-contiguous ``(rows, stop - start)`` band: one short read per row."""
        rows, cols = self.stored
        band = torch.empty(rows, stop - start, dtype=self.dtype)
        raw = band.view(_RAW[self.itemsize][1]).numpy()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i in range(rows):
                os.preadv(fd, [memoryview(raw[i]).cast("B")], self.offset + (i * cols + start) * self.itemsize)
        finally:
            os.close(fd)
        return band

    def stats(self) -> tuple[str, bool, float]:
        """One pass over the stored rows: ``(sha256 as sha256_of gives it, all finite, squared Frobenius norm)``."""
        rows, cols = self.stored
        h = hashlib.sha256(f"{self.dtype}|{tuple(self.stored)}|".encode())
        frob2, finite = 0.0, True
        step = max(1, STREAM_BYTES // max(1, cols * self.itemsize))
        for start in range(0, rows, step):
            slab = self._read(start, min(start + step, rows))
            h.update(slab.reshape(-1).view(torch.uint8).numpy())
            # A band at a time: on a whole 16 MiB slab, .double().square() held 64 MiB of temporaries (measured: the
            # peak of the exact decompose; docs/benchmarks.md, issue 11).
            flat = slab.reshape(-1)
            for i in range(0, flat.numel(), BAND_BYTES // 8):
                band = flat[i : i + BAND_BYTES // 8].double()
                if self.itemsize == 8:  # float64 values can square past float64's range: check them directly
                    finite = finite and bool(torch.isfinite(band).all())
                frob2 += float(torch.dot(band, band))
        # Narrower types: all finite exactly when the float64 sum of squares is. A float16/bfloat16/float32 value
        # squares to at most 1.2e77, so finite values cannot overflow it, while a NaN or an infinity makes it NaN or
        # infinite. (The separate isfinite pass was 8% of the exact decompose in a profile of the 1B shape.)
        return h.hexdigest(), finite and (self.itemsize == 8 or math.isfinite(frob2)), frob2
