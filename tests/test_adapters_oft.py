"""OFTv2 layers against PEFT 0.21's OFTConfig (the oracle) and float64 recomputes."""

from __future__ import annotations

import pytest
import torch
from peft import OFTConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from psoft_export.adapters import OftConfig, OftLinear, inject, merge_and_unload
from psoft_export.adapters.cayley import orthogonality_error
from psoft_export.errors import UserInputError
from tests.conftest import ALL_MODELS, load_model, model_inputs, outputs, peft_copy, rel_err
from tests.test_adapters_psoft import assert_gradcheck

BLOCK = 16
TOL = 1e-5  # float32, relative to the output scale


def randomize(layers: dict[str, OftLinear], seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.q.normal_(0.0, std, generator=g)


def to_peft(layers, peft_model, cayley: str, negate_exact: bool = True) -> None:
    """Copy our generators into PEFT's ``oft_R``. PEFT's exact mode is (I-Q)(I+Q)^-1 = cayley(-Q): negate."""
    sign = -1.0 if cayley == "exact" and negate_exact else 1.0
    with torch.no_grad():
        for name, layer in layers.items():
            peft_model.base_model.model.get_submodule(name).oft_R["default"].weight.copy_(sign * layer.q)


def setup(model_name: str, cayley: str, share: bool, terms: int = 5):
    base = load_model(model_name)
    ours = load_model(model_name)
    layers = inject(ours, OftConfig(block_size=BLOCK, cayley=cayley, neumann_terms=terms, block_share=share))
    cfg = OFTConfig(
        r=0,
        oft_block_size=BLOCK,
        target_modules="all-linear",
        block_share=share,
        use_cayley_neumann=cayley == "neumann",
        num_cayley_neumann_terms=terms,
    )
    theirs = get_peft_model(peft_copy(base), cfg).eval()
    randomize(layers)
    return base, ours, layers, theirs


@pytest.mark.parametrize("model_name", ALL_MODELS)
@pytest.mark.parametrize("cayley", ["exact", "neumann"])
@pytest.mark.parametrize("share", [False, True])
def test_matches_peft_outputs_and_merged_weights(model_name, cayley, share):
    base, ours, layers, theirs = setup(model_name, cayley, share)
    peft_names = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "oft_R")}
    assert set(layers) == peft_names, "all-linear selects different modules than PEFT"
    to_peft(layers, theirs, cayley)
    inputs = model_inputs(model_name)
    y_ours, y_peft = outputs(ours, inputs), outputs(theirs, inputs)
    assert rel_err(y_peft, outputs(base, inputs)) > 1e-3, "the adapter should change the output"
    err = rel_err(y_ours, y_peft)
    assert err <= TOL, f"{model_name} OFT {cayley} share={share}: output rel err vs PEFT {err:.2e} > {TOL}"

    merged_ours = merge_and_unload(ours).state_dict()
    merged_peft = theirs.merge_and_unload().state_dict()
    for name in layers:
        key = f"{name}.weight"
        w_ours = merged_ours[key].T if model_name == "gpt2" else merged_ours[key]
        err = rel_err(w_ours, merged_peft[key])
        assert err <= TOL, f"{model_name} {key}: merged weight rel err vs PEFT {err:.2e} > {TOL}"


def test_exact_mode_sign_trap_is_real():
    """Copying PEFT's exact-mode generator without negation gives R^T: a visibly different model."""
    _, ours, layers, theirs = setup("llama", "exact", False)
    to_peft(layers, theirs, "exact", negate_exact=False)
    inputs = model_inputs("llama")
    assert rel_err(outputs(ours, inputs), outputs(theirs, inputs)) > 1e-3


@pytest.mark.parametrize("model_name", ALL_MODELS)
@pytest.mark.parametrize("share", [False, True])
def test_init_leaves_outputs_exactly_unchanged(model_name, share):
    base = load_model(model_name)
    ours = load_model(model_name)
    inject(ours, OftConfig(block_size=BLOCK, block_share=share))
    inputs = model_inputs(model_name)
    assert torch.equal(outputs(ours, inputs), outputs(base, inputs)), "output changed at init (must be 0 diff)"


def make_layer(conv1d: bool, dtype=torch.float32, out_f=12, in_f=16, block=4, **cfg) -> OftLinear:
    torch.manual_seed(0)
    base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.normal_(0, 0.5)
    layer = OftLinear(base.to(dtype), OftConfig(block_size=block, **cfg))
    randomize({"l": layer}, std=0.3)
    return layer


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("share", [False, True])
def test_forward_is_input_rotation_then_base(conv1d, share):
    layer = make_layer(conv1d, block_share=share, cayley="exact")
    x = torch.randn(2, 3, 16)
    R = layer.rotation().double()
    assert R.shape == (16, 16) and float(orthogonality_error(R)) < 1e-6
    W = layer.base_layer.weight.double()
    W = W.T if conv1d else W
    ref = (x.double() @ R) @ W.T + layer.base_layer.bias.double()
    err = rel_err(layer(x), ref)
    assert err < 1e-6, f"forward vs float64 (x R) W^T: rel err {err:.2e}"
    err = rel_err(layer.merged_weight(), W @ R.T)
    assert err < 1e-6, f"merged weight vs float64 W R^T: rel err {err:.2e}"


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("cayley,share", [("exact", False), ("neumann", True)])
def test_gradcheck_float64(conv1d, cayley, share):
    assert_gradcheck(make_layer(conv1d, torch.float64, cayley=cayley, block_share=share), 16)


