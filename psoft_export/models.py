"""The one model loader: an adapter's kind, its base (float32, or 4-bit as trained), the base ``train`` adapts, the
model optimum exports for a task, the reference with the adapter, the fixed inputs and the outputs read from them.
Train, merge, verify and the converters load models here (tests/test_architecture.py: no other module calls a model
class's ``from_pretrained``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from psoft_export import adapter_io, quantized
from psoft_export.checkpoint import load_config, load_tokenizer, loading_kwargs
from psoft_export.errors import UserInputError

# Model types whose base is an encoder: trained as classifiers, verified on hidden states.
ENCODERS = ("bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta")
DEFAULT_TEXTS = [
    "The red fox lives in the north forest and eats berries.",
    "A small grey owl sleeps.",
    "Q: What is three plus seven? A: ten.",
]


def model_kind(model_dir: Path, adapter_dir: Path) -> tuple[str, Optional[list]]:
    """``causal``, ``classify`` or ``encoder`` and the class list, from the adapter and the model config."""
    meta = adapter_io.read_meta(adapter_dir)
    if meta is not None:
        return meta["task"] if meta["task"] != "completion" else "causal", meta.get("classes")
    peft = adapter_io.read_config(adapter_dir)
    if peft.get("task_type") == "SEQ_CLS":
        return "classify", None
    config = load_config(model_dir)
    return ("encoder" if config.model_type in ENCODERS else "causal"), None


def _auto_class(kind: str):
    """The transformers auto class of ``kind``: a sequence classifier, a bare encoder, else a causal LM."""
    import transformers

    name = {"classify": "AutoModelForSequenceClassification", "encoder": "AutoModel"}.get(kind, "AutoModelForCausalLM")
    return getattr(transformers, name)


def load_base(
    model_dir: Path,
    kind: str,
    classes: Optional[list],
    adapter_dir: Optional[Path] = None,
    allow_pickle: bool = False,
    quantize: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The float32 base model of ``kind`` (a classifier sized by the adapter's classes or saved head). With
    ``quantize`` (an adapter's recorded scheme): the base loaded 4-bit on the CPU as ``train --quantize`` loads it,
    computing in ``dtype``, bitsandbytes' lossy CPU repack off (``quantized.prepare_model``)."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" warning: the adapter supplies it
    kwargs = {**loading_kwargs(model_dir, allow_pickle), **quantized.load_kwargs(quantize, dtype, "cpu")}
    extra = (
        {"num_labels": len(classes) if classes else adapter_io.saved_labels(adapter_dir)} if kind == "classify" else {}
    )
    model = _auto_class(kind).from_pretrained(model_dir, dtype=dtype, **extra, **kwargs)
    _name_classes(model, classes if kind == "classify" else None)
    if quantize:
        quantized.prepare_model(model)
    return model.eval()


def load_trainable(
    model_dir: Path,
    kind: str,
    classes: Optional[list],
    dtype: Optional[torch.dtype],
    device: str,
    safe: dict,
    quantize: Optional[str] = None,
    pad_token_id: Optional[int] = None,
) -> tuple[nn.Module, list[str]]:
    """The base ``train`` adapts, on ``device`` in ``dtype`` (None: float32), 4-bit with ``quantize``; ``kind``
    ``classify`` (a classifier of ``len(classes)`` labels, ``pad_token_id`` set where the config has none) or
    language-modelling data (a causal LM). ``safe``: ``checkpoint.loading_kwargs``. Also the modules the checkpoint
    lacked, in float32: a classifier's new head and, from a base-model checkpoint (``BertModel``), the pooler; they
    are trained and saved with the adapter. Refuses an encoder on language-modelling data and a causal checkpoint
    without its LM head."""
    from transformers.utils import logging

    config = load_config(model_dir)
    base_dtype = dtype if dtype is not None else torch.float32
    kwargs = {**safe, **quantized.load_kwargs(quantize, base_dtype, device, kind)}  # QOFT: a 4-bit base
    if kind != "classify" and config.model_type in ENCODERS:
        raise UserInputError(
            f'{model_dir} is an encoder ({config.model_type}): train it on {{"text", "label"}} data '
            "(sequence classification), not language-modelling text"
        )
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized ...": judged below, with a message that says what to do
    try:
        extra = {"num_labels": len(classes)} if kind == "classify" else {}
        model, info = _auto_class("classify" if kind == "classify" else "causal").from_pretrained(
            model_dir, dtype=base_dtype, output_loading_info=True, **extra, **kwargs
        )
    finally:
        logging.set_verbosity(verbosity)
    if kind == "classify":
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        heads = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
        heads = [h for h in heads if not any(h.startswith(o + ".") for o in heads)]
    else:
        if info["missing_keys"]:  # e.g. a LlamaModel checkpoint with untied embeddings: no LM head to adapt
            arch = (getattr(config, "architectures", None) or [config.model_type])[0]
            raise UserInputError(
                f"{model_dir} ({arch}) has no {info['missing_keys'][0]}: language-model training would start from a "
                "random output layer; use the checkpoint with its LM head (...ForCausalLM), or train a classifier "
                'on {"text", "label"} data'
            )
        heads = []
    for head in heads:
        model.get_submodule(head).float()
    if quantize:  # placed by device_map already (bitsandbytes models refuse .to)
        quantized.prepare_model(model)
        return model, heads
    return model.to(device), heads


def load_for_task(model_dir: Path, task: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model optimum exports for ``task`` (its ``TasksManager`` class for the task), in ``dtype``, eval."""
    from optimum.exporters.tasks import TasksManager

    cls = TasksManager.get_model_class_for_task(task, framework="pt", library="transformers")
    return cls.from_pretrained(model_dir, dtype=dtype).eval()


def _name_classes(model: nn.Module, classes: Optional[list]) -> None:
    if classes:
        model.config.id2label = {i: str(c) for i, c in enumerate(classes)}
        model.config.label2id = {str(c): i for i, c in enumerate(classes)}


def base_skeleton(
    model_dir: Path, kind: str, classes: Optional[list], adapter_dir: Optional[Path] = None, meta: bool = True
) -> nn.Module:
    """:func:`load_base`'s model on the meta device: the same class, config and generation config, no weights
    (module names, shapes and tied parameters for a streamed export). ``meta=False``: built under the caller's
    device context instead (``streamed_run`` keeps buffers real)."""
    from transformers import AutoConfig, GenerationConfig

    load_config(model_dir)  # a damaged config.json is one line
    extra = (
        {"num_labels": len(classes) if classes else adapter_io.saved_labels(adapter_dir)} if kind == "classify" else {}
    )
    config = AutoConfig.from_pretrained(model_dir, **extra)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = _auto_class(kind).from_config(config, dtype=torch.float32)
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
