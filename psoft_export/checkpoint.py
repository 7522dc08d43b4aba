"""Reading a Hugging Face model directory without building the model: its config, a weightless skeleton
(meta device) for module names and types, and its safetensors weights one tensor at a time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from psoft_export.errors import UserInputError
from psoft_export.stored import StoredMatrix, read_into, unmap_freed_tensors  # noqa: F401  (unmap: re-exported)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


def st_dtype(name: str) -> torch.dtype | None:
    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
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
                "convert them to safetensors first (train, merge and verify accept --allow-pickle, loading with "
                "weights_only=True)"
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

    def matrix(self, key: str) -> StoredMatrix:
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
        if not read_into(self.dir / file, offset, out):
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


def prefix_variants(name: str, base_prefix: str) -> list[str]:
    """``name`` as a base model and a task model may spell it: as given, then without or with the task model's
    ``base_model_prefix`` (``bert.``, ``transformer.``, ``model.``)."""
    if not base_prefix:
        return [name]
    if name.startswith(base_prefix + "."):
        return [name, name[len(base_prefix) + 1 :]]
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
        raise UserInputError(
            f"cannot load the tokenizer of {model_dir} ({reason[:200]}): restore its tokenizer "
            "files (tokenizer.json, tokenizer_config.json) from the original model"
        ) from None


def check_config_sizes(model_dir: str | Path, source: "ModelSource") -> None:
    """Refuse a config.json whose sizes the weights cannot have (``hidden_size: 1e9``, ``num_hidden_layers: 1e7``)
    before transformers allocates or builds anything from it (an allocation error or a hang)."""
    config = load_config(model_dir)
    dims = {d for key in source.keys() for d in source.shape(key)}
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(source.keys()):
        raise UserInputError(
            f"{Path(model_dir) / 'config.json'} says num_hidden_layers={layers} but the checkpoint "
            f"holds only {len(source.keys())} tensors: the config does not match the weights"
        )
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int) and dims and hidden not in dims:
        raise UserInputError(
            f"{Path(model_dir) / 'config.json'} says hidden_size={hidden} but no tensor of the "
            "checkpoint has that dimension: the config does not match the weights"
        )


def loading_kwargs(model_dir: str | Path, allow_pickle: bool = False) -> dict:
    """Validate ``model_dir``'s weights before transformers reads them and return ``from_pretrained`` options.

    Only safetensors are read unless ``allow_pickle`` (then ``.bin`` files load with ``weights_only=True``,
    transformers' default); remote code is never trusted.
    """
    model_dir = Path(model_dir)
    if allow_pickle and not any((model_dir / f).is_file() for f in (SINGLE, INDEX)):
        load_config(model_dir)
        if not any((model_dir / f).is_file() for f in PICKLED[:2]):  # what transformers' loader looks for
            found = (
                ", ".join(p.name for p in sorted(model_dir.glob("*.pt")) + sorted(model_dir.glob("*.bin"))) or "none"
            )
            raise UserInputError(
                f"{model_dir} has no pytorch_model.bin (or its index) for transformers to load "
                f"(found: {found}): save the weights as model.safetensors or pytorch_model.bin"
            )
        return {"use_safetensors": False, "trust_remote_code": False}
    check_config_sizes(model_dir, ModelSource(model_dir))
    return {"use_safetensors": True, "trust_remote_code": False}
