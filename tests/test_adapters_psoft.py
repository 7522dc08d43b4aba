"""PSOFT layers against PEFT 0.21's PsoftConfig (the oracle), float64 recomputes and the paper's invariants."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import PsoftConfig as PeftPsoftConfig
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from psoft_export.adapters import PsoftConfig, PsoftLinear, inject, merge_and_unload
from psoft_export.adapters.cayley import orthogonality_error
from psoft_export.errors import UserInputError
from tests.conftest import ALL_MODELS, load_model, model_inputs, outputs, peft_copy, rel_err

RANK = 8
TOL = 1e-5  # float32, relative to the output scale (max |y|)

# (cayley, vectors, init): every mode the issue names, crossed.
MODES = list(itertools.product(["exact", "neumann"], ["on", "off"], ["psoft", "pissa"]))


def randomize(layers: dict[str, PsoftLinear], seed: int = 0) -> None:
    """Trained-looking adapter parameters: Q ~ N(0, 0.1), vectors 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.q.normal_(0.0, 0.1, generator=g)
            for vec in (layer.vector_a, layer.vector_b):
                if vec is not None:
                    vec.add_(0.1 * torch.randn(vec.shape, generator=g))


def peft_psoft(model, cayley: str, vectors: str, init: str, terms: int, eps=None):
    cfg = PeftPsoftConfig(
        r=RANK,
        psoft_alpha=16,
        target_modules="all-linear",
        ab_svd_init=f"{init}_init",
        use_cayley_neumann=cayley == "neumann",
        num_cayley_neumann_terms=terms,
        cayley_neumann_eps=eps,
        psoft_mag_a=vectors == "on",
        psoft_mag_b=vectors == "on",
    )
    return get_peft_model(peft_copy(model), cfg).eval()


def copy_into_peft(layers: dict[str, PsoftLinear], peft_model) -> None:
    with torch.no_grad():
        for name, layer in layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            orth = target.psoft_R["default"]
            orth.weight.copy_(layer.q)
            for attr in ("vector_a", "vector_b"):
                if getattr(layer, attr) is not None:
                    getattr(orth, attr).copy_(getattr(layer, attr))


@pytest.mark.parametrize("model_name", ALL_MODELS)
@pytest.mark.parametrize("cayley,vectors,init", MODES)
def test_matches_peft_outputs_and_merged_weights(model_name, cayley, vectors, init):
    base = load_model(model_name)
    inputs = model_inputs(model_name)
    terms = 5  # PEFT's default count, odd on purpose: interop must match PEFT's series, not ours
    config = PsoftConfig(
        rank=RANK,
        alpha=16,
        init=init,
        cayley=cayley,
        neumann_terms=terms,
        vector_a=vectors == "on",
        vector_b=vectors == "on",
    )
    ours = load_model(model_name)
    layers = inject(ours, config, "all-linear")
    theirs = peft_psoft(base, cayley, vectors, init, terms)

    peft_names = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "psoft_R")}
    assert set(layers) == peft_names, "all-linear selects different modules than PEFT"
    for name, layer in layers.items():
        target = theirs.base_model.model.get_submodule(name)
        A, B = target._psoft_A_cache["default"], target._psoft_B_cache["default"]
        assert torch.allclose(layer.A, A, atol=1e-6) and torch.allclose(layer.B, B, rtol=1e-5, atol=1e-6), (
            f"{name}: principal subspace differs from PEFT's SVD"
        )

    randomize(layers)
    copy_into_peft(layers, theirs)
    y_ours, y_peft = outputs(ours, inputs), outputs(theirs, inputs)
    y_base = outputs(base, inputs)
    assert rel_err(y_peft, y_base) > 1e-3, "the adapter should change the output (test would be vacuous)"
    err = rel_err(y_ours, y_peft)
    assert err <= TOL, f"{model_name} {cayley}/{vectors}/{init}: output rel err vs PEFT {err:.2e} > {TOL}"

    merged_ours = merge_and_unload(ours).state_dict()
    merged_peft = theirs.merge_and_unload().state_dict()
    for name in layers:
        key = f"{name}.weight"
        w_ours = merged_ours[key].T if model_name == "gpt2" else merged_ours[key]  # Conv1D stores W^T
        err = rel_err(w_ours, merged_peft[key])
        assert err <= TOL, f"{model_name} {key}: merged weight rel err vs PEFT {err:.2e} > {TOL}"


