"""Reading a Hugging Face model directory without building the model: its config, a weightless skeleton
(meta device) for module names and types, and its safetensors weights one tensor at a time."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from psoft_export.errors import UserInputError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


def st_dtype(name: str) -> torch.dtype | None:
    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }.get(name)


class ModelSource:
    """The weights of ``model_dir``: key -> file, shape and dtype from the headers, tensors loaded on demand."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise UserInputError(f"model directory {self.dir} does not exist: pass a Hugging Face model directory")
        if not (self.dir / "config.json").is_file():
            raise UserInputError(f"{self.dir} has no config.json: pass a Hugging Face model directory")
        self.files = self._weight_files()
        self._meta: dict[str, tuple[str, tuple[int, ...], str, int, int]] = {}
        for file in self.files:
            try:
                with safe_open(self.dir / file, framework="pt"):  # the library validates the file
                    pass
                header_len, header = read_header(self.dir / file)
            except (SafetensorError, OSError, ValueError) as exc:
                raise UserInputError(
                    f"cannot read {self.dir / file}: {str(exc).splitlines()[0]} (re-download or re-save the model)"
                ) from None
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self._meta[key] = (file, tuple(info["shape"]), info["dtype"], 8 + header_len + start, end - start)

    def _weight_files(self) -> list[str]:
        if (self.dir / INDEX).is_file():
            try:
                weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise UserInputError(f"{self.dir / INDEX} is not a valid safetensors index: {exc}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise UserInputError(f"{self.dir} is missing shard {missing[0]} named in {INDEX}")
            return files
        if (self.dir / SINGLE).is_file():
            return [SINGLE]
        if any((self.dir / p).exists() for p in PICKLED):
            raise UserInputError(
                f"{self.dir} holds only pickled weights (.bin/.pt), which can run code when loaded: "
                "convert them to safetensors first (train, merge and verify accept --allow-pickle, loading with weights_only=True)"
            )
        raise UserInputError(f"no safetensors weights in {self.dir} (expected {SINGLE} or {INDEX})")

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def dtype(self, key: str) -> str:
        """The safetensors dtype name, e.g. ``F32``, ``BF16``."""
        return self._meta[key][2]

    def file(self, key: str) -> str:
        return self._meta[key][0]

    def span(self, key: str) -> tuple[Path, int, int]:
        """``(path, offset, nbytes)`` of the tensor's raw little-endian bytes in its file."""
        file, _, _, offset, nbytes = self._meta[key]
        return self.dir / file, offset, nbytes

    def matrix(self, key: str) -> "StoredMatrix":
        """The 2-D tensor ``key`` left in its file, read a slab of rows (or columns) at a time."""
        file, shape, dtype_name, offset, nbytes = self._meta[key]
        dtype = st_dtype(dtype_name)
        if dtype is None or len(shape) != 2:
            raise UserInputError(f"{key} ({dtype_name}, shape {shape}) is not a 2-D float weight")
        if shape[0] * shape[1] * torch.empty(0, dtype=dtype).element_size() != nbytes:
            raise UserInputError(f"{self.dir / file}: {key} claims {nbytes} bytes for shape {shape} {dtype_name}")
        if (self.dir / file).stat().st_size < offset + nbytes:
            raise UserInputError(f"{self.dir / file} is truncated at {key}: re-download or re-save the model")
        return StoredMatrix(self.dir / file, offset, shape, dtype)

    def tensor(self, key: str, device: str = "cpu") -> torch.Tensor:
        """Load one tensor (and nothing else), read straight from the file into a fresh buffer.

        Not ``safe_open().get_tensor``: that returns memory at an arbitrary offset (seen: 40 mod 64), and BLAS
        rounds differently on misaligned input, which is enough to change a randomized SVD's result. A fresh
        torch allocation is aligned like any model parameter, and reading into it costs no second copy.
        """
        file, shape, dtype_name, offset, nbytes = self._meta[key]
        dtype = st_dtype(dtype_name)
        if dtype is None:
            raise UserInputError(f"{key} has dtype {dtype_name}, which psoft-export cannot load")
        out = torch.empty(shape, dtype=dtype)
        if out.numel() * out.element_size() != nbytes:
            raise UserInputError(f"{self.dir / file}: {key} claims {nbytes} bytes for shape {shape} {dtype_name}")
        if nbytes:
            with open(self.dir / file, "rb") as f:
                f.seek(offset)
                if f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != nbytes:
                    raise UserInputError(f"{self.dir / file} is truncated at {key}: re-download or re-save the model")
        return out if device == "cpu" else out.to(device)

    def resolve(self, module_name: str, base_prefix: str = "") -> str:
        """The checkpoint key of ``<module_name>.weight``, tolerating a saved base model with or without the
        task model's ``base_model_prefix`` (``bert.``, ``transformer.``, ``model.``)."""
        candidates = [f"{name}.weight" for name in prefix_variants(module_name, base_prefix)]
        for key in candidates:
            if key in self._meta:
                return key
        raise UserInputError(f"{self.dir} has no tensor {candidates[0]}: the checkpoint does not match its config")


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

    def __init__(self, path: Path, offset: int, stored: tuple[int, int], dtype: torch.dtype,
                 transposed: bool = False) -> None:
        self.path, self.offset, self.stored, self.dtype, self.transposed = path, offset, tuple(stored), dtype, transposed
        self.shape = torch.Size(self.stored[::-1] if transposed else self.stored)

    @property
    def T(self) -> "StoredMatrix":
        return StoredMatrix(self.path, self.offset, self.stored, self.dtype, not self.transposed)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def _read(self, start: int, stop: int) -> torch.Tensor:
        """Stored rows ``start:stop``: one read straight into a fresh (aligned) tensor."""
        cols = self.stored[1]
        out = torch.empty(stop - start, cols, dtype=self.dtype)
        size = out.element_size()
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * cols * size)
            f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
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
        # bands of about STREAM_BYTES: this pass runs before the eigendecomposition, whose 4 n^2 is the peak.
        np_raw, torch_raw = _RAW[torch.empty(0, dtype=self.dtype).element_size()]
        size = torch.empty(0, dtype=self.dtype).element_size()
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
        finite, frob2 = True, 0.0
        step = max(1, STREAM_BYTES // max(1, cols * torch.empty(0, dtype=self.dtype).element_size()))
        for start in range(0, rows, step):
            slab = self._read(start, min(start + step, rows))
            h.update(slab.reshape(-1).view(torch.uint8).numpy())
            finite = finite and bool(torch.isfinite(slab).all())
            frob2 += float(slab.double().square().sum())
        return h.hexdigest(), finite, frob2


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


def prefix_variants(name: str, base_prefix: str) -> list[str]:
    """``name`` as a base model and a task model may spell it: as given, then without or with the task model's
    ``base_model_prefix`` (``bert.``, ``transformer.``, ``model.``)."""
    if not base_prefix:
        return [name]
    if name.startswith(base_prefix + "."):
        return [name, name[len(base_prefix) + 1:]]
    return [name, f"{base_prefix}.{name}"]


def read_header(path: Path) -> tuple[int, dict]:
    """The safetensors header: its byte length and the parsed JSON (``{key: {dtype, shape, data_offsets}}``)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file too short for a safetensors header")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"header length {n} exceeds the file")
        return n, json.loads(f.read(n))


def sha256_of(tensor: torch.Tensor) -> str:
    """Content hash of a tensor's stored bytes (dtype and shape included, so a cast or reshape changes it)."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


def weights_identity(model_dir: str | Path, names: list[str], base_prefix: str = "") -> dict[str, dict]:
    """``{module: {key, sha256}}`` of the source tensors behind ``names`` (``<module>.weight``), read one at a
    time: what ties an adapter to the exact base weights it was trained on."""
    source = ModelSource(model_dir)
    out = {}
    for name in names:
        key = source.resolve(name, base_prefix)
        out[name] = {"key": key, "sha256": sha256_of(source.tensor(key))}
    return out


def check_weights(model_dir: str | Path, records: dict[str, dict], what: str, remedy: str) -> None:
    """Refuse ``model_dir`` when a recorded ``{key, sha256}`` is missing or differs (see :func:`weights_identity`)."""
    source = ModelSource(model_dir)
    for info in records.values():
        key = info["key"]
        if key not in source.keys() or sha256_of(source.tensor(key)) != info["sha256"]:
            raise UserInputError(f"{what} was computed from other weights than {model_dir} ({key} differs): {remedy}")


def file_sha256(path: Path) -> str:
    """Content hash of a whole file, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)  # never trust_remote_code
    except (ValueError, KeyError, OSError) as exc:
        raise UserInputError(f"cannot read {Path(model_dir) / 'config.json'}: {str(exc).splitlines()[0]}") from None


def skeleton(model_dir: Path) -> nn.Module:
    """The model's modules on the meta device: names and types, no weights allocated."""
    import transformers

    config = load_config(model_dir)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        try:
            if cls is not None:
                return cls._from_config(config)
            return transformers.AutoModel.from_config(config)
        except (ValueError, KeyError) as exc:
            raise UserInputError(f"transformers cannot build {arch or config.model_type}: {exc}") from None


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer; a damaged or missing one is one line, not a traceback from the tokenizers library."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)  # never trust_remote_code
    except Exception as exc:  # tokenizers/transformers raise many types for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"cannot load the tokenizer of {model_dir} ({reason[:200]}): restore its tokenizer "
                             "files (tokenizer.json, tokenizer_config.json) from the original model") from None


