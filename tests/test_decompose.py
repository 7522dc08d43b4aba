"""decompose: subspace accuracy against float64 SVD and PEFT, the stored format, hashes, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PsoftConfig as PeftPsoftConfig
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from psoft_export.adapters import PsoftConfig, inject
from psoft_export.checkpoint import ModelSource, sha256_of
from psoft_export.cli import cli
from psoft_export.decompose import Decomposition, decompose
from psoft_export.errors import UserInputError
from tests.conftest import MODELS, load_model, model_inputs, outputs, peft_copy, rel_err
from tests.test_adapters_psoft import copy_into_peft, randomize


def largest_principal_angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Largest principal angle (rad) between the row spaces of X and Y, via its sine in float64.

    arccos of the cosines is useless here: near 1 it turns float32 rounding (1e-7) into 4e-4 rad.
    """
    Qx = torch.linalg.qr(X.double().T).Q  # orthonormal bases of the row spaces, as columns
    Qy = torch.linalg.qr(Y.double().T).Q
    residual = Qx - Qy @ (Qy.T @ Qx)  # the part of span(X) outside span(Y)
    return float(torch.arcsin(torch.linalg.matrix_norm(residual, ord=2).clamp(max=1.0)))


def weights(model_name: str) -> dict[str, torch.Tensor]:
    return load_file(MODELS / model_name / "model.safetensors")


@pytest.mark.parametrize("model_name,rank", [("llama", 8), ("gpt2", 16), ("bert", 8)])
def test_lowrank_matches_exact_subspace(tmp_path, model_name, rank):
    low = decompose(MODELS / model_name, tmp_path / "low", rank, svd="lowrank", plot=False)
    sd = weights(model_name)
    worst = 0.0
    for name, (A, B) in low.factors().items():
        rec = low.manifest["targets"][name]
        W = sd[rec["key"]].double()
        W = W.T if rec["fan_in_fan_out"] else W
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        worst = max(worst, largest_principal_angle(A, Vh[:rank]))
        Bn = B / B.norm(dim=0)
        worst = max(worst, largest_principal_angle(Bn.T, U[:, :rank].T))
    assert worst < 1e-3, f"{model_name}: lowrank vs float64 SVD, largest principal angle {worst:.2e} rad >= 1e-3"


@pytest.mark.parametrize("init", ["psoft", "pissa"])
def test_stored_factors_rebuild_the_weight(tmp_path, init):
    rank, alpha = 8, 4.0
    dec = decompose(MODELS / "llama", tmp_path / "d", rank, svd="full", init=init, alpha=alpha, plot=False)
    sd = weights("llama")
    s = alpha / rank
    for name, (A, B) in dec.factors().items():
        W = sd[dec.manifest["targets"][name]["key"]].double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
        err = rel_err(s * B.double() @ A.double(), best)
        assert err < 1e-5, f"{name}: s B A vs float64 rank-{rank} truncation, rel err {err:.2e}"
        if init == "psoft":
            assert torch.allclose(A @ A.T, torch.eye(rank), atol=1e-5), "psoft init: A must have orthonormal rows"
            W_res = W - s * B.double() @ A.double()
            assert float((W_res @ A.double().T).abs().max()) < 1e-5 * float(W.abs().max()), "W_res A^T != 0"
        energy = float(S[:rank].square().sum() / S.square().sum())
        assert abs(dec.manifest["targets"][name]["energy"] - energy) < 1e-6


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_psoft_from_stored_factors_equals_peft(tmp_path, model_name, svd):
    """PEFT's own SVD (full, or lowrank with q=r, niter=10, seed 0) vs our stored factors: same function."""
    rank = 8
    opts = {"oversample": 0, "niter": 10} if svd == "lowrank" else {}
    dec = decompose(MODELS / model_name, tmp_path / "d", rank, svd=svd, alpha=16, plot=False, **opts)
    base = load_model(model_name)
    ours = load_model(model_name)
    layers = inject(ours, PsoftConfig(rank=rank, alpha=16), factors=dec.factors())
    cfg = PeftPsoftConfig(
        r=rank, psoft_alpha=16, target_modules="all-linear", psoft_svd=svd, psoft_svd_lowrank_niter=10
    )
    theirs = get_peft_model(peft_copy(base), cfg).eval()
    randomize(layers)
    copy_into_peft(layers, theirs)
    inputs = model_inputs(model_name)
    err = rel_err(outputs(ours, inputs), outputs(theirs, inputs))
    assert err <= 1e-5, f"{model_name} {svd}: stored-factor PSOFT vs PEFT PSOFT rel err {err:.2e} > 1e-5"


