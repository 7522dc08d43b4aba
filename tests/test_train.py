"""``psoft-export train``: learning on the fixtures, resume equivalence, divergence, and PEFT's format both ways.

Oracles: PEFT 0.21 (``PeftModel.from_pretrained`` on our directories; ``get_peft_model`` adapters read by us),
float32 on CPU, tolerance 1e-5 relative to the output scale.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import OFTConfig, PeftModel, get_peft_model
from peft import PsoftConfig as PeftPsoftConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from psoft_export import adapter_io
from psoft_export.adapters import adapter_layers
from psoft_export.errors import UserInputError
from psoft_export.train import TrainConfig, TrainingDiverged, train
from tests.conftest import MODELS, model_inputs, outputs, rel_err
from tests.golden import randomize

DATA = MODELS.parent / "data"
TOL = 1e-5
FAST = dict(seq_len=64, batch_size=8, log_every=5)


def mean_loss(history, sl):
    return sum(h["loss"] for h in history[sl]) / len(history[sl])


def run(tmp_path, model="llama", data="train.jsonl", **overrides):
    cfg = TrainConfig(**{**FAST, **overrides})
    out = tmp_path / f"adapter-{model}-{cfg.method}"
    history = []
    summary = train(MODELS / model, DATA / data, out, cfg, on_log=history.append)
    return out, summary, history


@pytest.mark.parametrize(
    "model,method,data,steps,lr,margin",
    [
        ("llama", "psoft", "train.jsonl", 24, 2e-2, 0.15),
        ("qwen2", "oft", "train.jsonl", 24, 2e-2, 0.08),
        ("gpt2", "psoft", "prompt_completion.jsonl", 24, 2e-2, 0.15),
        ("bert", "psoft", "classify.jsonl", 24, 1e-1, 0.05),
    ],
)
def test_loss_falls(tmp_path, model, method, data, steps, lr, margin):
    """The fixtures are untrained (uniform next-token loss ~ ln 1000); margins are about half the measured fall."""
    _, summary, history = run(
        tmp_path, model, data, method=method, steps=steps, lr=lr, rank=32, block_size=16, warmup=0.0
    )
    first, last = mean_loss(history, slice(0, 4)), mean_loss(history, slice(-4, None))
    assert first - last >= margin, (
        f"{model} {method} on {data}: mean loss of the first 4 steps {first:.4f}, last 4 {last:.4f}; "
        f"expected a fall of at least {margin} in {steps} steps"
    )


def test_adapter_directory_contents(tmp_path):
    out, summary, _ = run(tmp_path, steps=3, rank=8)
    names = {p.name for p in out.iterdir()}
    assert names == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "psoft_export.json",
        "psoft_export.safetensors",
        "decomposition",
        "train_log.jsonl",
        "loss.png",
        "checkpoints",
        ".psoft-export",
    }, names
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003.pt"], "the final state is kept"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3]
    assert log[-1]["orthogonality_error"] < 1e-5, "exact Cayley should stay orthogonal to float32 precision"
    keys = load_file(out / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and ".psoft_R." in k for k in keys)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Interrupt after step 4 (checkpoint at step 3), resume: losses and final adapter bit-identical."""
    opts = dict(steps=6, rank=8, lr=1e-2, save_every=3)
    ref_dir, _, ref_history = run(tmp_path / "ref", **opts)

    cfg = TrainConfig(**{**FAST, **opts})
    out = tmp_path / "broken" / "adapter"

    def stop_at_4(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(MODELS / "llama", DATA / "train.jsonl", out, cfg, on_log=stop_at_4)
    assert not (out / "adapter_config.json").exists(), "an interrupted run must not look finished"
    resumed = []
    train(MODELS / "llama", DATA / "train.jsonl", out, cfg, resume=True, on_log=resumed.append)
    assert [h["step"] for h in resumed] == [4, 5, 6]
    ref_losses = [h["loss"] for h in ref_history[3:]]
    assert [h["loss"] for h in resumed] == ref_losses, "resumed losses differ from the uninterrupted run (CPU, bitwise)"
    a, b = load_file(ref_dir / "psoft_export.safetensors"), load_file(out / "psoft_export.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted run"


def test_resume_refuses_other_options(tmp_path):
    out, _, _ = run(tmp_path, steps=2, rank=8, save_every=1)
    cfg = TrainConfig(**{**FAST, "steps": 4, "rank": 8, "save_every": 1, "lr": 1e-1})
    with pytest.raises(UserInputError, match="--lr differ"):
        train(MODELS / "llama", DATA / "train.jsonl", out, cfg, resume=True)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(MODELS / "llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    bad = tmp_path / "nan-llama"
    model.save_pretrained(bad)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (MODELS / "llama" / f).exists():
            (bad / f).write_bytes((MODELS / "llama" / f).read_bytes())
    cfg = TrainConfig(**{**FAST, "steps": 3, "rank": 8, "method": "oft", "block_size": 16})
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1, before any checkpoint") as info:
        train(bad, DATA / "train.jsonl", tmp_path / "out", cfg)
    assert "--resume" not in str(info.value), "never advise a resume that cannot work (issue 13.7)"


# ------------------------------------------------------------------------------------------- PEFT both ways


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Adapters written by us (3 steps, then parameters randomized so the test is not vacuous)."""
    made = {}
    root = tmp_path_factory.mktemp("trained")
    for model, method, cayley in [
        ("llama", "psoft", "exact"),
        ("qwen2", "psoft", "neumann"),
        ("llama", "oft", "exact"),
        ("qwen2", "oft", "neumann"),
    ]:
        cfg = TrainConfig(**{**FAST, "steps": 2, "rank": 16, "block_size": 16, "method": method, "cayley": cayley})
        out = root / f"{model}-{method}-{cayley}"
        train(MODELS / model, DATA / "train.jsonl", out, cfg)
        base = AutoModelForCausalLM.from_pretrained(MODELS / model).eval()
        adapter_io.load_adapter(base, out, MODELS / model)
        randomize(base)
        adapter_io.save_adapter(out, base, cfg.method_config(), base_model=str(MODELS / model))
        made[(model, method, cayley)] = (out, base)
    return made


@pytest.mark.parametrize(
    "key",
    [
        ("llama", "psoft", "exact"),
        ("qwen2", "psoft", "neumann"),
        ("llama", "oft", "exact"),
        ("qwen2", "oft", "neumann"),
    ],
)
def test_peft_loads_our_adapter_with_our_outputs(trained, key):
    out, ours = trained[key]
    model = key[0]
    inputs = model_inputs(model)
    base = AutoModelForCausalLM.from_pretrained(MODELS / model).eval()
    y_base = outputs(base, inputs)
    theirs = PeftModel.from_pretrained(base, out).eval()
    y_ours, y_peft = outputs(ours, inputs), outputs(theirs, inputs)
    assert rel_err(y_ours, y_base) > 1e-3, "the adapter should change the output (test would be vacuous)"
    err = rel_err(y_peft, y_ours)
    assert err <= TOL, f"{key}: PEFT's load of our adapter differs from ours by {err:.2e} > {TOL}"


def test_sign_alignment_is_what_makes_peft_agree(trained):
    """Without the basis change PEFT's recomputed subspace would give another function for some layers."""
    out, ours = trained[("llama", "psoft", "exact")]
    flips = 0
    for layer in adapter_layers(ours).values():
        O, _, _ = adapter_io.peft_basis_change(layer)
        flips += int((O.diagonal() < 0).sum())
        assert float((O.abs() - torch.eye(O.shape[0], dtype=O.dtype)).abs().max()) < 1e-3
    assert flips > 0, "no sign flip between our lowrank subspace and PEFT's full SVD: the test would be vacuous"


@pytest.mark.parametrize(
    "model,kind",
    [("llama", "psoft-exact"), ("qwen2", "psoft-neumann"), ("llama", "oft-exact"), ("qwen2", "oft-neumann")],
)
def test_we_load_peft_adapters(tmp_path, model, kind):
    method, cayley = kind.split("-")
    base = AutoModelForCausalLM.from_pretrained(MODELS / model).eval()
    if method == "psoft":
        cfg = PeftPsoftConfig(r=8, target_modules="all-linear", use_cayley_neumann=cayley == "neumann")
        key = "psoft_R"
    else:
        cfg = OFTConfig(r=0, oft_block_size=16, target_modules="all-linear", use_cayley_neumann=cayley == "neumann")
        key = "oft_R"
    theirs = get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if key in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "peft")
    inputs = model_inputs(model)
    ours = AutoModelForCausalLM.from_pretrained(MODELS / model).eval()
    adapter_io.load_adapter(ours, tmp_path / "peft", MODELS / model)
    err = rel_err(outputs(ours, inputs), outputs(theirs, inputs))
    assert err <= TOL, f"{model} {kind}: our load of a PEFT adapter differs from PEFT by {err:.2e} > {TOL}"


def test_classifier_round_trip_with_peft(tmp_path):
    """BERT classification: the new head and pooler travel in modules_to_save; PEFT reproduces our logits."""
    cfg = TrainConfig(**{**FAST, "steps": 3, "rank": 8, "lr": 2e-2})
    out = tmp_path / "cls"
    train(MODELS / "bert", DATA / "classify.jsonl", out, cfg)
    meta = json.loads((out / "psoft_export.json").read_text())
    assert meta["task"] == "classify" and meta["classes"] == [0, 1]
    inputs = {k: v for k, v in model_inputs("bert").items()}
    ours = AutoModelForSequenceClassification.from_pretrained(MODELS / "bert", num_labels=2).eval()
    adapter_io.load_adapter(ours, out, MODELS / "bert")
    base = AutoModelForSequenceClassification.from_pretrained(MODELS / "bert", num_labels=2).eval()
    theirs = PeftModel.from_pretrained(base, out).eval()
    err = rel_err(outputs(ours, inputs), outputs(theirs, inputs))
    assert err <= TOL, f"bert classifier: PEFT's load differs from ours by {err:.2e} > {TOL}"


def test_decomposition_from_another_model_is_refused(tmp_path):
    from psoft_export.decompose import decompose

    decompose(MODELS / "qwen2", tmp_path / "d", 8, plot=False)
    cfg = TrainConfig(**{**FAST, "steps": 1, "rank": 8})
    with pytest.raises(UserInputError, match="computed from other weights"):
        train(MODELS / "llama", DATA / "train.jsonl", tmp_path / "out", cfg, decomposition=tmp_path / "d")
    assert not (tmp_path / "out").exists()


def test_a_failed_final_save_loses_nothing_and_resume_finishes_it(tmp_path, monkeypatch):
    """Issue 11: a failure after training (here the PEFT conversion raises) keeps the trained state on disk; the
    same command with --resume writes the adapter without retraining, identical to an uninterrupted run."""
    from psoft_export import adapter_io
    from psoft_export.train import SaveFailed

    reference, _, _ = run(tmp_path, steps=3, rank=8)

    def broken(layers):
        raise RuntimeError("conversion exploded")

    cfg = TrainConfig(**{**FAST, "steps": 3, "rank": 8})
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(adapter_io, "peft_tensors", broken)
        with pytest.raises(SaveFailed, match="--resume to write the adapter without retraining"):
            train(MODELS / "llama", DATA / "train.jsonl", out, cfg)
    assert (out / "checkpoints" / "step-0000003.pt").is_file(), "the trained state must stay on disk"
    assert not (out / "psoft_export.safetensors").exists()
    summary = train(MODELS / "llama", DATA / "train.jsonl", out, cfg, resume=True)
    assert summary["steps"] == 3
    got, want = load_file(out / "psoft_export.safetensors"), load_file(reference / "psoft_export.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), "resume must not retrain"


@pytest.mark.parametrize("tied", [True, False])
def test_base_model_only_llama_checkpoint(tmp_path, tied):
    """Issue 12: a LlamaModel checkpoint (no `model.` prefix) trains PSOFT as a causal LM when its embeddings are
    tied (the LM head exists through them); with untied embeddings there is no LM head, and it is refused."""
    import shutil

    from transformers import AutoConfig, LlamaModel

    full = AutoModelForCausalLM.from_pretrained(MODELS / "llama")
    config = AutoConfig.from_pretrained(MODELS / "llama")
    config.tie_word_embeddings, config.architectures = tied, ["LlamaModel"]
    base = LlamaModel(config)
    base.load_state_dict(full.model.state_dict())
    model_dir = tmp_path / "llama-base"
    base.save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODELS / "llama" / f, model_dir)
    from psoft_export.decompose import decompose

    dec = decompose(model_dir, tmp_path / "dec", 8, plot=False)
    assert dec.targets[0].startswith("layers."), "decompose names modules after LlamaModel"
    cfg = TrainConfig(**{**FAST, "steps": 2})
    out = tmp_path / "adapter"
    if not tied:
        with pytest.raises(UserInputError, match=r"has no lm_head.weight: language-model training would start"):
            train(model_dir, DATA / "train.jsonl", out, cfg, decomposition=dec.path)
        assert not out.exists()
        return
    summary = train(model_dir, DATA / "train.jsonl", out, cfg, decomposition=dec.path)
    meta = json.loads((out / "psoft_export.json").read_text())
    assert meta["targets"][0].startswith("model.layers.") and len(meta["targets"]) == len(dec.targets)
    assert meta["config"]["rank"] == 8 and summary["steps"] == 2
