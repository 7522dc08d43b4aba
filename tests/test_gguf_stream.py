"""Streamed merged GGUF export (``converters/gguf_stream.py`` via ``merge``): the model is never built.

Oracle: the in-memory route it replaces (the float32 reference model merged, saved as a scratch HF directory and
converted by ``converters.gguf.export_model``: ``psoft_export.merge._merged``), run in the test; the two files must be
equal byte for byte in every GGUF type. Memory: a child process's peak RSS against a baseline child that imports the
same modules (see tests/test_stream.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from psoft_export.errors import VerificationError
from psoft_export.merge import _merged, merge
from psoft_export.verify import reference_model
from tests.conftest import MODELS, ROOT
from tests.golden import ADAPTERS
from tests.test_stream import assert_streamed_peak, peft_only, resave

CASES = {"llama-psoft": "llama", "qwen2-psoft": "qwen2", "llama-oft": "llama"}
TYPES = {
    "float32": ("float32", None),
    "float16": ("float16", None),
    "bfloat16": ("bfloat16", None),
    "q8_0": ("float32", "q8_0"),
}


def in_memory_gguf(model_dir, adapter, out, dtype, quant):
    """What merge wrote before streaming: the float32 model with the adapter, merged, through a scratch HF dir."""
    model, _, _ = reference_model(model_dir, adapter)
    out.mkdir(parents=True)
    _merged("gguf", model, model_dir, out, dtype, quant)
    return out / "model.gguf"


@pytest.mark.parametrize("gguf_type", list(TYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_gguf_is_byte_identical_to_the_in_memory_route(tmp_path, case, gguf_type):
    """PSOFT and OFT, Llama (q/k rows permuted for RoPE) and Qwen2 (q/k/v biases, no permutation), f32/f16/q8_0."""
    model_dir, adapter = MODELS / CASES[case], ADAPTERS / case
    dtype, quant = TYPES[gguf_type]
    summary = merge(model_dir, adapter, tmp_path / "stream", "gguf", dtype=dtype, quant=quant, verify=False)
    assert summary["streamed"], summary
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == [".psoft-export", "export.json", "model.gguf"], (
        "the scratch directory was left behind"
    )
    expected = in_memory_gguf(model_dir, adapter, tmp_path / "memory", dtype, quant)
    got = (tmp_path / "stream" / "model.gguf").read_bytes()
    assert got == expected.read_bytes(), f"{case} {gguf_type}: streamed GGUF differs from the in-memory route's bytes"


def test_bf16_sharded_source_streams_to_the_same_file(tmp_path):
    """A bf16 checkpoint in shards: widened to float32 before the fold, as from_pretrained widens it."""
    model_dir = resave(MODELS / "llama", tmp_path / "bf16", torch.bfloat16, shard="150KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    adapter = peft_only(ADAPTERS / "llama-oft", tmp_path / "adapter")
    summary = merge(model_dir, adapter, tmp_path / "stream", "gguf", dtype="float16", verify=False)
    assert summary["streamed"] and summary["dtype"] == "float16"
    expected = in_memory_gguf(model_dir, adapter, tmp_path / "memory", "float16", None)
    assert (tmp_path / "stream" / "model.gguf").read_bytes() == expected.read_bytes()


def test_a_bf16_source_exports_bf16_gguf_by_default(tmp_path):
    """``--dtype source`` (the default) keeps a bf16 checkpoint bf16 in GGUF too: BF16 weights, 1-D tensors F32,
    verified in llama.cpp against the rounded reference within the bf16 bar; a float32 source stays float32."""
    from converters import gguf as gg
    from converters import table

    model_dir = resave(MODELS / "llama", tmp_path / "bf16", torch.bfloat16, shard="150KB")
    adapter = peft_only(ADAPTERS / "llama-psoft", tmp_path / "adapter")
    summary = merge(model_dir, adapter, tmp_path / "out", "gguf")
    assert (summary["dtype"], summary["dtype_from"], summary["streamed"]) == ("bfloat16", "source", True), summary
    report = summary["verification"]
    assert report["ok"] and report["tolerance"] == table("rounded_tolerances")[("gguf", "bfloat16")], report
    types = {t["name"]: t["type"] for t in gg.describe(tmp_path / "out" / "model.gguf")["tensors"]}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32", types
    f32 = merge(MODELS / "llama", ADAPTERS / "llama-psoft", tmp_path / "f32", "gguf", verify=False)
    assert (f32["dtype"], f32["dtype_from"]) == ("float32", "source"), f32


def test_a_layer_left_unfolded_fails_verification(tmp_path, monkeypatch):
    """A planted bug (one adapted weight written unfolded) is caught by the tensor-by-tensor check against the
    rounded reference."""
    import psoft_export.merge as merge_mod

    real = merge_mod.Stream.__init__

    def skip_one(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.fold.pop("model.layers.1.self_attn.v_proj.weight")

    monkeypatch.setattr(merge_mod.Stream, "__init__", skip_one)
    with pytest.raises(VerificationError, match=r"weights: .*FAIL"):
        merge(MODELS / "llama", ADAPTERS / "llama-psoft", tmp_path / "out", "gguf", dtype="float16", strict=True)


# ------------------------------------------------------------------------------------------ memory

CHILD = """
import re, sys
import converters.gguf, converters.gguf_stream, converters.safetensors, psoft_export.merge, transformers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama import modeling_llama
if sys.argv[1] == "merge":
    psoft_export.merge.merge(sys.argv[2], sys.argv[3], sys.argv[4], "gguf", dtype="float16", verify=False)
print("VmHWM", re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def peak_rss_mb(*args: str) -> float:
    """Peak RSS (MiB) of a fresh child running :data:`CHILD`: its ``VmHWM`` (see tests/test_stream.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split("VmHWM")[-1]) / 1024


def test_peak_memory_is_one_tensor_not_the_model(tmp_path):
    assert_streamed_peak(tmp_path, peak_rss_mb, "streamed GGUF merge")
