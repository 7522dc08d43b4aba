"""Property-based tests (issue #7): random shapes, ranks, block sizes, dtypes and configs fed to the adapter layers.

Every example ends in one of two ways: the inputs are invalid and construction raises ``UserInputError`` (the
condition is stated here, independently of the library), or the layer's forward, ``merge()`` and ``unmerge()`` agree
with a float64 recompute written in this file from the formulas of docs/adapters.md:

* PSOFT: ``y = x (W + s B (R - I) A)^T + bias`` with ``R = diag(b) C(Q) diag(a)``, ``s = alpha / r``; ``C`` exact is
  ``(I + Q)(I - Q)^{-1}`` (a float64 ``torch.linalg.solve``), Neumann is PEFT's polynomial
  ``I + 2(Q + ... + Q^{t-2}) + Q^{t-1}`` (``t = 3`` behaves as ``t = 4``), after an optional Frobenius clip of ``Q``.
  ``orth=False``: ``C(Q)`` is the free ``r x r`` matrix ``q``. ``A`` and ``B`` are the layer's frozen SVD buffers;
  that they form an optimal rank-``r`` approximation of ``W`` (and the init's normalisation) is checked separately.
* OFT: ``y = (x R) W^T + bias`` with ``R = blockdiag(R_1, ..., R_n)``; merge gives ``W R^T``.

Only ``UserInputError`` counts as a clean error: nothing else is caught.

Dtypes. float16 and bfloat16 layers work on CPU (the rotation is computed in float32, then cast to the layer dtype
for the matmuls), so they are checked for a correct result, not an error, with a looser tolerance. Tolerances are
elementwise, in units of the working precision ``u`` (``finfo(dtype).eps``; float32's for half layers' adapter math
done in float32), times a forward-error scale built from absolute values: e.g. for PSOFT
``|x| (|W| + s |B| |R-I| |A|)^T + |bias|``. That bound is what a correct float computation satisfies whatever the
cancellation, so the tests neither pass wrong answers on large outputs nor fail correct ones on small outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from psoft_export.adapters.oft import OftConfig, OftLinear
from psoft_export.adapters.psoft import PsoftConfig, PsoftLinear
from psoft_export.errors import UserInputError

torch.set_num_threads(min(2, torch.get_num_threads()))

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
KINDS = ("linear", "linear_nobias", "conv1d")
PATHS = ("auto", "token", "merged", "autograd")

# Elementwise error bound = C * u * scale (see module docstring). C covers the accumulation length (<= 48 terms
# per dot product), a few chained products and the casts of A/B/M/R to half precision. Over ~3500 random examples
# per layer the largest errors were 2 u * scale (forward) and 6 u * scale (rotation, merge, unmerge).
C_FORWARD = 16
C_MERGE = 32

# Spectral-norm ranges of Q. PSOFT's merge is additive, so any Q is fine; OFT's unmerge inverts R, and PEFT's
# Neumann polynomial p(z) = (1 + z)(1 + z + ... + z^{d-1}) vanishes at z = +-i when 4 | d, i.e. R is singular for
# an eigenvalue of Q at +-1i (see test_oft_unmerge_of_singular_neumann_rotation). Keep OFT below that.
PSOFT_RHO = 1.0
OFT_RHO = 0.6

PROPERTY_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------------------------- float64 recompute


def unit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def adapter_unit(dtype: torch.dtype) -> float:
    """Working precision of the adapter math: float64 layers stay float64, others run in float32 at best."""
    return unit(dtype) if dtype == torch.float64 else max(unit(dtype), unit(torch.float32))


def ref_skew(params: torch.Tensor, n: int) -> torch.Tensor:
    """``Q = T - T^T``, ``T`` strictly upper triangular filled row by row from ``params`` (float64)."""
    upper = torch.zeros(*params.shape[:-1], n, n, dtype=torch.float64)
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    upper[..., mask] = params.to(torch.float64)
    return upper - upper.transpose(-1, -2)


def ref_neumann_coeffs(terms: int) -> list[float]:
    """PEFT's loop: ``t = 1`` gives ``I``, ``t = 2`` gives ``I + 2Q``, else degree ``max(t - 1, 3)`` with every
    middle coefficient 2 and the last 1 (its loop adds ``2 Q^2`` before checking ``t``, so ``t = 3`` is ``t = 4``)."""
    if terms == 1:
        return [1.0]
    if terms == 2:
        return [1.0, 2.0]
    degree = max(terms - 1, 3)
    return [1.0] + [2.0] * (degree - 1) + [1.0]


def ref_clip(Q: torch.Tensor, eps: float | None) -> torch.Tensor:
    """PEFT's ``_project_Q``: rescale to ``eps / (||Q||_F + 1e-12)`` when ``||Q||_F > eps`` (the 1e-12 is visible
    in float64, so it is mirrored)."""
    if eps is None:
        return Q
    norm = torch.linalg.matrix_norm(Q, keepdim=True)
    return torch.where(norm > eps, Q * (eps / (norm + 1e-12)), Q)


def ref_orthogonal(params: torch.Tensor, n: int, mode: str, terms: int, eps: float | None):
    """``(R, |R| bound)`` in float64: the bound is what float evaluation of R can reach elementwise (for Neumann,
    ``sum_k c_k |Q|^k``, larger than ``|R|`` when the terms cancel; for the solve, its componentwise bound)."""
    Q = ref_skew(params, n)
    eye = torch.eye(n, dtype=torch.float64).expand_as(Q)
    if mode == "exact":
        # (I - Q)^{-1} (I + Q) = (I + Q)(I - Q)^{-1}: the two factors commute.
        R = torch.linalg.solve(eye - Q, eye + Q)
        # Componentwise bound of a solve A X = B: |A^{-1}| (|A| |X| + |B|).
        A = eye - Q
        return R, torch.linalg.inv(A).abs() @ (A.abs() @ R.abs() + (eye + Q).abs())
    Q = ref_clip(Q, eps)
    R = torch.zeros_like(Q)
    bound = torch.zeros_like(Q)
    power, abs_power = eye.clone(), eye.clone()
    for k, c in enumerate(ref_neumann_coeffs(terms)):
        if k:
            power, abs_power = power @ Q, abs_power @ Q.abs()
        R = R + c * power
        bound = bound + c * abs_power
    return R, bound


def assert_within(actual: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values"
    err = (actual.detach().to(torch.float64) - ref).abs()
    bound = tol * scale + 1e-300
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the bound ({tol:.2e} x |scale|)"


# ------------------------------------------------------------------------------------------------------ the layers


def make_base(kind: str, out_f: int, in_f: int, dtype: torch.dtype, gen: torch.Generator) -> nn.Module:
    """A frozen layer with ``N(0, 1/in)`` weights and ``N(0, 0.1)`` bias, stored in ``dtype``."""
    if kind == "conv1d":
        base = Conv1D(out_f, in_f)  # weight (in, out)
    else:
        base = nn.Linear(in_f, out_f, bias=kind == "linear")
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) / math.sqrt(in_f))
        if base.bias is not None:
            base.bias.copy_(0.1 * torch.randn(base.bias.shape, generator=gen))
    return base.to(dtype).requires_grad_(False)


def w_out_in(base: nn.Module) -> torch.Tensor:
    """A float64 copy of the weight as ``(out, in)``, layout decided here, not by the library."""
    W = base.weight.detach().to(torch.float64, copy=True)
    return W.T if isinstance(base, Conv1D) else W


def bias64(base: nn.Module, out_f: int) -> torch.Tensor:
    return torch.zeros(out_f, dtype=torch.float64) if base.bias is None else base.bias.detach().to(torch.float64)


def scaled_skew_params(shape: tuple[int, ...], n: int, rho: float, gen: torch.Generator) -> torch.Tensor:
    """Random skew parameters rescaled so that every block's ``Q`` has spectral norm ``rho``."""
    params = torch.randn(shape, generator=gen, dtype=torch.float64)
    if params.numel() == 0:
        return params
    Q = ref_skew(params, n)
    norms = torch.linalg.matrix_norm(Q, ord=2).clamp_min(1e-30)
    return params * (rho / norms)[..., None]