@pytest.mark.parametrize("cayley", ["exact", "neumann"])
def test_merge_unmerge_round_trip(cayley):
    layer = make_layer(False, cayley=cayley, neumann_terms=5)
    x = torch.randn(4, 16)
    W0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert rel_err(layer(x), y) < 1e-6
    layer.unmerge()
    assert rel_err(layer.base_layer.weight, W0) < 1e-6, (
        "unmerge did not restore the weight (Neumann R is not orthogonal: inverse needed)"
    )


def test_geometry_preserved():
    """OFT keeps the row Gram matrix: W R^T (W R^T)^T = W W^T for orthogonal R (float64)."""
    layer = make_layer(False, torch.float64, cayley="exact")
    W = layer.base_layer.weight.detach()
    merged = layer.merged_weight()
    assert torch.allclose(merged @ merged.T, W @ W.T, atol=1e-12)


def test_block_size_that_does_not_divide_names_layer_and_fits():
    with pytest.raises(UserInputError, match=r"block size 5 does not divide in_features=16 of layer: try 2, 4, 8"):
        OftLinear(nn.Linear(16, 8), OftConfig(block_size=5))
    model = load_model("llama")
    with pytest.raises(
        UserInputError,
        match=r"block size 24 does not divide the input size of 14 target layer\(s\): "
        r"model\.layers\.0\.self_attn\.q_proj \(in=64\), .* and 11 more; block sizes that fit every "
        r"target: 4, 8, 16, 32",
    ):
        inject(model, OftConfig(block_size=24))


def test_bad_config_values():
    with pytest.raises(UserInputError, match="block_size must be an integer >= 2"):
        OftConfig(block_size=1)
    with pytest.raises(UserInputError, match="neumann_eps must be in"):
        OftConfig(neumann_eps=1.5)


# ------------------------------------------------------------------------------- rotations built by parent module


def _counting_orthogonal(monkeypatch) -> list:
    """Count the Cayley transforms the OFT layers build (one per group or ungrouped layer per forward)."""
    import psoft_export.adapters.oft as oft_mod

    calls, real = [], oft_mod.cay.orthogonal

    def counted(params, *args):
        calls.append(params.shape[0])
        return real(params, *args)

    monkeypatch.setattr(oft_mod.cay, "orthogonal", counted)
    return calls


def test_rotation_groups_build_once_per_parent_and_train_as_per_layer(monkeypatch):
    """Layers under one parent (attention, MLP) build their blocks in one batched transform, and a training
    sequence that stresses reuse (two micro-batches, AdamW steps, a layer called alone, parameters changed in
    place, a no-grad forward, a deep copy) gives the per-layer outputs, gradients and parameters to 1e-6."""
    import copy

    from psoft_export.adapters.oft import group_rotations

    grouped = load_model("llama")
    layers = inject(grouped, OftConfig(block_size=BLOCK))
    randomize(layers, std=0.05)
    plain = copy.deepcopy(grouped)
    per_layer = {n: plain.get_submodule(n) for n in layers}
    for layer in per_layer.values():
        layer._group = None
    groups = {id(layer._group) for layer in layers.values()}
    assert None not in {layer._group for layer in layers.values()} and len(groups) < len(layers) / 2
    assert group_rotations(copy.deepcopy(grouped)) == len(groups)

    inputs = model_inputs("llama")
    first, second = {k: v[:1] for k, v in inputs.items()}, {k: v[1:] for k, v in inputs.items()}
    models = {"grouped": grouped, "plain": plain}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.02) for k, m in models.items()}
    calls = _counting_orthogonal(monkeypatch)
    name_a, name_b = list(layers)[0], list(layers)[1]  # siblings: q_proj and k_proj of layer 0
    x = torch.randn(3, layers[name_a].in_features)
    record: dict[str, list] = {k: [] for k in models}
    for key, model in models.items():
        calls.clear()
        for step in range(2):
            for batch in (first, second):  # two micro-batches before each step: a backward frees the graph
                out = model(**batch, labels=batch["input_ids"])
                out.loss.backward()
                record[key].append(out.logits.detach())
            record[key].append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
            opts[key].step()
            opts[key].zero_grad()
            if step == 0:  # one member alone, then new parameters: its sibling must not reuse blocks of the old
                model.get_submodule(name_a)(x)  # (no backward: the blocks it left for its siblings stay alive)
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.add_(0.01)
                record[key].append(model.get_submodule(name_b)(x).detach())
        if key == "grouped":
            assert max(calls) > max(layer.q.shape[0] for layer in layers.values())  # batched: blocks of siblings
            grouped_calls = len(calls)
        with torch.no_grad():
            record[key].append(model(**inputs).logits)
        record[key].append(copy.deepcopy(model)(**inputs).logits.detach())
        record[key].extend(p.detach().clone() for p in model.parameters() if p.requires_grad)
    assert grouped_calls < len(calls) / 2, (grouped_calls, len(calls))
    for got, want in zip(record["grouped"], record["plain"], strict=True):
        assert rel_err(got, want) <= 1e-6, rel_err(got, want)
