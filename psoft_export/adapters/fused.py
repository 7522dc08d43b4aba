"""A fused PSOFT linear layer: one autograd node for ``y = x (W + B M A)^T + b`` with a frozen ``W``, ``A``, ``B``.

``M = s (R - I)`` ``(r, r)`` is the only input that trains (it is differentiated by ordinary autograd back to ``q``
and the vectors). Two ways to compute each half of the step, chosen per call from the shapes and the token count
``T`` (``o`` = out, ``i`` = in, ``r`` = rank; FLOPs beyond the frozen layer's ``2 T o i`` forward and ``2 T o i``
backward for the input gradient):

* always: ``u = x A^T`` (``2 T i r``, saved for backward: ``T x r`` floats), ``g = dY B`` (``2 T o r``) and
  ``dM = g^T u`` (``2 T r^2``): the gradient of ``M`` needs both sides projected onto the subspace;
* forward, per token: ``y = x W^T + (u M^T) B^T`` (``2 T r (r + o)``, the add fused into ``addmm``);
  merged: ``W_eff = W + (B M) A`` (``2 o r (r + i)`` + ``o i`` for the add), then ``y = x W_eff^T``;
* backward, per token: ``dX = dY W + (g M) A`` (``2 T r (r + i)``, fused into ``addmm``); merged: rebuild
  ``W_eff`` (same cost as in the forward) and ``dX = dY W_eff``.

``W_eff`` is transient: built, used by one GEMM, freed; it is recomputed in backward rather than saved, so no second
copy of a weight outlives a call. The merged side wins when ``T`` is large against ``o`` (forward:
``T (r + o) > o (r + i)``; backward: ``T > o`` roughly). The per-token path costs ``4 T r (i + o) + 6 T r^2`` in all,
PEFT's path the same plus four elementwise passes over ``T x o`` (the ``R - I`` subtraction on ``T x r``, the
scaling and the residual add, and their backward).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

PATHS = ("auto", "token", "merged", "autograd")  # "autograd": PsoftLinear skips this module


def _merged_costs(T: int, o: int, i: int, r: int) -> tuple[float, float, float]:
    """FLOPs (beyond the frozen layer) of: forward per token, forward/backward merged (one ``W_eff``), backward per
    token."""
    weight = 2.0 * o * r * (r + i) + o * i
    return 2.0 * T * r * (r + o), weight, 2.0 * T * r * (r + i)


def choose(T: int, o: int, i: int, r: int, path: str = "auto") -> tuple[bool, bool]:
    """``(merged forward, merged backward)`` for a call with ``T`` tokens."""
    if path == "token":
        return False, False
    if path == "merged":
        return True, True
    fwd_token, weight, bwd_token = _merged_costs(T, o, i, r)
    return weight < fwd_token, weight < bwd_token


def _low_rank(B: torch.Tensor, M: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``P Q = B M A``: multiply ``M`` into the thinner side (``r^2 min(o, i)`` FLOPs)."""
    if B.shape[0] <= A.shape[1]:
        return B @ M, A
    return B, M @ A


def effective_weight(W: torch.Tensor, B: torch.Tensor, M: torch.Tensor, A: torch.Tensor, fifo: bool) -> torch.Tensor:
    """``W + B M A`` in the storage layout of ``W`` (``(out, in)``, or ``(in, out)`` when ``fifo``): one ``addmm``."""
    P, Q = _low_rank(B, M, A)
    if fifo:
        return torch.addmm(W, Q.T, P.T)
    return torch.addmm(W, P, Q)


def _base(x2: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], fifo: bool) -> torch.Tensor:
    """The frozen layer on ``(T, in)``: exactly the kernel ``nn.Linear`` / ``Conv1D`` itself calls."""
    if fifo:
        return torch.addmm(bias, x2, W) if bias is not None else x2 @ W
    return F.linear(x2, W, bias)


class PsoftLinearFunction(torch.autograd.Function):
    """``y = x (W + B M A)^T + bias`` (``W`` stored ``(in, out)`` when ``fifo``); gradients for ``x``, ``M``, and for
    ``W`` and ``bias`` when they require it (then ``x`` is saved too); ``A`` and ``B`` are frozen."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, M, fifo: bool, path: str):
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)
        T, r = x2.shape[0], M.shape[0]
        o = W.shape[1] if fifo else W.shape[0]
        merged_fwd, merged_bwd = choose(T, o, in_f, r, path)
        u = x2 @ A.T  # (T, r): what dM needs from the input side
        if merged_fwd:
            y = _base(x2, effective_weight(W, B, M, A, fifo), bias, fifo)
        else:
            y = _base(x2, W, bias, fifo)
            y.addmm_(u @ M.T, B.T)
        ctx.save_for_backward(u, W, A, B, M, x2 if ctx.needs_input_grad[1] else None)
        ctx.fifo, ctx.merged_bwd, ctx.x_shape = fifo, merged_bwd, x.shape
        return y.view(*x.shape[:-1], o)

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(device_type=dy.device.type, enabled=False):
            return PsoftLinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        u, W, A, B, M, x2 = ctx.saved_tensors
        fifo = ctx.fifo
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != u.dtype:
            dy2 = dy2.to(u.dtype)
        need_x, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        g = dy2 @ B if need_m or (need_x and not ctx.merged_bwd) else None  # (T, r)
        dx = dW = dbias = dM = None
        if need_x:
            if ctx.merged_bwd:
                W_eff = effective_weight(W, B, M, A, fifo)
                dx = dy2 @ (W_eff.T if fifo else W_eff)
                del W_eff
            else:
                dx = dy2 @ (W.T if fifo else W)
                dx.addmm_(g @ M, A)
            dx = dx.view(ctx.x_shape)
        if need_m:
            dM = g.T @ u
        if ctx.needs_input_grad[1]:  # W_eff = W + B M A, so dW = dW_eff
            dW = x2.T @ dy2 if fifo else dy2.T @ x2
        if ctx.needs_input_grad[2]:
            dbias = dy2.sum(0)
        return dx, dW, dbias, None, None, dM, None, None


def psoft_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    M: torch.Tensor,
    fifo: bool,
    path: str = "auto",
) -> torch.Tensor:
    """Autocast-aware entry point: under ``torch.autocast`` every operand is cast to the autocast dtype first (what
    ``F.linear`` would do), and the fused node runs with autocast off; otherwise operands are cast to ``x``'s dtype
    only where they differ."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = x.dtype
    x, W, A, B, M = (t if t.dtype == dtype else t.to(dtype) for t in (x, W, A, B, M))
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    with torch.autocast(device_type=device_type, enabled=False):
        return PsoftLinearFunction.apply(x, W, bias, A, B, M, fifo, path)
