"""Both adapter layers against float64 recomputations that build R from the raw parameters themselves (issue 14).

Nothing here calls the layer's own ``rotation()``/``rotation_blocks()``: the skew matrix, the Cayley transform or
its Neumann series, the tunable vectors and the block layout are written out again from docs/adapters.md's formulas,
so a bug in the code under test cannot also be in the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from psoft_export.adapters import OftConfig, OftLinear, PsoftConfig, PsoftLinear

TOL = 1e-5  # relative (max |diff| / max |ref|): float32 layer vs float64 recompute


def skew(params: torch.Tensor, size: int) -> torch.Tensor:
    """Q = T - T^T with T's strict upper triangle filled row by row from ``params``."""
    Q = torch.zeros(size, size, dtype=torch.float64)
    k = 0
    for i in range(size):
        for j in range(i + 1, size):
            Q[i, j], Q[j, i] = params[k], -params[k]
            k += 1
    return Q


def cayley64(Q: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(Q.shape[0], dtype=torch.float64)
    return (eye + Q) @ torch.linalg.inv(eye - Q)


def neumann64(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's count: I + 2 (Q + ... + Q^(terms-2)) + Q^(terms-1)."""
    eye = torch.eye(Q.shape[0], dtype=torch.float64)
    R, power = eye.clone(), eye.clone()
    for k in range(1, terms):
        power = power @ Q
        R = R + (power if k == terms - 1 else 2 * power)
    return R


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("cayley", ["exact", "neumann"])
def test_psoft_layer_against_float64(cayley):
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    r = 12
    layer = PsoftLinear(base, PsoftConfig(rank=r, alpha=6.0, cayley=cayley, neumann_terms=6))
    with torch.no_grad():
        layer.q.normal_(0, 0.05)
        layer.vector_a.uniform_(0.8, 1.2)
        layer.vector_b.uniform_(0.8, 1.2)
    Q = skew(layer.q.detach().double(), r)
    C = cayley64(Q) if cayley == "exact" else neumann64(Q, 6)
    R = torch.diag(layer.vector_b.detach().double()) @ C @ torch.diag(layer.vector_a.detach().double())
    W, bias = base.weight.detach().double(), base.bias.detach().double()
    A, B, s = layer.A.double(), layer.B.double(), 6.0 / r
    x = torch.randn(5, 48)
    ref = x.double() @ (W + s * B @ (R - torch.eye(r, dtype=torch.float64)) @ A).T + bias
    assert rel(layer(x), ref) <= TOL
    assert rel(layer.delta_weight(), s * B @ (R - torch.eye(r, dtype=torch.float64)) @ A) <= TOL


@pytest.mark.parametrize("cayley,shared", [("exact", False), ("neumann", False), ("neumann", True)])
def test_oft_layer_against_float64(cayley, shared):
    torch.manual_seed(1)
    base = nn.Linear(32, 24)
    b = 8
    layer = OftLinear(base, OftConfig(block_size=b, cayley=cayley, neumann_terms=6, block_share=shared))
    with torch.no_grad():
        layer.q.normal_(0, 0.05)
    blocks = []
    for i in range(32 // b):
        Q = skew(layer.q[0 if shared else i].detach().double(), b)
        blocks.append(cayley64(Q) if cayley == "exact" else neumann64(Q, 6))
    R = torch.block_diag(*blocks)  # (in, in): x' = x R, merged W' = W R^T
    W, bias = base.weight.detach().double(), base.bias.detach().double()
    x = torch.randn(5, 32)
    ref = (x.double() @ R) @ W.T + bias
    assert rel(layer(x), ref) <= TOL
    assert rel(layer.merged_weight(), W @ R.T) <= TOL