def check_config_sizes(model_dir: str | Path, source: "ModelSource") -> None:
    """Refuse a config.json whose sizes the weights cannot have (``hidden_size: 1e9``, ``num_hidden_layers: 1e7``)
    before transformers allocates or builds anything from it (an allocation error or a hang)."""
    config = load_config(model_dir)
    dims = {d for key in source.keys() for d in source.shape(key)}
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(source.keys()):
        raise UserInputError(f"{Path(model_dir) / 'config.json'} says num_hidden_layers={layers} but the checkpoint "
                             f"holds only {len(source.keys())} tensors: the config does not match the weights")
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int) and dims and hidden not in dims:
        raise UserInputError(f"{Path(model_dir) / 'config.json'} says hidden_size={hidden} but no tensor of the "
                             "checkpoint has that dimension: the config does not match the weights")


def loading_kwargs(model_dir: str | Path, allow_pickle: bool = False) -> dict:
    """Validate ``model_dir``'s weights before transformers reads them and return ``from_pretrained`` options.

    Only safetensors are read unless ``allow_pickle`` (then ``.bin`` files load with ``weights_only=True``,
    transformers' default); remote code is never trusted.
    """
    model_dir = Path(model_dir)
    if allow_pickle and not any((model_dir / f).is_file() for f in (SINGLE, INDEX)):
        load_config(model_dir)
        if not any((model_dir / f).is_file() for f in PICKLED[:2]):  # what transformers' loader looks for
            found = ", ".join(p.name for p in sorted(model_dir.glob("*.pt")) + sorted(model_dir.glob("*.bin"))) or "none"
            raise UserInputError(f"{model_dir} has no pytorch_model.bin (or its index) for transformers to load "
                                 f"(found: {found}): save the weights as model.safetensors or pytorch_model.bin")
        return {"use_safetensors": False, "trust_remote_code": False}
    check_config_sizes(model_dir, ModelSource(model_dir))
    return {"use_safetensors": True, "trust_remote_code": False}
