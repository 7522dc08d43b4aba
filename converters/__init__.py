"""Export formats: the one table that ``merge``, ``verify`` and the goldens read, and one module per format.

:data:`FORMATS` says what each format accepts (dtypes, quantizations, model types, which routes a quantized base or a
classification head may take) and how closely its runtime must agree with PyTorch. Each format's module
(``converters/<name>.py``) does the layout work (transposes, quantization, graph surgery; never adapter math) and
ends with the same three functions, which ``merge`` and ``verification`` call through :func:`module`:

- ``write_merged(job, out) -> files``: the merged export of ``job.model`` into the directory ``out``;
- ``write_split(job, out) -> (files, lora_errors)``: the base plus a separate adapter;
- ``run(export_dir, info, inputs, kind, model_dir) -> {label: outputs}``: the export in its own runtime.

A new format is a new module with those functions and a row in :data:`FORMATS`; nothing else branches on formats
(``merge``'s streamed routes read :attr:`Format.streamed`, the rounded reference ``psoft_export/rounded.py``).
Modules are imported on first use: ONNX pulls in optimum and ONNX Runtime, GGUF gguf-py and llama.cpp.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Optional


@dataclass(frozen=True)
class Format:
    name: str
    what: str  # the merged export in a few words, for --help and errors
    dtypes: tuple[str, ...]  # --dtype values the format writes
    dtype_hint: str  # why other dtypes are refused, and what to use
    quants: tuple[str, ...] = ()  # --quant values
    model_types: Optional[tuple[str, ...]] = None  # config.model_type values it can write (None: any)
    streamed: bool = False  # merged exports written tensor by tensor from the source files
    hf_scratch: bool = False  # merged exports start from a merged float32 HF directory (written streamed if it can)
    split_heads: bool = False  # a split export can carry a classification adapter's new head
    quantized_base: tuple[str, ...] = ()  # routes ("merged", "split") that reproduce a quantized (QOFT) base
    # Relative error bars per written type (dtype or quant): against the float32 PyTorch model with the adapter
    # (split exports, ONNX); merged exports against the rounded reference; and the loose precision bound of a merged
    # export against the float32 model (see psoft_export/verification.py).
    tolerances: dict[str, float] = field(default_factory=dict)
    rounded_tolerances: dict[str, float] = field(default_factory=dict)
    precision_bounds: dict[str, float] = field(default_factory=dict)


# llama.cpp rounds the activations to BF16 before BF16 products. Measured on the fixtures (llama PSOFT / qwen2 PSOFT /
# llama OFT): merged against the rounded reference 2.1e-3 / 2.9e-3 / 5.0e-3, split against the float32 model 3.8e-3 /
# 4.7e-3 / 5.1e-3 (OFT with --lora-rank 16), precision of the merged export 4.2e-3 / 5.5e-3 / 6.6e-3.
BF16_GGUF = 2e-2

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "safetensors",
            "a complete Hugging Face model directory",
            dtypes=("float32", "float16", "bfloat16"),
            dtype_hint="",
            streamed=True,
            split_heads=True,
            quantized_base=("merged",),
            tolerances={"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2},
            # transformers runs the export's own (widened) weights through the reference's float32 code: measured 0
            rounded_tolerances={"float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5},
            precision_bounds={"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1},
        ),
        Format(
            "onnx",
            "an optimum ONNX export (decoders with the KV cache)",
            dtypes=("float32",),
            dtype_hint="ONNX exports are float32 (ONNX Runtime's CPU provider refuses mixed half graphs): "
            "use --dtype float32",
            hf_scratch=True,
            tolerances={"float32": 1e-4},
        ),
        Format(
            "gguf",
            "a llama.cpp model file",
            dtypes=("float32", "float16", "bfloat16"),
            dtype_hint="GGUF exports are float32, float16, bfloat16 or --quant q8_0/q4_0",
            quants=("q8_0", "q4_0"),
            model_types=("llama", "mistral", "qwen2"),
            streamed=True,
            quantized_base=("merged", "split"),
            # llama.cpp rounds the activations to the weights' type before each product (F16, Q8_0), which no weight
            # rounding reproduces: its rounded-reference bars are those against the float32 model (measured against
            # the rounded reference on the Llama fixture: f32 3.7e-7, f16 2.4e-4).
            tolerances={
                "float32": 2e-3,
                "float16": 2e-3,
                "bfloat16": BF16_GGUF,
                "q8_0": 5e-2,  # measured 4e-7 / 7e-4 / 1.7e-2 (llama), 3.0e-2 (qwen2 PSOFT merged)
                "q4_0": 4e-1,  # split, measured 2.0e-1 (llama) / 2.5e-1 (qwen2) / 1.8e-1 (QOFT llama, rank-32 LoRA)
            },
            rounded_tolerances={
                "float32": 2e-3,
                "float16": 2e-3,
                "bfloat16": BF16_GGUF,
                "q8_0": 5e-2,  # measured 1.7e-2 (llama), 3.0e-2 (qwen2 PSOFT)
                "q4_0": 6e-2,  # measured 1.0e-2 (llama) / 2.7e-2 (qwen2) / 7.5e-3 (QOFT llama): Q8_0 activations
            },
            precision_bounds={
                "float32": 2e-3,
                "float16": 5e-2,
                "bfloat16": 5e-2,
                "q8_0": 2e-1,
                "q4_0": 8e-1,  # 4 bits on the tiny random fixtures: measured 1.5e-1 (llama) / 5.3e-1 (qwen2)
            },
        ),
    )
}


def module(name: str) -> ModuleType:
    """The converter module of format ``name`` (imported now, on first use)."""
    return importlib.import_module(f"converters.{FORMATS[name].name}")


def table(attribute: str) -> dict[tuple[str, str], float]:
    """One of the tolerance tables as ``{(format, written type): bar}``, the shape verification reads."""
    return {(f.name, t): bar for f in FORMATS.values() for t, bar in getattr(f, attribute).items()}


@dataclass
class Job:
    """What a format's ``write_merged``/``write_split`` is given: the model with the adapter (PyTorch, float32), where
    it came from, and the request."""

    model: Any
    model_dir: Path
    adapter_dir: Path
    dtype: str
    quant: Optional[str] = None
    lora_rank: Optional[int] = None
    kind: str = "causal"
    record: Optional[dict] = None  # the quantized base the adapter was trained over (QOFT), if any
    scratch: Any = None  # psoft_export.streamed.Stream writing the merged float32 HF directory (model then None)

    @property
    def written_as(self) -> str:
        return self.quant or self.dtype