# ------------------------------------------------------------------------------------------------------ strategies

batch_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def spectral_norms(draw, top: float):
    """``||Q||_2``: rarely 0 (R = I), else in ``[1e-3, top]`` (no subnormal-size Q, where float32 rounding is
    absolute rather than relative)."""
    if draw(st.sampled_from([False] * 7 + [True])):
        return 0.0
    return draw(st.floats(1e-3, top))


# One fault at most per example, drawn rarely, so that most examples reach the numerical checks.
NO_FAULT = [None] * 10


@st.composite
def neumann_settings(draw, fault):
    terms = draw(st.sampled_from([0, -1, -5])) if fault == "terms" else draw(st.integers(1, 8))
    if fault == "eps":
        eps = draw(st.sampled_from([0.0, 1.0, 1.5, -0.5, float("nan")]))  # outside (0, 1)
    else:
        eps = draw(st.one_of(st.none(), st.floats(0.05, 0.95)))
    return terms, eps


@st.composite
def psoft_cases(draw):
    out_f, in_f = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    limit = min(out_f, in_f)
    fault = draw(st.sampled_from(NO_FAULT + ["rank<=0", "rank>min", "terms", "eps"]))
    if fault == "rank<=0":
        rank = draw(st.integers(-3, 0))
    elif fault == "rank>min":
        rank = draw(st.integers(limit + 1, limit + 5))
    else:
        rank = draw(st.integers(1, limit))
    terms, eps = draw(neumann_settings(fault))
    return dict(
        kind=draw(st.sampled_from(KINDS)),
        out_f=out_f,
        in_f=in_f,
        batch=draw(batch_shapes),
        dtype=draw(st.sampled_from(DTYPES)),
        rank=rank,
        alpha=draw(st.sampled_from([1.0, 8.0, 32.0, 0.5])),
        init=draw(st.sampled_from(["psoft", "pissa"])),
        cayley=draw(st.sampled_from(["exact", "neumann"])),
        terms=terms,
        eps=eps,
        vector_a=draw(st.booleans()),
        vector_b=draw(st.booleans()),
        orth=draw(st.booleans()),
        path=draw(st.sampled_from(PATHS)),
        rho=draw(spectral_norms(PSOFT_RHO)),
        vec_std=draw(st.floats(0.0, 0.5)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def oft_cases(draw):
    in_f = draw(st.integers(1, 48))
    fits = [d for d in range(2, 51) if in_f % d == 0]
    fault = draw(st.sampled_from(NO_FAULT + ["block=1", "block does not divide", "terms", "eps"]))
    if fault == "block=1":
        block = draw(st.sampled_from([1, 0, -2]))
    elif fault == "block does not divide":
        block = draw(st.integers(2, 50).filter(lambda d: in_f % d != 0))
    elif fits:
        block = draw(st.sampled_from(fits))
    else:
        block = 1  # in_features = 1: no block size fits
    terms, eps = draw(neumann_settings(fault))
    return dict(
        kind=draw(st.sampled_from(KINDS)),
        out_f=draw(st.integers(1, 48)),
        in_f=in_f,
        batch=draw(batch_shapes),
        dtype=draw(st.sampled_from(DTYPES)),
        block=block,
        share=draw(st.booleans()),
        cayley=draw(st.sampled_from(["exact", "neumann"])),
        terms=terms,
        eps=eps,
        rho=draw(spectral_norms(OFT_RHO)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def config_terms_eps_invalid(case: dict) -> bool:
    """Both configs validate the Neumann settings whatever the Cayley mode."""
    eps = case["eps"]
    return case["terms"] < 1 or (eps is not None and not 0.0 < eps < 1.0)


# ----------------------------------------------------------------------------------------------------------- PSOFT


def build_psoft(case: dict, base: nn.Module) -> PsoftLinear:
    config = PsoftConfig(
        rank=case["rank"],
        alpha=case["alpha"],
        init=case["init"],
        cayley=case["cayley"],
        neumann_terms=case["terms"],
        neumann_eps=case["eps"],
        vector_a=case["vector_a"],
        vector_b=case["vector_b"],
        orth=case["orth"],
    )
    return PsoftLinear(base, config)


def check_factors(layer: PsoftLinear, W: torch.Tensor, case: dict) -> None:
    """``s B A`` is an optimal rank-r approximation of W (Eckart–Young, sign- and degeneracy-free), with the init's
    normalisation: psoft ``A A^T = I``; pissa ``A A^T = B^T B`` diagonal."""
    r, s = case["rank"], case["alpha"] / case["rank"]
    A, B = layer.A.to(torch.float64), layer.B.to(torch.float64)
    assert A.shape == (r, case["in_f"]) and B.shape == (case["out_f"], r)
    u = unit(torch.float64 if case["dtype"] == torch.float64 else torch.float32)  # the SVD runs in float32 at least
    sv = torch.linalg.svdvals(W)
    norm2 = float(sv.square().sum())
    tail = float(sv[r:].square().sum())
    resid = float((W - s * B @ A).square().sum())
    assert abs(resid - tail) <= 200 * u * max(norm2, 1e-30), f"||W - sBA||_F^2 = {resid:.6g}, optimum {tail:.6g}"
    eye = torch.eye(r, dtype=torch.float64)
    gram_a, gram_b = A @ A.T, B.T @ B
    if case["init"] == "psoft":
        assert float((gram_a - eye).abs().max()) <= 200 * u, "psoft init: A's rows are not orthonormal"
    else:
        top = float(sv[0]) / s
        assert float((gram_a - gram_b).abs().max()) <= 200 * u * max(top, 1e-30), "pissa init: A A^T != B^T B"
        off = gram_a - torch.diag(torch.diagonal(gram_a))
        assert float(off.abs().max()) <= 200 * u * max(top, 1e-30), "pissa init: A A^T is not diagonal"


def randomize_psoft(layer: PsoftLinear, case: dict, gen: torch.Generator) -> None:
    r = case["rank"]
    with torch.no_grad():
        if case["orth"]:
            layer.q.copy_(scaled_skew_params(tuple(layer.q.shape), r, case["rho"], gen))
        else:
            layer.q.copy_(torch.eye(r) + case["rho"] / math.sqrt(r) * torch.randn(r, r, generator=gen))
        for vec in (layer.vector_a, layer.vector_b):
            if vec is not None:
                vec.copy_(1.0 + case["vec_std"] * torch.randn(r, generator=gen))


def ref_psoft(layer: PsoftLinear, case: dict):
    """``(s (R - I), |s (R - I)| bound)`` in float64 from the layer's parameters."""
    r, s = case["rank"], case["alpha"] / case["rank"]
    q = layer.q.detach().to(torch.float64)
    if case["orth"]:
        R, R_abs = ref_orthogonal(q, r, case["cayley"], case["terms"], case["eps"])
    else:
        R, R_abs = q, q.abs()
    for name, side in (("vector_b", 0), ("vector_a", 1)):
        vec = getattr(layer, name)
        if vec is not None:
            v = vec.detach().to(torch.float64)
            v = v[:, None] if side == 0 else v[None, :]
            R, R_abs = v * R, v.abs() * R_abs
    eye = torch.eye(r, dtype=torch.float64)
    return s * (R - eye), s * (R_abs + eye)


@given(case=psoft_cases())
@PROPERTY_SETTINGS
def test_psoft_layer_matches_float64_recompute_or_raises(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, out_f, in_f = case["dtype"], case["out_f"], case["in_f"]
    base = make_base(case["kind"], out_f, in_f, dtype, gen)
    invalid = case["rank"] <= 0 or case["rank"] > min(out_f, in_f) or config_terms_eps_invalid(case)
    event("invalid config" if invalid else f"valid, {dtype}")
    if invalid:
        with pytest.raises(UserInputError):
            build_psoft(case, base)
        return
    layer = build_psoft(case, base)
    layer.path = case["path"]
    W, bias = w_out_in(base), bias64(base, out_f)
    W_orig = base.weight.detach().clone()
    check_factors(layer, W, case)

    x = torch.randn(*case["batch"], in_f, generator=gen).to(dtype)
    # At init R = I exactly: the output is the base layer's, bit for bit.
    with torch.no_grad():
        assert torch.equal(layer(x), base(x)), "PSOFT at init differs from the base layer"

    randomize_psoft(layer, case, gen)
    A, B = layer.A.to(torch.float64), layer.B.to(torch.float64)
    M, M_abs = ref_psoft(layer, case)
    delta = B @ M @ A
    W_eff = W + delta
    W_eff_abs = W.abs() + B.abs() @ M_abs @ A.abs()
    x64 = x.to(torch.float64)
    y_ref = x64 @ W_eff.T + bias
    y_scale = x64.abs() @ W_eff_abs.T + bias.abs()
    tol_y = C_FORWARD * unit(dtype)

    y = layer(x)
    assert y.dtype == dtype
    assert_within(y, y_ref, y_scale, tol_y, f"PSOFT forward {case}")

    layer.merge()
    assert layer.merged
    assert_within(w_out_in(base), W_eff, W_eff_abs, C_MERGE * adapter_unit(dtype), "PSOFT merged weight")
    with torch.no_grad():
        assert_within(layer(x), y_ref, y_scale, tol_y, "PSOFT forward after merge")

    layer.unmerge()
    assert not layer.merged
    # W + d - d in the layer dtype: two roundings of magnitude |W| + |d|.
    restored = base.weight.detach().to(torch.float64)
    scale = W_orig.to(torch.float64).abs() + (W_eff_abs.T if isinstance(base, Conv1D) else W_eff_abs)
    assert_within(restored, W_orig.to(torch.float64), scale, C_MERGE * adapter_unit(dtype), "PSOFT unmerge")
    with torch.no_grad():
        assert_within(layer(x), y_ref, y_scale, tol_y, "PSOFT forward after unmerge")


# ------------------------------------------------------------------------------------------------------------- OFT


def build_oft(case: dict, base: nn.Module) -> OftLinear:
    config = OftConfig(
        block_size=case["block"],
        cayley=case["cayley"],
        neumann_terms=case["terms"],
        neumann_eps=case["eps"],
        block_share=case["share"],
    )
    return OftLinear(base, config)


@given(case=oft_cases())
@PROPERTY_SETTINGS
def test_oft_layer_matches_float64_recompute_or_raises(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, out_f, in_f, b = case["dtype"], case["out_f"], case["in_f"], case["block"]
    base = make_base(case["kind"], out_f, in_f, dtype, gen)
    invalid = b < 2 or in_f % b != 0 or config_terms_eps_invalid(case)
    event("invalid config" if invalid else f"valid, {dtype}")
    if invalid:
        with pytest.raises(UserInputError):
            build_oft(case, base)
        return
    layer = build_oft(case, base)
    n = in_f // b
    assert tuple(layer.q.shape) == (1 if case["share"] else n, b * (b - 1) // 2)
    W, bias = w_out_in(base), bias64(base, out_f)
    W_orig = base.weight.detach().clone()

    x = torch.randn(*case["batch"], in_f, generator=gen).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x)), "OFT at init differs from the base layer"

    with torch.no_grad():
        layer.q.copy_(scaled_skew_params(tuple(layer.q.shape), b, case["rho"], gen))
    blocks, blocks_abs = ref_orthogonal(layer.q.detach(), b, case["cayley"], case["terms"], case["eps"])
    blocks, blocks_abs = blocks.expand(n, b, b), blocks_abs.expand(n, b, b)
    R = torch.block_diag(*blocks.unbind(0))
    R_abs = torch.block_diag(*blocks_abs.unbind(0))

    x64 = x.to(torch.float64)
    y_ref = x64 @ R @ W.T + bias
    y_scale = x64.abs() @ R_abs @ W.abs().T + bias.abs()
    tol_y = C_FORWARD * unit(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert_within(y, y_ref, y_scale, tol_y, f"OFT forward {case}")
    assert_within(layer.rotation(), R, R_abs, C_MERGE * adapter_unit(dtype), "OFT rotation()")

    layer.merge()
    assert layer.merged
    W_merged_ref = W @ R.T
    merged_scale = W.abs() @ R_abs.T
    assert_within(w_out_in(base), W_merged_ref, merged_scale, C_MERGE * adapter_unit(dtype), "OFT merged weight")
    with torch.no_grad():
        assert_within(layer(x), y_ref, y_scale, tol_y, "OFT forward after merge")

    layer.unmerge()
    assert not layer.merged
    # W = W' R^{-T}: the merge's rounding of W' (<= u |W||R|^T) is amplified by |R^{-T}|, then rounded to the dtype.
    R_inv = torch.linalg.inv(R)
    unmerge_scale = merged_scale @ R_inv.abs().T + W.abs()
    assert_within(w_out_in(base), W, unmerge_scale, C_MERGE * adapter_unit(dtype), "OFT unmerge")
    assert base.weight.dtype == W_orig.dtype
    with torch.no_grad():
        assert_within(layer(x), y_ref, y_scale, tol_y, "OFT forward after unmerge")


# ------------------------------------------------------------------------------------------- a known failing corner


def test_oft_unmerge_of_singular_neumann_rotation():
    """``p(z) = 1 + 2z + 2z^2 + 2z^3 + z^4 = (1 + z)(1 + z + z^2 + z^3)`` vanishes at ``z = i``: with ``b = 2`` and
    ``q = 1`` (``Q = [[0, 1], [-1, 0]]``, eigenvalues ``+-i``), ``R = 0``. A clean outcome is a ``UserInputError``
    from merge or unmerge, or ``W`` restored."""
    base = nn.Linear(2, 3)
    W = base.weight.detach().clone()
    layer = OftLinear(base, OftConfig(block_size=2, cayley="neumann", neumann_terms=5))
    with torch.no_grad():
        layer.q.fill_(1.0)
    assert float(layer.rotation().detach().abs().max()) == 0.0
    with pytest.raises(UserInputError, match="rotation is singular"):
        layer.merge()
    assert torch.equal(base.weight.detach(), W) and not layer.merged, "a refused merge must leave W untouched"


@pytest.mark.parametrize("bad", [5.5, 2.5, True])
def test_non_integer_neumann_terms_and_bool_rank_are_refused(bad):
    from psoft_export.adapters import PsoftConfig

    with pytest.raises(UserInputError, match="neumann_terms must be"):
        OftConfig(block_size=4, neumann_terms=bad)
    with pytest.raises(UserInputError, match="neumann_terms must be"):
        PsoftConfig(rank=4, neumann_terms=bad)
    with pytest.raises(UserInputError, match="rank must be a positive integer"):
        PsoftConfig(rank=True)
