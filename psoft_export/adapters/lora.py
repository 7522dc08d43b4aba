"""The LoRA form of an adapter as a value: ``({module: (A, B)}, alpha, errors)``, exact for PSOFT, a truncated-SVD
approximation of OFT's full-rank update (``--lora-rank``). Every split exporter consumes it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from psoft_export.adapters.psoft import PsoftLinear
from psoft_export.adapters.surgery import adapter_layers, unload
from psoft_export.errors import UserInputError


def lora_form(model: nn.Module, lora_rank: Optional[int] = None) -> tuple[dict, float, dict]:
    """``({module: (A (r, in), B (out, r))}, alpha, approximation errors)`` of every adapter layer.

    PSOFT is exact (docs/adapters.md, the LoRA form: ``lora_A = (R - I) A``, ``lora_B = B``, ``alpha`` as trained).
    OFT needs ``lora_rank``: the best rank-K approximation of ``W (R^T - I)`` (truncated SVD, scale 1), with its
    error ``||dW - B A||_F / ||dW||_F`` per module.
    """
    layers = adapter_layers(model)
    psoft = [l for l in layers.values() if isinstance(l, PsoftLinear)]
    if psoft and lora_rank is None:
        with torch.no_grad():
            return (
                {n: tuple(t.detach().float() for t in l.lora_factors()) for n, l in layers.items()},
                float(psoft[0].config.alpha),
                {},
            )
    if lora_rank is None:
        raise UserInputError(
            "OFT's update is full rank and this target only takes LoRA adapters: pass "
            "--lora-rank K for a truncated-SVD approximation (its error is reported), or export merged"
        )
    factors, errors = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            delta = layer.delta_weight().double()
            if not 0 < lora_rank <= min(delta.shape):
                raise UserInputError(
                    f"--lora-rank {lora_rank} does not fit {name} {tuple(delta.shape)}: choose 1..{min(delta.shape)}"
                )
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            B, A = U[:, :lora_rank] * S[:lora_rank], Vh[:lora_rank]
            errors[name] = float(torch.linalg.norm(delta - B @ A) / torch.linalg.norm(delta).clamp_min(1e-30))
            factors[name] = (A.float(), B.float())
    return factors, float(lora_rank), errors


def approximated_model(reference: nn.Module, lora_rank: int) -> nn.Module:
    """A copy of the base with the rank-K LoRA approximation of ``reference``'s adapter merged: what a
    ``--lora-rank`` export holds."""
    import copy

    from psoft_export.adapters.layout import weight_out_in

    factors, alpha, _ = lora_form(reference, lora_rank)
    base = unload(copy.deepcopy(reference))
    with torch.no_grad():
        for name, (A, B) in factors.items():
            W = weight_out_in(base.get_submodule(name))
            W.add_((alpha / A.shape[0] * B.double() @ A.double()).to(W.dtype))
    return base
