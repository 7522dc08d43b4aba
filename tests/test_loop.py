"""The training loop's semantics against values computed by hand or by an independent recomputation (issue 14).

Each test names the planted bug it exists to catch (tools/mutations.py applies them one at a time).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from psoft_export import data as data_mod
from psoft_export.train import TrainConfig, lr_at, train
from tests.conftest import MODELS

DATA = MODELS.parent / "data"
FAST = dict(seq_len=32, batch_size=8, log_every=5, method="oft", block_size=16, warmup=0.0)


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records, at every step, the gradient vector the optimizer is about to use."""

    seen: list[torch.Tensor] = []

    def step(self, closure=None):
        grads = [p.grad.detach().flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
        RecordingAdamW.seen.append(torch.cat(grads).double().clone())
        return super().step(closure)


@pytest.fixture
def recorded(monkeypatch):
    RecordingAdamW.seen = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    return RecordingAdamW.seen


def _train(tmp_path, name: str, model: str = "llama", data: str = "train.jsonl", **opts):
    history = []
    cfg = TrainConfig(**{**FAST, **opts})
    summary = train(MODELS / model, DATA / data, tmp_path / name, cfg, on_log=history.append)
    return summary, history


# ------------------------------------------------------------------------------------------ schedule


def test_schedule_by_hand():
    """Bug caught: a wrong warmup ramp or a learning rate doubled in the cosine phase."""
    peak, total, warmup = 1e-2, 100, 0.1  # 10 warmup steps
    assert lr_at(0, total, peak, warmup) == pytest.approx(peak * 1 / 10, rel=1e-12)
    assert lr_at(9, total, peak, warmup) == pytest.approx(peak, rel=1e-12), "warmup ends at the peak"
    assert lr_at(10, total, peak, warmup) == pytest.approx(peak, rel=1e-12), "cosine starts at the peak"
    assert lr_at(55, total, peak, warmup) == pytest.approx(peak * 0.5, rel=1e-12), "half way down at the midpoint"
    assert lr_at(99, total, peak, warmup) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 89 / 90)), rel=1e-12)
    assert all(lr_at(s, total, peak, warmup) <= peak * (1 + 1e-12) for s in range(total)), "never above the peak"


def test_the_loop_uses_the_schedule(tmp_path):
    _, history = _train(tmp_path, "sched", steps=6, lr=4e-3, warmup=0.5)
    assert [h["lr"] for h in history] == pytest.approx([lr_at(s, 6, 4e-3, 0.5) for s in range(6)], rel=1e-12)


# ------------------------------------------------------------------------------------------ data


