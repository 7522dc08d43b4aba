"""Shared test helpers: the fixture models (real HF directories built by fixtures/build.py) and PEFT oracles."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "fixtures" / "models"
DECODERS = ("llama", "qwen2", "gpt2")
ALL_MODELS = DECODERS + ("bert",)

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_CACHE: dict[str, nn.Module] = {}


def oft_train_args(model, data, out, *extra) -> list:
    """``psoft-export train`` arguments of a small OFT run (block size 16) of ``model`` on ``data`` into ``out``."""
    return ["train", model, "--data", data, "-o", out, "--method", "oft", "--block-size", 16, *extra]


def load_model(name: str) -> nn.Module:
    """A fresh float32 copy of fixture ``name`` in eval mode (loaded once per session, then deep-copied)."""
    if name not in _CACHE:
        cls = AutoModelForMaskedLM if name == "bert" else AutoModelForCausalLM
        _CACHE[name] = cls.from_pretrained(MODELS / name, dtype=torch.float32).eval()
    return copy.deepcopy(_CACHE[name])


def model_inputs(name: str) -> dict[str, torch.Tensor]:
    """Tokenized fixed sentences (a padded batch of two) for fixture ``name``."""
    tok = AutoTokenizer.from_pretrained(MODELS / name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = ["The red fox lives in the north forest and eats berries.", "A small grey owl sleeps."]
    return dict(tok(texts, return_tensors="pt", padding=True))


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|: error relative to the output scale."""
    a, ref = a.detach(), ref.detach()
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def linearize_conv1d(model: nn.Module) -> nn.Module:
    """Replace every transformers Conv1D by an equivalent nn.Linear (weight transposed), in place.

    PEFT's PSOFT and OFT accept only nn.Linear, so the PEFT oracle for GPT-2 runs on this copy: same function,
    same module names, independent layout code.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
            lin = nn.Linear(in_f, out_f)
            with torch.no_grad():
                lin.weight.copy_(module.weight.T)
                lin.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    return model


def peft_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` PEFT can adapt (Conv1D turned into nn.Linear)."""
    return linearize_conv1d(copy.deepcopy(model))


def require(module: str):
    """Import an optional runtime the README's install provides; its absence fails the run (a skip would hide
    that GGUF was never checked). Skips are for absent hardware only."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"{module} is not installed ({exc}): install as the README says, "
            "pip install -c constraints-cpu.txt -e '.[cpu,test,llama]'"
        )
