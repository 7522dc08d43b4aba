"""Cayley and Cayley-Neumann: orthogonality, PEFT's series convention, float64 references."""

import pytest
import torch

from psoft_export.adapters import cayley as cay


def random_skew(n: int, scale: float, seed: int = 0, batch: tuple = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(*batch, cay.num_skew_params(n), generator=g, dtype=torch.float64)
    Q = cay.skew_symmetric(p, n)
    return Q * (scale / torch.linalg.matrix_norm(Q, ord=2, keepdim=True))


@pytest.mark.parametrize("n", [2, 8, 33, 128])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_exact_cayley_is_orthogonal(n, scale):
    R = cay.cayley(random_skew(n, scale).float())
    assert R.dtype == torch.float32
    err = float(cay.orthogonality_error(R))
    assert err < 1e-6, f"||R^T R - I||_F = {err:.2e} for n={n}, ||Q||_2={scale} (tolerance 1e-6, float32)"


def test_exact_cayley_matches_float64_definition():
    Q = random_skew(16, 0.7, seed=3)
    eye = torch.eye(16, dtype=torch.float64)
    ref = (eye + Q) @ torch.linalg.inv(eye - Q)
    assert torch.allclose(cay.cayley(Q), ref, atol=1e-12), "cayley(Q) != (I+Q)(I-Q)^-1 (float64, atol 1e-12)"


def test_skew_symmetric_layout_matches_peft_order():
    p = torch.arange(1.0, 7.0)  # 4x4 -> 6 params, row-major strict upper triangle
    Q = cay.skew_symmetric(p, 4)
    assert torch.equal(Q, -Q.T)
    assert Q[0, 1] == 1 and Q[0, 3] == 3 and Q[1, 2] == 4 and Q[2, 3] == 6


def peft_neumann(Q: torch.Tensor, t: int) -> torch.Tensor:
    """PEFT 0.21's loop (psoft OrthLayer.get_matrix), written out as the oracle."""
    R = torch.eye(Q.shape[-1], dtype=Q.dtype)
    if t > 1:
        R = R + 2 * Q
        if t > 2:
            Q2 = Q @ Q
            R = R + 2 * Q2
            P = Q2
            for _ in range(3, t - 1):
                P = P @ Q
                R = R + 2 * P
            R = R + P @ Q
    return R


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6, 7, 9])
def test_neumann_series_matches_peft_loop(t):
    Q = random_skew(12, 0.3, seed=t)
    assert torch.allclose(cay.cayley_neumann(Q, t), peft_neumann(Q, t), atol=1e-13), f"terms={t}"


def test_neumann_three_terms_equals_four_like_peft():
    Q = random_skew(8, 0.2)
    assert torch.equal(cay.cayley_neumann(Q, 3), cay.cayley_neumann(Q, 4))


def test_even_terms_preserve_orthogonality_better():
    Q = random_skew(32, 0.1, seed=5)
    odd = float(cay.orthogonality_error(cay.cayley_neumann(Q, 5)))
    even = float(cay.orthogonality_error(cay.cayley_neumann(Q, 6)))
    # Leading error: 2 Q^4-ish for t=5 (~1e-4 at ||Q||=0.1), Q^10 for t=6.
    assert 1e-5 < odd < 1e-3, f"t=5 orthogonality error {odd:.2e} outside the expected 1e-5..1e-3"
    assert even < 1e-8, f"t=6 orthogonality error {even:.2e} >= 1e-8"


def test_neumann_converges_to_exact():
    Q = random_skew(16, 0.2, seed=7)
    err = float((cay.cayley_neumann(Q, 20) - cay.cayley(Q)).abs().max())
    assert err < 1e-12, f"20-term series differs from exact Cayley by {err:.2e}"


def test_frobenius_clip_bounds_each_block():
    Q = random_skew(8, 5.0, batch=(3,))
    clipped = cay.clip_frobenius(Q, 0.9)
    norms = torch.linalg.matrix_norm(clipped)
    assert torch.all(norms <= 0.9 + 1e-9), norms
    small = random_skew(8, 0.01)
    assert torch.equal(cay.clip_frobenius(small, 0.9), small)


def test_batched_cayley_matches_loop():
    Q = random_skew(6, 0.5, batch=(4,))
    batched = cay.cayley(Q)
    for i in range(4):
        assert torch.allclose(batched[i], cay.cayley(Q[i]), atol=1e-14)


def test_bad_terms_is_user_error():
    with pytest.raises(ValueError, match="neumann terms must be >= 1"):
        cay.neumann_coefficients(0)
