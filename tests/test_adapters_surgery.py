"""Target selection and injection: PEFT's target semantics, clear errors, a model untouched on failure."""

import pytest
import torch
from peft import PsoftConfig as PeftPsoftConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification

from psoft_export.adapters import (
    OftConfig,
    PsoftConfig,
    adapter_layers,
    adapter_parameters,
    inject,
    merge_and_unload,
    parse_targets,
    select_targets,
    unload,
)
from psoft_export.errors import UserInputError
from tests.conftest import MODELS, load_model, model_inputs, outputs, peft_copy


def peft_selection(model, targets):
    cfg = PeftPsoftConfig(r=4, target_modules=targets)
    pm = get_peft_model(peft_copy(model), cfg)
    return sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "psoft_R"))


@pytest.mark.parametrize(
    "model_name,targets",
    [
        ("llama", ["q_proj", "v_proj"]),
        ("llama", r".*layers\.1\..*(gate|up)_proj"),
        ("qwen2", ["o_proj", "mlp.down_proj"]),
        ("gpt2", ["c_attn"]),
        ("bert", ["query", "value"]),
        ("bert", "all-linear"),
    ],
)
def test_selection_matches_peft(model_name, targets):
    model = load_model(model_name)
    assert sorted(select_targets(model, targets)) == peft_selection(model, targets)


def test_all_linear_excludes_output_head_and_classifier():
    model = load_model("llama")
    names = select_targets(model, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7
    config = AutoConfig.from_pretrained(MODELS / "bert", num_labels=2)
    clf = AutoModelForSequenceClassification.from_config(config)
    names = select_targets(clf, "all-linear")
    assert not any(n.startswith("classifier") for n in names)
    assert "bert.pooler.dense" in names


def test_parse_targets_forms():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("ALL-LINEAR") == "all-linear"
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    with pytest.raises(UserInputError, match="not a valid regex"):
        parse_targets("(q_proj")
    with pytest.raises(UserInputError, match="--targets is empty"):
        parse_targets("  ")


def test_no_match_lists_linear_modules():
    model = load_model("llama")
    with pytest.raises(UserInputError) as info:
        select_targets(model, ["query"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "no module matched targets query" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in msg


def test_non_linear_target_is_explained():
    model = load_model("llama")
    with pytest.raises(UserInputError, match=r"matched model\.embed_tokens \(Embedding\): only nn\.Linear/Conv1D"):
        select_targets(model, ["embed_tokens"])


def test_failed_injection_leaves_model_untouched():
    model = load_model("llama")  # rank 65 fits no layer (hidden 64)
    with pytest.raises(UserInputError, match="rank 65 is invalid for model.layers.0.self_attn.q_proj"):
        inject(model, PsoftConfig(rank=65))
    assert not adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_missing_factors_and_double_injection():
    model = load_model("llama")
    with pytest.raises(UserInputError, match="no factors for 14 target"):
        inject(model, PsoftConfig(rank=4), factors={})
    inject(model, OftConfig(block_size=16), ["q_proj"])
    with pytest.raises(UserInputError, match="already has adapter layers"):
        inject(model, OftConfig(block_size=16), ["v_proj"])


def test_only_adapter_parameters_train():
    model = load_model("gpt2")
    layers = inject(model, PsoftConfig(rank=4), "all-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".q" in n or ".vector_" in n for n in trainable)
    assert len(adapter_parameters(model)) == 3 * len(layers)
    expected = sum(4 * 3 // 2 + 8 for _ in layers)  # r(r-1)/2 + two vectors of r
    assert sum(p.numel() for p in adapter_parameters(model).values()) == expected


def test_merge_and_unload_leaves_plain_model_with_same_function():
    model = load_model("qwen2")
    layers = inject(model, PsoftConfig(rank=4))
    with torch.no_grad():
        for layer in layers.values():
            layer.q.normal_(0, 0.2)
    inputs = model_inputs("qwen2")
    y = outputs(model, inputs)
    merged = merge_and_unload(model)
    assert not adapter_layers(merged)
    assert not any("base_layer" in k or ".A" in k for k in merged.state_dict())
    assert torch.allclose(outputs(merged, inputs), y, rtol=0, atol=1e-5 * y.abs().max())


def test_unload_restores_base():
    base = load_model("gpt2")
    model = load_model("gpt2")
    layers = inject(model, OftConfig(block_size=16))
    with torch.no_grad():
        for layer in layers.values():
            layer.q.normal_(0, 0.2)
            layer.merge()
    unload(model)
    inputs = model_inputs("gpt2")
    assert torch.allclose(outputs(model, inputs), outputs(base, inputs), atol=1e-5)
