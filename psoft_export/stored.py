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


class StoredMatrix:
    """A 2-D tensor in a safetensors file, never loaded whole: a view of the stored matrix (or, after ``.T``, of its
    transpose) whose products read bands of rows into fresh aligned tensors of the stored dtype. This is what
    lets the exact subspace of a weight run in memory proportional to its Gram matrix rather than to the weight
    (:func:`psoft_export.subspace.gram_subspace` takes it wherever it takes a tensor: it calls :meth:`gram`,
    :meth:`apply` and :meth:`apply_t`, each one pass over the file)."""

    ndim = 2
    device = torch.device("cpu")

    def __init__(
        self, path: Path, offset: int, stored: tuple[int, int], dtype: torch.dtype, transposed: bool = False
    ) -> None:
        self.path, self.offset, self.stored, self.dtype, self.transposed = (
            path,
            offset,
            tuple(stored),
            dtype,
            transposed,
        )
        self.shape = torch.Size(self.stored[::-1] if transposed else self.stored)
        self.itemsize = torch.empty(0, dtype=dtype).element_size()

    @property
    def T(self) -> "StoredMatrix":
        return StoredMatrix(self.path, self.offset, self.stored, self.dtype, not self.transposed)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def _read(self, start: int, stop: int) -> torch.Tensor:
        """Stored rows ``start:stop``: one read straight into a fresh (aligned) tensor."""
        cols = self.stored[1]
        out = torch.empty(stop - start, cols, dtype=self.dtype)
        if not read_into(self.path, self.offset + start * cols * self.itemsize, out):
            raise UserInputError(f"{self.path} is truncated: re-download or re-save the model")
        return out

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

    # The products the exact subspace needs (:func:`psoft_export.subspace.gram_subspace`), in float64, each a pass
    # over contiguous bands of stored rows; only the Gram matrix of a transposed view reads columns.
    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """``self @ X`` in float64."""
        if not self.transposed:
            return torch.cat([band.double() @ X for _, band in self._bands()])
        out = torch.zeros(self.shape[0], X.shape[1], dtype=torch.float64)
        for sl, band in self._bands():
            out.addmm_(band.double().T, X[sl])
        return out

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
        parts, out = [], torch.zeros(self.shape[1], X.shape[1], dtype=torch.float64)
        for _, band in self._bands():
            band = band.double()
            parts.append(band @ X)
            out.addmm_(band.T, parts[-1])
        return torch.cat(parts), out

    def gram(self, dtype: torch.dtype) -> torch.Tensor:
        """``self^T self`` in ``dtype``, accumulated band by band (each band upcast on its own)."""
        rows, cols = self.stored
        if not self.transposed:
            G = torch.zeros(cols, cols, dtype=dtype)
            for _, band in self._bands():
                X = band.to(dtype)
                G.addmm_(X.T, X)
            return G
        # self^T self = S S^T: bands of stored columns, one short read per stored row (os.preadv into the band),
        # bands of about STREAM_BYTES: this pass runs before the eigendecomposition, whose 3 n^2 is the peak.
        np_raw, torch_raw = _RAW[self.itemsize]
        size = self.itemsize
        G = torch.zeros(rows, rows, dtype=dtype)
        step = max(1, STREAM_BYTES // (size * max(rows, 1)))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start in range(0, cols, step):
                stop = min(start + step, cols)
                band = torch.empty(rows, stop - start, dtype=self.dtype)
                raw = band.view(torch_raw).numpy()
                for i in range(rows):
                    os.preadv(fd, [memoryview(raw[i]).cast("B")], self.offset + (i * cols + start) * size)
                X = band.to(dtype)
                G.addmm_(X, X.T)
        finally:
            os.close(fd)
        return G

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
