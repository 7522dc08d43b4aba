"""QOFT: OFT or PSOFT over a base quantized with bitsandbytes (NF4), and what merging such an adapter has to reproduce.

Training loads the base with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``: every linear
layer but the output head becomes a ``Linear4bit`` holding packed 4-bit codes and one absmax per 64 weights. OFT's
rotation is applied to the *input* of that layer (``OftLinear.forward``); PSOFT's low-rank update is added beside
its output (``PsoftLinear.forward``). The frozen base stays quantized and no dequantized weight is ever formed.

The function that was trained is ``x R`` through ``dequant(quant(W))`` (OFT), or ``dequant(quant(W)) + s B (R - I) A``
with ``A``, ``B`` from the original float weights (PSOFT: the run's decomposition, stored with the adapter;
:func:`psoft_factors_from`). Quantization is deterministic, so the merge does not need the 4-bit model: it quantizes
each float32 source weight exactly as transformers did at load time and dequantizes it again (:func:`round_trip`, bit
for bit the model's own ``dequantize_4bit``), then folds the adapter into that. Layers that were quantized but not
adapted are round-tripped too (they were part of the trained function).

bitsandbytes' CPU forward repacks a 4-bit weight on its first no-grad eval call into an AVX512-BF16 layout whose
absmax is rounded to bfloat16 (measured: 0.4% relative output change per layer), and that repacked kernel has no
backward. :func:`prepare_model` switches the repack off so training, eval and the merge all run the same function
(measured: the layer output then equals ``x @ dequant(W).T`` to the bit).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

from psoft_export.adapters.bnb import BNB_CLASSES, dequantized_weight, is_quantized  # noqa: F401  (re-exported)
from psoft_export.errors import UserInputError
from psoft_export.train_config import QUANTIZE_CHOICES

BLOCKSIZE = 64  # transformers' BitsAndBytesConfig default (bnb_4bit_blocksize is not exposed)
REQUIREMENT = "bitsandbytes==0.50.2"


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or a one-line error saying how to install it."""
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a broken install raising at import
        raise UserInputError(
            f"--quantize needs bitsandbytes ({type(exc).__name__}: {str(exc)[:80]}): "
            f"pip install '{REQUIREMENT}' (the quant extra)"
        ) from None
    return bitsandbytes


def check_choice(quantize: Optional[str]) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise UserInputError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")


def quantized_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_quantized(module)]


# ------------------------------------------------------------------------------------------ loading


def load_kwargs(quantize: Optional[str], compute_dtype: torch.dtype, device: str, kind: str = "causal") -> dict:
    """The ``from_pretrained`` keyword arguments that load the base quantized (``{}`` when ``quantize`` is None)."""
    if quantize is None:
        return {}
    check_choice(quantize)
    if kind == "classify":  # transformers 4.57 fails to initialize a new head in a 4-bit model (AttributeError)
        raise UserInputError(
            f"--quantize {quantize} trains on language-modelling data only: a classifier's new head "
            "cannot be initialized in a 4-bit model; train the classifier without --quantize"
        )
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return {"quantization_config": config, "device_map": {"": device}}


def prepare_model(model: nn.Module) -> list[str]:
    """Switch off bitsandbytes' lossy CPU repack on every 4-bit layer (see the module docstring) and return the
    quantized module names; refuses a model in which nothing was quantized."""
    names = quantized_modules(model)
    if not names:
        raise UserInputError("--quantize: bitsandbytes quantized no layer of this model: train without --quantize")
    for name in names:
        module = model.get_submodule(name)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.bnb_cpu_repack = module.support_avx512bf16_for_cpu  # what bitsandbytes chose, for reports
            module.support_avx512bf16_for_cpu = False
    return names


def adapter_record(model: nn.Module, quantize: Optional[str], decomposition: object = None) -> dict:
    """What the adapter's ``psoft_export.json`` records about a quantized base (``{}`` without one): the scheme,
    enough to reproduce it bit for bit, the modules it covered and, for PSOFT, where its factors came from
    (:func:`psoft_factors_from`; ``decomposition``: the run's, read from the float source)."""
    if quantize is None:
        return {}
    from transformers.pytorch_utils import Conv1D

    from psoft_export.adapters import adapter_layers

    adapted = adapter_layers(model)
    found = quantized_modules(model)
    names = [n.removesuffix(".base_layer") for n in found]
    transposed = [
        n.removesuffix(".base_layer")
        for n in found  # GPT-2's Conv1D: quantized as W, stored as W^T
        if issubclass(getattr(model.get_submodule(n), "source_cls", nn.Linear), Conv1D)
    ]
    layer = next(iter(adapted.values())).base_layer if adapted else None
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    bnb = require_bitsandbytes()
    return {
        "quantized_base": {
            "library": "bitsandbytes",
            "version": bnb.__version__,
            "quant_type": quantize,
            "blocksize": int(getattr(state, "blocksize", BLOCKSIZE)),
            "double_quant": False,
            "quantized_from": str(getattr(state, "dtype", torch.float32)).removeprefix("torch."),
            "compute_dtype": str(getattr(layer, "compute_dtype", torch.float32)).removeprefix("torch."),
            "modules": names,
            "fan_in_fan_out": transposed,
            **psoft_factors_from(adapted, decomposition),
        }
    }