def test_completion_rows_mask_the_prompt_by_hand():
    """Bug caught: prompt tokens not masked to -100 (the loss would also train on the prompt)."""
    tok = AutoTokenizer.from_pretrained(MODELS / "llama")
    row = data_mod._completion_row({"prompt": "Q: where does the fox live? A:", "completion": " north"}, tok, 64)
    prompt = tok("Q: where does the fox live? A:", add_special_tokens=True)["input_ids"]
    completion = tok(" north", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"].tolist() == prompt + completion
    assert row["labels"].tolist() == [-100] * len(prompt) + completion


def test_collate_pads_labels_with_ignore():
    rows = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    batch = data_mod.collate(rows, pad_id=0)
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------------------------------ gradients


def test_grad_accum_2x4_equals_batch_8(tmp_path, recorded):
    """Bug caught: the loss not divided by --grad-accum (gradients twice as large)."""
    _train(tmp_path, "b8", steps=1, batch_size=8, grad_accum=1, max_grad_norm=0.0)
    _train(tmp_path, "b4x2", steps=1, batch_size=4, grad_accum=2, max_grad_norm=0.0)
    g8, g4x2 = recorded
    err = float((g8 - g4x2).norm() / g8.norm())
    assert err <= 1e-6, f"grad-accum 2 x batch 4 vs batch 8 (same rows, full blocks): relative difference {err:.2e}"


def test_clipping_caps_the_norm(tmp_path, recorded):
    """Bug caught: gradient clipping disabled."""
    _, history = _train(tmp_path, "clip", steps=2, max_grad_norm=1e-3)
    assert all(h["grad_norm"] > 1e-2 for h in history), "the unclipped norm must exceed the cap (else vacuous)"
    norms = [float(g.norm()) for g in recorded]
    assert all(n <= 1e-3 * (1 + 1e-5) for n in norms), f"norms after clipping {norms} exceed 1e-3"


# ------------------------------------------------------------------------------------------ epochs, eval


def test_epochs_set_the_number_of_steps(tmp_path):
    summary, _ = _train(tmp_path, "ep", epochs=0.5, batch_size=8)
    rows = len(
        data_mod.tokenize(
            data_mod.read_jsonl(DATA / "train.jsonl")[1], "causal", AutoTokenizer.from_pretrained(MODELS / "llama"), 32
        )
    )
    assert summary["steps"] == math.ceil(0.5 * math.ceil(rows / 8))


def test_eval_loss_is_the_token_weighted_mean(tmp_path):
    """The eval loss the loop logs equals a direct recomputation on the trained model."""
    from psoft_export.verify import reference_model

    history = []
    cfg = TrainConfig(**{**FAST, "steps": 2, "eval_every": 1})
    out = tmp_path / "ev"
    train(MODELS / "llama", DATA / "train.jsonl", out, cfg, eval_data=DATA / "eval.jsonl", on_log=history.append)
    assert all("eval_loss" in h for h in history)
    model, _, _ = reference_model(MODELS / "llama", out)
    tok = AutoTokenizer.from_pretrained(MODELS / "llama")
    rows = data_mod.tokenize(data_mod.read_jsonl(DATA / "eval.jsonl")[1], "causal", tok, 32).rows
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = row["input_ids"][None]
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert history[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)


# ------------------------------------------------------------------------------------------ resume with dropout


@pytest.mark.parametrize("model,data,method", [("gpt2", "train.jsonl", "psoft"), ("bert", "classify.jsonl", "oft")])
def test_resume_is_bit_identical_with_dropout(tmp_path, model, data, method):
    """Bug caught: resume not restoring the RNG (dropout then draws other masks). GPT-2 and BERT have dropout 0.1;
    BERT also trains a new classification head."""
    opts = dict(FAST, method=method, steps=4, save_every=2, rank=8, lr=1e-2, seq_len=32)
    ref_history = []
    train(MODELS / model, DATA / data, tmp_path / "ref", TrainConfig(**opts), on_log=ref_history.append)
    out = tmp_path / "run"

    def stop_at_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(MODELS / model, DATA / data, out, TrainConfig(**opts), on_log=stop_at_3)
    resumed = []
    train(MODELS / model, DATA / data, out, TrainConfig(**opts), resume=True, on_log=resumed.append)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in ref_history[2:]], "resumed losses differ"
    a, b = load_file(tmp_path / "ref" / "psoft_export.safetensors"), load_file(out / "psoft_export.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ precision, checkpointing


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("method", ["psoft", "oft"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, recorded, method):
    """Recomputing activations in backward changes nothing but memory: gradients equal to 1e-6 (relative)."""
    _train(tmp_path, "plain", method=method, rank=8, steps=1)
    _train(tmp_path, "ckpt", method=method, rank=8, steps=1, grad_checkpointing=True)
    plain, ckpt = recorded
    assert float((plain - ckpt).norm() / plain.norm()) <= 1e-6


@pytest.mark.parametrize("method", ["psoft", "oft"])
def test_bf16_autocast_on_cpu_gradients_close_to_float32(tmp_path, recorded, method):
    """bf16 (8-bit mantissa) weights and activations: the gradient keeps its direction (cosine >= 0.999) and its
    norm within 1% of float32's (measured on the llama fixture, one step: cosine 0.99997, norm ratio 1.00000)."""
    _train(tmp_path, "fp32", method=method, rank=8, steps=1, max_grad_norm=0.0)
    _, history = _train(tmp_path, "bf16", method=method, rank=8, steps=1, max_grad_norm=0.0, precision="bf16")
    fp32, bf16 = recorded
    assert _cosine(fp32, bf16) >= 0.999, f"cosine {_cosine(fp32, bf16):.5f}"
    assert abs(float(bf16.norm() / fp32.norm()) - 1) <= 0.01
    assert math.isfinite(history[0]["loss"])


def test_psoft_dropout_is_active_in_training_only(tmp_path, recorded):
    """PSOFT's adapter-path dropout (PsoftConfig.dropout) changes the gradient in training mode, and the trained
    model's eval outputs are deterministic."""
    from psoft_export.adapters import PsoftConfig, PsoftLinear

    torch.manual_seed(0)
    layer = PsoftLinear(torch.nn.Linear(16, 12), PsoftConfig(rank=4, alpha=4.0, dropout=0.5))
    with torch.no_grad():
        layer.q.normal_(0, 0.3)
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x)), "dropout must draw new masks in training"
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    no_drop = PsoftLinear(layer.base_layer, PsoftConfig(rank=4, alpha=4.0), factors=(layer.A, layer.B))
    with torch.no_grad():
        no_drop.q.copy_(layer.q)
    assert torch.allclose(layer(x), no_drop(x), rtol=0, atol=1e-6), "eval ignores dropout"