def test_neumann_eps_matches_peft():
    base = load_model("llama")
    config = PsoftConfig(rank=RANK, alpha=16, cayley="neumann", neumann_terms=5, neumann_eps=0.5)
    ours = load_model("llama")
    layers = inject(ours, config, ["q_proj", "down_proj"])
    with torch.no_grad():
        for layer in layers.values():
            layer.q.normal_(0.0, 1.0)  # ||Q||_F well above eps: the clip is active
    cfg = PeftPsoftConfig(
        r=RANK,
        psoft_alpha=16,
        target_modules=["q_proj", "down_proj"],
        use_cayley_neumann=True,
        num_cayley_neumann_terms=5,
        cayley_neumann_eps=0.5,
    )
    theirs = get_peft_model(peft_copy(base), cfg).eval()
    copy_into_peft(layers, theirs)
    inputs = model_inputs("llama")
    err = rel_err(outputs(ours, inputs), outputs(theirs, inputs))
    assert err <= TOL, f"neumann_eps=0.5: rel err vs PEFT {err:.2e} > {TOL}"


@pytest.mark.parametrize("model_name", ALL_MODELS)
@pytest.mark.parametrize("cayley", ["exact", "neumann"])
def test_init_leaves_outputs_exactly_unchanged(model_name, cayley):
    base = load_model(model_name)
    ours = load_model(model_name)
    inject(ours, PsoftConfig(rank=RANK, cayley=cayley), "all-linear")
    inputs = model_inputs(model_name)
    assert torch.equal(outputs(ours, inputs), outputs(base, inputs)), "output changed at init (must be 0 diff)"


def make_layer(conv1d: bool, dtype=torch.float32, out_f=24, in_f=16, seed=0, **cfg) -> PsoftLinear:
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.normal_(0, 0.5)
        if conv1d:
            base.bias.normal_(0, 0.1)
    base = base.to(dtype)
    layer = PsoftLinear(base, PsoftConfig(**{"rank": 6, **cfg}))
    randomize({"l": layer}, seed)
    return layer


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("cayley", ["exact", "neumann"])
def test_forward_matches_float64_recompute(conv1d, cayley):
    layer = make_layer(conv1d, cayley=cayley, alpha=3.0)
    x = torch.randn(5, 16)
    W = layer.base_layer.weight.double()
    W = W.T if conv1d else W
    A, B, R = layer.A.double(), layer.B.double(), layer.rotation().double()
    s = 3.0 / 6
    W_eff = W + s * B @ (R - torch.eye(6, dtype=torch.float64)) @ A
    ref = x.double() @ W_eff.T + layer.base_layer.bias.double()
    err = rel_err(layer(x), ref)
    assert err < 1e-6, f"forward vs float64 W + sB(R-I)A: rel err {err:.2e} >= 1e-6"


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("cayley,vectors", [("exact", True), ("neumann", False)])
def test_gradcheck_float64(conv1d, cayley, vectors):
    layer = make_layer(conv1d, torch.float64, cayley=cayley, vector_a=vectors, vector_b=vectors)
    assert_gradcheck(layer, 16)


def assert_gradcheck(layer: nn.Module, in_features: int) -> None:
    """gradcheck of the layer's output w.r.t. its input and every adapter parameter (base frozen), float64."""
    names = [n for n, _ in layer.named_parameters() if not n.startswith("base_layer")]
    params = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    x = torch.randn(3, in_features, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params)), f"gradcheck failed for {type(layer).__name__}"


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_unmerge_round_trip(conv1d):
    layer = make_layer(conv1d)
    x = torch.randn(4, 16)
    W0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    err = rel_err(layer(x), y)
    assert err < 1e-6, f"merged forward vs adapter forward: rel err {err:.2e}"
    layer.unmerge()
    assert rel_err(layer.base_layer.weight, W0) < 1e-6, "unmerge did not restore the base weight"


def test_lora_form_is_exact():
    layer = make_layer(False, torch.float64)
    lora_A, lora_B = layer.lora_factors()
    assert lora_A.shape == (6, 16) and lora_B.shape == (24, 6)
    delta = layer.scaling * lora_B @ lora_A
    assert torch.allclose(delta, layer.delta_weight(), atol=1e-13), "s * lora_B @ lora_A != delta weight"


def row_gram(W: torch.Tensor) -> torch.Tensor:
    return W @ W.T


