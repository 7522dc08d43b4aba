"""The PEFT LoRA directory of an adapter's LoRA form (``merge --to safetensors --split`` writes it as ``lora/``):
``adapter_config.json`` as PEFT 0.21 writes it and ``adapter_model.safetensors``, which PEFT, vLLM and
``convert_lora_to_gguf.py`` read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from psoft_export import adapter_io
from psoft_export.adapters import adapter_layers
from psoft_export.adapters.layout import is_fan_in_fan_out
from psoft_export.adapters.lora import lora_form


def peft_lora_config(
    targets: list[str],
    rank: int,
    alpha: float,
    base_model: str,
    task_type: Optional[str],
    fan_in_fan_out: bool,
    heads: list[str],
) -> dict:
    """A PEFT 0.21 LoRA ``adapter_config.json`` (what ``convert_lora_to_gguf.py`` and vLLM read)."""
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": heads or None,
        "peft_version": "0.21.2",
    }


def write_lora_dir(model, model_dir: Path, adapter_dir: Path, out: Path, lora_rank: Optional[int]) -> dict:
    from safetensors.torch import save_file

    factors, alpha, errors = lora_form(model, lora_rank)
    out.mkdir()
    peft = adapter_io.read_config(adapter_dir)
    heads = peft.get("modules_to_save") or []
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"{adapter_io.PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{adapter_io.PREFIX}{name}.lora_B.weight"] = B.contiguous()
    for head in heads:
        for key, value in adapter_io.head_tensors(adapter_dir, head).items():
            tensors[key] = value
    rank = next(iter(factors.values()))[0].shape[0]
    fan = any(is_fan_in_fan_out(l.base_layer) for l in adapter_layers(model).values())
    config = peft_lora_config(
        sorted({n.rsplit(".", 1)[-1] for n in factors}),
        rank,
        int(alpha) if float(alpha).is_integer() else alpha,
        str(model_dir),
        peft.get("task_type"),
        fan,
        heads,
    )
    save_file(tensors, str(out / adapter_io.WEIGHTS_FILE), metadata={"format": "pt"})
    (out / adapter_io.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return errors