# ------------------------------------------------------------------------------------------ per-step cost (issue 19)


def test_mask_dropped_only_when_it_masks_nothing():
    """Packed blocks (all-ones mask) go to the model without the mask, padded batches keep it, and the loss is the
    same either way. Bug caught: dropping a mask that pads (the loss would then count padding)."""
    from transformers import AutoModelForCausalLM

    from psoft_export.train import _inputs

    model = AutoModelForCausalLM.from_pretrained(MODELS / "llama").eval()
    g = torch.Generator().manual_seed(0)
    full = [torch.randint(3, 100, (16,), generator=g) for _ in range(2)]
    packed = data_mod.collate([{"input_ids": r, "labels": r} for r in full], pad_id=0)
    assert "attention_mask" not in _inputs(packed)
    with torch.no_grad():
        a, b = model(**packed).loss, model(**_inputs(packed)).loss
    assert float(abs(a - b)) <= 1e-6 * float(abs(a)), (float(a), float(b))
    short = full[1][:9]
    padded = data_mod.collate([{"input_ids": full[0], "labels": full[0]}, {"input_ids": short, "labels": short}], 0)
    assert torch.equal(_inputs(padded)["attention_mask"], padded["attention_mask"])


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch, recorded):
    """The divergence check runs once per step (one host sync with the grad norm), before ``optimizer.step``: the
    parameters stay those of the last good step. Bug caught: checking after the step (NaN parameters)."""
    from transformers import LlamaForCausalLM

    from psoft_export.train import TrainingDiverged

    calls = {"n": 0}
    forward = LlamaForCausalLM.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third micro-batch: step 2 with --grad-accum 2
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    seen = []

    def keep(record):
        seen.append(record)

    with pytest.raises(TrainingDiverged, match="loss became nan at step 2"):
        train(
            MODELS / "llama",
            DATA / "train.jsonl",
            tmp_path / "out",
            TrainConfig(**{**FAST, "steps": 4, "grad_accum": 2}),
            on_log=keep,
        )
    assert len(seen) == 1 and math.isfinite(seen[0]["loss"])
    assert len(recorded) == 1, "the optimizer stepped on the non-finite step"


def test_orthogonality_only_on_log_steps(tmp_path):
    """``--log-every`` (default 10) is when the rotations' orthogonality is measured; the last step always."""
    assert TrainConfig().log_every == 10
    _, history = _train(tmp_path, "a", steps=7, log_every=3)
    assert [h["step"] for h in history if "orthogonality_error" in h] == [3, 6, 7]
