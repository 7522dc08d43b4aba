"""The whole chain through the CLI, as a user runs it: decompose -> train -> merge to every format -> verify."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from psoft_export.cli import cli
from tests.conftest import MODELS, require

DATA = MODELS.parent / "data"


def run(*args) -> dict:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, f"psoft-export {' '.join(map(str, args))}\n{result.output}"
    return json.loads(result.stdout) if "--json" in args else {}


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_decompose_train_merge_verify(tmp_path, model):
    require("llama_cpp")
    src = MODELS / model
    run("decompose", src, "-o", tmp_path / "decomp", "--rank", 8, "--no-plot", "--json")
    summary = run(
        "train",
        src,
        "--data",
        DATA / "train.jsonl",
        "--eval-data",
        DATA / "eval.jsonl",
        "--decomposition",
        tmp_path / "decomp",
        "--rank",
        8,
        "--steps",
        12,
        "--seq-len",
        64,
        "--lr",
        2e-2,
        "-o",
        tmp_path / "adapter",
        "--json",
    )
    assert summary["final_loss"] < summary["first_loss"] - 0.02, (
        "12 steps must lower the loss (measured: 0.076 llama, 0.064 qwen2)"
    )
    for to in ("safetensors", "onnx", "gguf"):
        for split in ((), ("--split",)):
            out = tmp_path / f"{to}{'-split' if split else ''}"
            merged = run("merge", src, "--adapter", tmp_path / "adapter", "--to", to, *split, "-o", out, "--json")
            assert merged["verification"]["ok"], merged
            report = run("verify", out, "--model", src, "--adapter", tmp_path / "adapter", "--json")
            assert report["ok"], report