def psoft_factors_from(layers: Mapping[str, nn.Module], decomposition: object = None) -> dict:
    """``{"psoft_factors_from": ...}`` for PSOFT layers over a quantized base (``{}`` for OFT): ``original`` when
    ``A``, ``B`` came from the run's decomposition of the float source weights (what ``train`` does: the update is
    then float PSOFT's own, and the trained function is ``dequant(quant(W)) + s B (R - I) A`` with the float ``W``'s
    subspace), ``dequantized`` when each layer computed them from its 4-bit weight (no factors given), ``given``
    for factors handed in from elsewhere. The merge
    folds the stored ``A``, ``B`` either way, so it reproduces whichever was trained."""
    from psoft_export.adapters import PsoftLinear

    sources = {layer.factors_from for layer in layers.values() if isinstance(layer, PsoftLinear)}
    if not sources:
        return {}
    names = {"given": "original" if decomposition is not None else "given", "dequantized": "dequantized"}
    return {"psoft_factors_from": "+".join(sorted(names[s] for s in sources))}


def base_nbytes(model: nn.Module) -> int:
    """Bytes of the frozen base as it sits in memory (parameters and buffers that do not train)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t.requires_grad:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    for name in quantized_modules(model):  # absmax and code book live on the quant state, not as buffers
        state = getattr(model.get_submodule(name).weight, "quant_state", None)
        for t in (getattr(state, "absmax", None), getattr(state, "code", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------ dequantizing


def round_trip(weight: torch.Tensor, record: Mapping) -> torch.Tensor:
    """``dequant(quant(W))`` for a float ``(out, in)`` weight under the adapter's ``quantized_base`` record: what
    transformers' loader stored for ``W`` (it quantizes the weight in the dtype the model was loaded in, recorded as
    ``quantized_from``: float32, or bfloat16 under ``--precision bf16``, with these settings), as float32."""
    import bitsandbytes.functional as F

    _check_record(record)
    w = weight.detach().to(_dtype(record.get("quantized_from", "float32"))).contiguous()
    packed, state = F.quantize_4bit(
        w,
        blocksize=int(record["blocksize"]),
        compress_statistics=False,
        quant_type=record["quant_type"],
        quant_storage=torch.uint8,
    )
    return F.dequantize_4bit(packed, state).to(torch.float32).reshape(w.shape)


def _dtype(name: str) -> torch.dtype:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name))
    if dtype is None:
        raise UserInputError(
            f"the adapter's quantized_base record names an unknown dtype {name!r}: re-save the adapter"
        )
    return dtype


def _check_record(record: Mapping) -> None:
    ok = (
        isinstance(record, Mapping)
        and record.get("library") == "bitsandbytes"
        and record.get("quant_type") in QUANTIZE_CHOICES
        and not record.get("double_quant")
        and isinstance(record.get("blocksize"), int)
        and isinstance(record.get("modules"), list)
    )
    if not ok:
        raise UserInputError(
            "the adapter's quantized_base record is not one psoft-export wrote (bitsandbytes nf4, "
            "no double quantization): re-save the adapter (train --resume)"
        )


def record_of(meta: Optional[Mapping]) -> Optional[dict]:
    """The ``quantized_base`` record of an adapter's ``psoft_export.json`` (``None``: trained over a float base)."""
    record = (meta or {}).get("quantized_base")
    if record is None:
        return None
    _check_record(record)
    require_bitsandbytes()
    return dict(record)


def round_trip_folds(folds: dict[str, Callable], record: Mapping, has_key: Callable[[str], bool]) -> list[str]:
    """Make a streamed export fold the dequantized weights: each quantized module's ``weight`` is round-tripped
    first (then rotated, where it is adapted). ``has_key`` says whether the export writes a key. Returns the keys
    round-tripped."""
    keys = []
    for name in record["modules"]:
        key = f"{name}.weight"
        if not has_key(key):
            raise UserInputError(
                f"the adapter was trained over a quantized {name}, which this model does not have: "
                "pass the base model it was trained on"
            )
        inner = folds.get(key)
        if name in record.get("fan_in_fan_out", []):  # the file holds W^T (GPT-2's Conv1D): quantized as W
            dense = lambda w: round_trip(w.T, record).T  # noqa: E731
        else:
            dense = lambda w: round_trip(w, record)  # noqa: E731
        folds[key] = dense if inner is None else (lambda w, inner=inner, dense=dense: inner(dense(w)))
        keys.append(key)
    return keys


@torch.no_grad()
def dequantize_base(model: nn.Module, record: Mapping) -> list[str]:
    """Replace, in place, each recorded module's float weight by its round trip (an adapter layer's base weight
    where the module is adapted): the float32 model then computes the trained function with exact arithmetic."""
    from psoft_export.adapters.layout import weight_out_in
    from psoft_export.adapters.surgery import ADAPTER_TYPES

    for name in record["modules"]:
        module = model.get_submodule(name)
        module = module.base_layer if isinstance(module, ADAPTER_TYPES) else module
        W = weight_out_in(module)
        W.copy_(round_trip(W, record).to(W.dtype))
    return list(record["modules"])


# ------------------------------------------------------------------------------------------ exporting


def base_transform(record: Mapping, model_dir) -> dict[str, Callable]:
    """``{source key: round_trip}`` for each quantized weight: what a ``--split`` GGUF export writes as its base (the
    base as trained, then stored at the export's precision; the adapter travels in the LoRA file)."""
    from psoft_export.checkpoint import ModelSource

    folds: dict[str, Callable] = {}
    round_trip_folds(folds, record, set(ModelSource(model_dir).keys()).__contains__)
    return folds


def requantized_as(quant: Optional[str], quant_type: str = "nf4") -> Optional[str]:
    """What an export does to the dequantized 4-bit weights (``None``: written at float precision, no requantizing);
    its cost is measured against the trained model (``vs_trained_model`` in the export's record)."""
    if quant is None:
        return None
    head = "the output head Q8_0, " if quant == "q4_0" else ""
    return (
        f"GGUF {quant.upper()}: every 2-D weight (the dequantized {quant_type.upper()} weights, rotated where adapted) "
        f"re-rounded to {quant.upper()} blocks of 32 ({head}1-D tensors F32): a second quantization"
    )