def test_manifest_records_hashes_and_settings(tmp_path):
    dec = decompose(MODELS / "qwen2", tmp_path / "d", 4, targets=["q_proj", "v_proj"], seed=3)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["rank"] == 4 and m["alpha"] == 4.0 and m["seed"] == 3 and m["svd"] == "exact"
    assert set(m["versions"]) >= {"torch", "transformers", "psoft_export"}
    assert sorted(m["kinds"]) == ["self_attn.q_proj", "self_attn.v_proj"]
    source = ModelSource(MODELS / "qwen2")
    for name, rec in m["targets"].items():
        assert rec["sha256"] == sha256_of(source.tensor(rec["key"]))
    png = (tmp_path / "d" / "spectra.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    dec.check_source(MODELS / "qwen2")


def test_mismatched_model_is_refused(tmp_path):
    dec = decompose(MODELS / "llama", tmp_path / "d", 4, plot=False)
    other = tmp_path / "other"
    shutil.copytree(MODELS / "llama", other)
    sd = load_file(other / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserInputError, match="computed from other weights.*model.layers.1.mlp.up_proj.weight differs"):
        dec.check_source(other)


def test_sharded_model_gives_same_factors(tmp_path):
    model = load_model("llama")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    a = decompose(MODELS / "llama", tmp_path / "a", 8, svd="full", plot=False).factors()
    b = decompose(sharded, tmp_path / "b", 8, svd="full", plot=False).factors()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name


def run_cli(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def assert_clean_failure(tmp_path, code, output, pattern):
    lines = [l for l in output.splitlines() if l.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists(), "output directory left behind"
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary directory left behind"


def write_model(tmp_path: Path, mutate) -> Path:
    d = tmp_path / "model"
    shutil.copytree(MODELS / "llama", d)
    sd = load_file(d / "model.safetensors")
    mutate(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_bad_inputs_exit_2_and_leave_nothing(tmp_path):
    out = str(tmp_path / "out")
    llama = str(MODELS / "llama")
    cases = [
        ((str(tmp_path / "missing"), "-o", out, "--rank", "4"), "does not exist"),
        ((llama, "-o", out, "--rank", "0"), "--rank must be a positive integer"),
        ((llama, "-o", out, "--rank", "33"), "rank 33 is invalid for model.layers.0.self_attn.k_proj (shape 32x64)"),
        ((llama, "-o", out, "--rank", "4", "--targets", "query,key"), "no module matched targets query,key"),
        ((str(tmp_path), "-o", out, "--rank", "4"), "has no config.json"),
    ]
    for args, pattern in cases:
        assert_clean_failure(tmp_path, *run_cli("decompose", *args), pattern)


def test_non_float_and_corrupt_weights(tmp_path):
    def to_int(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)

    d = write_model(tmp_path, to_int)
    code, output = run_cli("decompose", str(d), "-o", str(tmp_path / "out"), "--rank", "4")
    assert_clean_failure(tmp_path, code, output, "has dtype I8, not floating point")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, output = run_cli("decompose", str(d), "-o", str(tmp_path / "out"), "--rank", "4")
    assert_clean_failure(tmp_path, code, output, "cannot read")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    code, output = run_cli("decompose", str(d), "-o", str(tmp_path / "out"), "--rank", "4")
    assert_clean_failure(tmp_path, code, output, "only pickled weights")


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, output = run_cli("decompose", str(MODELS / "gpt2"), "-o", str(tmp_path / "out"), "--rank", "4")
    assert code == 2 and "already exists" in output
    assert (tmp_path / "out" / "keep.txt").exists()
    code, output = run_cli("decompose", str(MODELS / "gpt2"), "-o", str(tmp_path / "out"), "--rank", "4", "--overwrite")
    assert code == 2 and "was not written by psoft-export" in output, "a directory we did not write is never replaced"
    assert (tmp_path / "out" / "keep.txt").exists()
    (tmp_path / "out" / ".psoft-export").write_text("{}")  # as if an earlier psoft-export run had written it
    code, output = run_cli(
        "decompose", str(MODELS / "gpt2"), "-o", str(tmp_path / "out"), "--rank", "4", "--overwrite", "--json"
    )
    assert code == 0, output
    summary = json.loads(output)
    assert summary["targets"] == 8 and summary["rank"] == 4
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert Decomposition.load(tmp_path / "out").targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "shape,transposed", [((300, 40), False), ((40, 300), False), ((300, 40), True), ((64, 64), True)]
)
def test_weight_streamed_from_its_file_gives_the_same_subspace(tmp_path, dtype, shape, transposed):
    """decompose reads each weight a slab at a time from its file (checkpoint.StoredMatrix), never whole. Against
    the same weight loaded as a tensor: the same hash, finiteness and norm, and the same subspace (angle 1e-7 rad,
    spectrum 1e-6). Bug caught: a transposed read of a wide or fan-in-fan-out weight that mixes rows and columns."""
    from psoft_export import subspace as sub_mod
    from psoft_export.subspace import gram_subspace

    g = torch.Generator().manual_seed(3)
    W = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)
    W = W.to(dtype)
    (tmp_path / "config.json").write_text("{}")
    save_file({"pad": torch.zeros(3, dtype=torch.int8), "w": W.contiguous()}, tmp_path / "model.safetensors")
    stored = ModelSource(tmp_path).matrix("w")
    digest, finite, frob2 = stored.stats()
    assert digest == sha256_of(W) and finite
    assert frob2 == pytest.approx(float(W.double().square().sum()), rel=1e-12)
    view, dense = (stored.T, W.T) if transposed else (stored, W)
    assert torch.equal(view.load(), dense.contiguous())
    rank = 8
    from psoft_export import stored as ck

    old = sub_mod.SLAB_BYTES, ck.BAND_BYTES
    sub_mod.SLAB_BYTES = ck.BAND_BYTES = 4096  # several bands even at this size
    try:
        a, b = gram_subspace(view, rank), gram_subspace(dense, rank)
    finally:
        sub_mod.SLAB_BYTES, ck.BAND_BYTES = old
    assert largest_principal_angle(a.U.double(), b.U.double()) < 1e-7
    assert largest_principal_angle(a.Vh.T.double(), b.Vh.T.double()) < 1e-7
    torch.testing.assert_close(a.S, b.S, rtol=1e-6, atol=0)


def flat_at_rank(shape: tuple[int, int], rank: int, seed: int) -> torch.Tensor:
    """``Q1 diag(s) Q2^T`` in float32 with a steep head (s_1 / s_r = 30) and s_r / s_{r+1} = 1.002: a float32
    eigendecomposition of its Gram matrix is 1e-4..5e-3 rad off (eps32 * s_1^2 / (s_r^2 - s_{r+1}^2))."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = torch.cat([torch.logspace(1.5, 0.001, rank, dtype=torch.float64), torch.linspace(1, 0.1, k - rank).double()])
    return ((Q1 * s) @ Q2.T).float()


@pytest.mark.parametrize(
    "kind,shape,dtype,tol",
    [
        ("gaussian", (1200, 300), torch.float32, 1e-6),
        ("gaussian", (300, 1200), torch.float32, 1e-6),
        ("gaussian", (800, 200), torch.bfloat16, 1e-6),
        ("gaussian", (400, 400), torch.float64, 1e-11),
        ("steep-then-flat", (1200, 300), torch.float32, 1e-6),
        ("steep-then-flat", (300, 1200), torch.float32, 1e-6),
    ],
)
def test_exact_subspace_equals_a_float64_svd_on_a_flat_spectrum(kind, shape, dtype, tol):
    """The default (``exact``) path against a float64 SVD of the stored weight, on spectra flat at rank r like
    real weights' (s_r / s_{r+1} < 1.01; a Gaussian weight, and a steep head that makes the float32 eigenvectors
    far off): both singular subspaces within ``tol`` rad (the float32 storage floor, ~3e-8 measured; the bar is
    1e-5), every singular value, descending, and a computed bound <= 1e-7 rad. Bugs caught: the in-place,
    ascending-order eigendecomposition read from the wrong end (the gap taken against the smallest eigenvalue,
    which stops the refinement at the float32 basis; an unflipped tail spectrum)."""
    from psoft_export.subspace import gram_subspace

    rank = 16
    if kind == "gaussian":
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    else:
        W = flat_at_rank(shape, rank, seed=5).to(dtype)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    assert S[rank - 1] / S[rank] < 1.01, "the spectrum should be flat at the top (test would be vacuous)"
    M = W.double() if shape[0] >= shape[1] else W.double().T
    f32 = torch.linalg.eigh((M.T @ M).float()).eigenvectors[:, -rank:].T
    right = Vh if shape[0] >= shape[1] else U.T
    assert largest_principal_angle(f32, right[:rank]) > tol, "a float32 eigh alone would pass (test vacuous)"
    sub = gram_subspace(W, rank)
    assert largest_principal_angle(sub.Vh, Vh[:rank]) <= tol
    assert largest_principal_angle(sub.U.T, U[:, :rank].T) <= tol
    assert sub.spectrum.shape == S.shape and bool((sub.spectrum[:-1] >= sub.spectrum[1:]).all())
    # The tail comes from the float32 Gram matrix's eigenvalues: each within ~eps32 * s_1^2 (Weyl).
    torch.testing.assert_close(sub.spectrum.double().square(), S.square(), rtol=0, atol=1e-5 * float(S[0]) ** 2)
    torch.testing.assert_close(sub.S.double(), S[:rank], rtol=1e-6, atol=0)
    assert sub.angle_bound is not None and sub.angle_bound <= 1e-7


def test_exact_subspace_of_an_ill_posed_gap_falls_back_to_float64():
    """s_r == s_{r+1}: no refinement can certify the subspace, so a float64 eigendecomposition decides. Its
    singular values and the well-posed top r - 1 directions are the float64 SVD's."""
    from psoft_export.subspace import gram_subspace

    g, rank = torch.Generator().manual_seed(6), 16
    Q1 = torch.linalg.qr(torch.randn(400, 100, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64)).Q
    s = torch.linspace(2, 1, 100, dtype=torch.float64)
    s[rank] = s[rank - 1]
    W = ((Q1 * s) @ Q2.T).float()
    sub = gram_subspace(W, rank)
    assert sub.angle_bound is None or sub.angle_bound > 1e-7, "the refinement should not have converged"
    torch.testing.assert_close(sub.spectrum.double(), s, rtol=1e-6, atol=0)
    assert largest_principal_angle(sub.Vh[: rank - 1], Q2.T[: rank - 1]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_in_place_overwrites_the_gram_matrix(dtype):
    """The exact path's peak memory is this eigendecomposition: LAPACK writes the eigenvectors over the Gram
    matrix (3 n^2 with syevd's workspace, against torch.linalg.eigh's 4 n^2: a copy of its input first). Same
    eigenpairs as torch.linalg.eigh to the dtype's precision."""
    from psoft_export.subspace import eigh_in_place

    X = torch.randn(300, 120, generator=torch.Generator().manual_seed(7), dtype=dtype)
    G = X.T @ X
    ref_lam, ref_V = torch.linalg.eigh(G)
    G0, ptr = G.clone(), G.data_ptr()
    lam, V = eigh_in_place(G)
    assert V.data_ptr() == ptr and V.dtype == dtype, "the eigenvectors should take the Gram matrix's memory"
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(lam, ref_lam, rtol=0, atol=50 * eps * float(ref_lam[-1]))
    assert bool((lam[1:] >= lam[:-1]).all())
    residual = (G0.double() @ V.double() - V.double() * lam.double()).norm() / float(ref_lam[-1])
    assert residual <= 50 * eps
    torch.testing.assert_close(V.double().T @ V.double(), torch.eye(120, dtype=torch.float64), rtol=0, atol=50 * eps)


def test_streamed_stats_stay_within_a_slab_and_find_non_finite_values(tmp_path):
    """decompose's first pass over a weight (hash, finiteness, squared norm: StoredMatrix.stats) holds one slab
    plus float64 bands, not float64 copies of the slab: it was the exact path's peak (80 MiB at 16 MiB slabs,
    docs/benchmarks.md). A NaN or Inf anywhere (the last element too) is found."""
    from psoft_export import stored as st

    st.unmap_freed_tensors()  # what decompose does: big blocks are mapped fresh, so VmHWM sees them
    W = torch.randn(st.STREAM_BYTES // 4 // 1024, 1024, generator=torch.Generator().manual_seed(8))
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": W}, tmp_path / "model.safetensors")
    stored = ModelSource(tmp_path).matrix("w")

    def status(key: str) -> float:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
        return int(line.split()[1]) / 1024

    stored.stats()  # once first: torch's lazily started runtime (thread pools, kernels) is not the method's cost
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS:")
    digest, finite, frob2 = stored.stats()
    added = status("VmHWM:") - before
    assert digest == sha256_of(W) and finite
    assert frob2 == pytest.approx(float(W.double().square().sum()), rel=1e-12)
    bound = (st.STREAM_BYTES + 2 * st.BAND_BYTES) / 2**20 + 4  # the slab, a float64 band and isfinite's, slack
    assert added <= bound, f"stats added {added:.1f} MiB > {bound:.0f} MiB for a {st.STREAM_BYTES >> 20} MiB slab"
    for index, value in (((-1, -1), float("nan")), ((W.shape[0] // 2, 3), float("inf"))):
        bad = W.clone()
        bad[index] = value
        save_file({"w": bad}, tmp_path / "model.safetensors")
        assert not ModelSource(tmp_path).matrix("w").stats()[1], f"{value} at {index} not found"


def _spectral_gram(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 Gram matrix ``Q diag(lam) Q^T`` with a clear gap after the top 8 (float64 ``Q``, ``lam``)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.cat([torch.linspace(10, 8, 8, dtype=torch.float64), torch.linspace(5, 0.1, n - 8).double()])
    return ((Q * lam) @ Q.T).float(), Q[:, lam.argsort(descending=True)]


def test_tridiagonal_basis_reduces_in_place_and_corrects_like_the_spectral_formula():
    """The CPU exact path's first basis (subspace._Tridiagonal): the Gram matrix reduced to tridiagonal form in its
    own memory (no n^2 copy for the reduction), every eigenvalue, the top eigenvectors, and the first-order
    correction ``sum_k v_k v_k^T R_j / (mu_j - lambda_k)`` over the other eigenvectors computed by shifted
    tridiagonal solves, against the same sum from a float64 eigendecomposition (float32 accuracy: 1e-4 relative).
    Bugs caught: the reflectors applied as Q^T instead of Q, a flipped shift sign, the top block left in."""
    from psoft_export.subspace import _Tridiagonal

    n, r = 120, 8
    G, _ = _spectral_gram(n, seed=11)
    lam64, V64 = torch.linalg.eigh(G.double())
    before = G.clone()
    basis = _Tridiagonal(G, r)
    assert not torch.equal(G, before), "ssytrd should have overwritten the Gram matrix (no copy)"
    torch.testing.assert_close(basis.lam, lam64, rtol=0, atol=1e-5 * float(lam64[-1]))
    top64 = V64[:, -r:].flip(1)
    assert largest_principal_angle(basis.top.T, top64.T) < 1e-5
    R = torch.randn(n, r, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    mu = lam64[-r:].flip(0)
    Vc, lc = V64[:, :-r], lam64[:-r]
    expected = Vc @ ((Vc.T @ R) / (mu[None, :] - lc[:, None]))
    got = basis.correct(R, mu)
    assert float((got - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_banded_products_match_float64(dtype, transposed, tmp_path):
    """The products behind the exact path (stored.BandedMatrix, in SciPy's BLAS) for a weight in its file and in
    memory: ``M X``, ``M^T M X`` in float64 to 1e-12, and the Gram matrix's triangle LAPACK reads (the row-major
    upper one) to float32 accuracy. Bugs caught: a band multiplied untransposed (a Fortran/C order mix-up), the
    lower triangle filled where the eigensolver reads the upper one, bands of a transposed view misaligned."""
    from psoft_export import stored as st
    from psoft_export.stored import TensorMatrix

    W = torch.randn(70, 30, generator=torch.Generator().manual_seed(13)).to(dtype)
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": W.contiguous()}, tmp_path / "model.safetensors")
    X = torch.randn(30 if not transposed else 70, 4, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    old = st.BAND_BYTES, st.STREAM_BYTES
    st.BAND_BYTES = st.STREAM_BYTES = 2048  # several bands at this size
    try:
        for M in (ModelSource(tmp_path).matrix("w"), TensorMatrix(W)):
            M = M.T if transposed else M
            D = W.double().T if transposed else W.double()
            torch.testing.assert_close(M.apply(X), D @ X, rtol=1e-12, atol=1e-12)
            P, Z = M.gram_apply(X)
            torch.testing.assert_close(P, D @ X, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(Z, D.T @ (D @ X), rtol=1e-12, atol=1e-11)
            for gram_dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
                G = M.gram(gram_dtype)
                ref = (D.T @ D).triu()
                torch.testing.assert_close(G.double().triu(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    finally:
        st.BAND_BYTES, st.STREAM_BYTES = old