def test_geometry_preserved_in_strict_mode():
    """psoft init, no vectors, exact Cayley: W' W'^T == W W^T (docs/adapters.md, geometry invariant), in float64."""
    torch.manual_seed(1)
    base = nn.Linear(32, 20).double()
    layer = PsoftLinear(base, PsoftConfig(rank=8, vector_a=False, vector_b=False, cayley="exact"))
    with torch.no_grad():
        layer.q.normal_(0, 0.5)
    assert float(orthogonality_error(layer.rotation())) < 1e-12
    W = base.weight.detach().clone()
    merged = W + layer.delta_weight().detach()
    drift = float((row_gram(merged) - row_gram(W)).abs().max() / row_gram(W).abs().max())
    assert drift < 1e-12, f"strict PSOFT changed the row Gram matrix by {drift:.2e} (float64, tol 1e-12)"


@pytest.mark.parametrize("variant", ["pissa", "vectors", "neumann5"])
def test_geometry_drift_is_measurable_outside_strict_mode(variant):
    torch.manual_seed(1)
    base = nn.Linear(32, 20).double()
    cfg = {"rank": 8, "vector_a": False, "vector_b": False}
    cfg.update(
        {
            "pissa": {"init": "pissa"},
            "vectors": {"vector_a": True, "vector_b": True},
            "neumann5": {"cayley": "neumann", "neumann_terms": 5},
        }[variant]
    )
    layer = PsoftLinear(base, PsoftConfig(**cfg))
    with torch.no_grad():
        layer.q.normal_(0, 0.5 if variant != "neumann5" else 0.05)
        for vec in (layer.vector_a, layer.vector_b):
            if vec is not None:
                vec.add_(0.2 * torch.randn(8, dtype=torch.float64))
    W = base.weight.detach().clone()
    merged = W + layer.delta_weight().detach()
    drift = float((row_gram(merged) - row_gram(W)).abs().max() / row_gram(W).abs().max())
    assert drift > 1e-8, f"{variant}: expected a measurable Gram drift, got {drift:.2e}"


def test_stored_factors_are_used_without_svd():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    A, B = torch.randn(4, 16), torch.randn(12, 4)
    layer = PsoftLinear(base, PsoftConfig(rank=4), factors=(A, B))
    assert torch.equal(layer.A, A) and torch.equal(layer.B, B)


def test_bad_inputs_raise_user_errors():
    base = nn.Linear(16, 12)
    with pytest.raises(UserInputError, match=r"rank 13 is invalid.*1 <= rank <= 12"):
        PsoftLinear(base, PsoftConfig(rank=13))
    with pytest.raises(UserInputError, match="expected A\\(4, 16\\) B\\(12, 4\\)"):
        PsoftLinear(base, PsoftConfig(rank=4), factors=(torch.randn(4, 15), torch.randn(12, 4)))
    with pytest.raises(UserInputError, match="cayley must be one of"):
        PsoftConfig(cayley="fast")
    with pytest.raises(UserInputError, match="rank must be a positive integer"):
        PsoftConfig(rank=0)
    with pytest.raises(UserInputError, match="nn.Linear or Conv1D"):
        PsoftLinear(nn.Embedding(10, 4), PsoftConfig(rank=2))


@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_merged_path_matches_per_token_path(conv1d):
    """psoft_export.adapters.fused: the merged (transient W + sBMA) and per-token formulations, and the unfused
    autograd reference, give the same outputs and gradients (x, base weight/bias, q, vectors) in float64."""
    layer = make_layer(conv1d, torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    w = torch.linspace(-1, 1, 2 * 5 * 24, dtype=torch.float64).view(2, 5, 24)
    results = {}
    for path in ("token", "merged", "autograd"):
        layer.zero_grad(set_to_none=True)
        layer.path = path
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        (y * w).sum().backward()
        results[path] = [y, xx.grad] + [p.grad for _, p in layer.named_parameters()]
    for path in ("merged", "autograd"):
        for a, b in zip(results["token"], results[path]):
            assert rel_err(a, b) < 1e-10, f"{path} vs token: rel err {rel_err(a, b):.2e} (float64, tol 1e-10)"


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("path", ["token", "merged"])
def test_fused_paths_gradcheck(conv1d, path):
    layer = make_layer(conv1d, torch.float64)
    layer.path = path
    assert_gradcheck(layer, 16)
