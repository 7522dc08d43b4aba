"""The models every command compares against: the base of an adapter, its kind, the reference with the adapter,
the fixed inputs and the outputs read from them. One loader for merge, verify and the converters' checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from psoft_export import adapter_io, quantized
from psoft_export.checkpoint import load_tokenizer, loading_kwargs

# Model types whose base is an encoder: trained as classifiers, verified on hidden states.
ENCODERS = ("bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta")
DEFAULT_TEXTS = [
    "The red fox lives in the north forest and eats berries.",
    "A small grey owl sleeps.",
    "Q: What is three plus seven? A: ten.",
]


def model_kind(model_dir: Path, adapter_dir: Path) -> tuple[str, Optional[list]]:
    """``causal``, ``classify`` or ``encoder`` and the class list, from the adapter and the model config."""
    from psoft_export.checkpoint import load_config

    meta = adapter_io.read_meta(adapter_dir)
    if meta is not None:
        return meta["task"] if meta["task"] != "completion" else "causal", meta.get("classes")
    peft = adapter_io.read_config(adapter_dir)
    if peft.get("task_type") == "SEQ_CLS":
        return "classify", None
    config = load_config(model_dir)
    return ("encoder" if config.model_type in ENCODERS else "causal"), None


def load_base(
    model_dir: Path, kind: str, classes: Optional[list], adapter_dir: Optional[Path] = None, allow_pickle: bool = False
) -> nn.Module:
    """The float32 base model of ``kind`` (a classifier sized by the adapter's classes or saved head)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" warning: the adapter supplies it
    safe = loading_kwargs(model_dir, allow_pickle)
    if kind == "classify":
        labels = len(classes) if classes else adapter_io.saved_labels(adapter_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=labels, dtype=torch.float32, **safe
        )
        _name_classes(model, classes)
    elif kind == "encoder":
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, **safe)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **safe)
    return model.eval()


def _name_classes(model: nn.Module, classes: Optional[list]) -> None:
    if classes:
        model.config.id2label = {i: str(c) for i, c in enumerate(classes)}
        model.config.label2id = {str(c): i for i, c in enumerate(classes)}


def base_skeleton(model_dir: Path, kind: str, classes: Optional[list], adapter_dir: Optional[Path] = None) -> nn.Module:
    """:func:`load_base`'s model on the meta device: the same class, config and generation config, no weights
    (module names, shapes and tied parameters for a streamed export)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        GenerationConfig,
    )

    from psoft_export.checkpoint import load_config

    load_config(model_dir)  # a damaged config.json is one line
    extra = (
        {"num_labels": len(classes) if classes else adapter_io.saved_labels(adapter_dir)} if kind == "classify" else {}
    )
    config = AutoConfig.from_pretrained(model_dir, **extra)
    auto = {"classify": AutoModelForSequenceClassification, "encoder": AutoModel}.get(kind, AutoModelForCausalLM)
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.float32)
    _name_classes(model, classes if kind == "classify" else None)
    if model.can_generate() and (Path(model_dir) / "generation_config.json").is_file():  # as from_pretrained does
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def reference_model(
    model_dir: Path, adapter_dir: Path, allow_pickle: bool = False
) -> tuple[nn.Module, str, Optional[list]]:
    """The base with the adapter (our loader), its kind and classes: what every export is compared with. An adapter
    trained over a quantized base gets that base's dequantized weights (``quantized.dequantize_base``)."""
    kind, classes = model_kind(model_dir, adapter_dir)
    model = load_base(model_dir, kind, classes, adapter_dir, allow_pickle)
    adapter_io.load_adapter(model, adapter_dir, model_dir)
    record = quantized.record_of(adapter_io.read_meta(adapter_dir))
    if record is not None:  # trained over a 4-bit base: that base, dequantized, in exact float32 arithmetic
        quantized.dequantize_base(model, record)
    return model.eval(), kind, classes


def fixed_inputs(model_dir: Path, texts: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return dict(tok(texts or DEFAULT_TEXTS, return_tensors="pt", padding=True))


@torch.no_grad()
def torch_outputs(model: nn.Module, inputs: dict[str, torch.Tensor], kind: str) -> np.ndarray:
    out = model(**inputs)
    return (out.last_hidden_state if kind == "encoder" else out.logits).float().numpy()


def masked(x: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    return x if kind == "classify" else x[mask.astype(bool)]
