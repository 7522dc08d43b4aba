"""Streamed merged safetensors export (``converters/safetensors.py`` via ``merge``): the model is never built.

Oracle: the in-memory route it replaces (the reference model, ``merge_and_unload``, ``save_pretrained``:
``converters.safetensors.save_merged_hf``), run in the test. float32 must be byte-identical file by file (weights,
config, generation config, tokenizer); half precision must be the float32 merge rounded to the dtype, bit for bit.
Memory: a child process's peak RSS (``os.wait4``) against a baseline child that imports the same modules.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save

from converters import safetensors as conv
from converters.safetensors import save_merged_hf as _merged_hf
from psoft_export.cli import cli
from psoft_export.errors import VerificationError
from psoft_export.merge import merge
from psoft_export.verify import reference_model
from tests.conftest import MODELS, ROOT
from tests.golden import ADAPTERS

CASES = {
    "llama-psoft": "llama",
    "qwen2-psoft": "qwen2",
    "llama-oft": "llama",
    "gpt2-psoft": "gpt2",
    "bert-psoft": "bert",
}
BOOKKEEPING = ("export.json", ".psoft-export")
MB = 2**20


def in_memory(model_dir: Path, adapter: Path, out: Path, dtype: str = "float32") -> Path:
    """What merge wrote before streaming: the float32 reference model merged, cast, ``save_pretrained``."""
    model, _, _ = reference_model(model_dir, adapter)
    out.mkdir(parents=True)
    _merged_hf(model, model_dir, out, dtype)
    return out


def export_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name not in BOOKKEEPING)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def peft_only(adapter: Path, out: Path) -> Path:
    """The adapter's PEFT files alone: no hashes of the base weights (so a re-saved base loads it), and for PSOFT
    the subspace recomputed from each weight, as PEFT does."""
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter / name, out / name)
    return out


def resave(model_dir: Path, out: Path, dtype: torch.dtype = torch.float32, shard: str | None = None) -> Path:
    """``model_dir`` re-saved (other dtype, or sharded) with its tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if model_dir.name == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=dtype)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    for file in model_dir.iterdir():
        if file.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy2(file, out / file.name)
    return out


# ------------------------------------------------------------------------------------------ equality with in-memory


@pytest.mark.parametrize("case", list(CASES))
def test_float32_is_byte_identical_to_the_in_memory_merge(tmp_path, case):
    """PSOFT and OFT, Conv1D (GPT-2, weight (in, out), lm_head tied), a task model (BERT classifier: ``bert.``
    prefix, heads from the adapter, the MLM head dropped), q/k/v biases (Qwen2): every file equal, bytes."""
    model_dir, adapter = MODELS / CASES[case], ADAPTERS / case
    summary = merge(model_dir, adapter, tmp_path / "stream", "safetensors", verify=False)
    assert summary["streamed"] and summary["dtype"] == "float32" and summary["dtype_from"] == "source"
    expected = in_memory(model_dir, adapter, tmp_path / "memory")
    assert export_files(tmp_path / "stream") == export_files(expected), f"{case}: the two routes write other files"
    differ = [
        n for n in export_files(expected) if not filecmp.cmp(tmp_path / "stream" / n, expected / n, shallow=False)
    ]
    assert not differ, f"{case}: streamed files differ from the in-memory merge (oracle: bytes equal): {differ}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", ["gpt2-psoft", "llama-oft"])
def test_half_precision_is_the_float32_merge_rounded(tmp_path, case, dtype):
    model_dir, adapter = MODELS / CASES[case], ADAPTERS / case
    summary = merge(model_dir, adapter, tmp_path / "stream", "safetensors", dtype=dtype, verify=False)
    assert summary["dtype"] == dtype and summary["dtype_from"] == "--dtype"
    got, ref = tensors(tmp_path / "stream"), tensors(in_memory(model_dir, adapter, tmp_path / "memory"))
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert got[key].dtype == getattr(torch, dtype), f"{key} written as {got[key].dtype}, asked {dtype}"
        assert torch.equal(got[key], value.to(got[key].dtype)), f"{key}: not the float32 merge rounded to {dtype}"


@pytest.mark.parametrize("case", ["llama-oft", "llama-psoft"])
def test_bf16_source_stays_bf16_and_float32_on_request(tmp_path, case):
    """A bf16 checkpoint exports bf16 by default (said in the summary and the CLI line), byte-identical to the
    in-memory merge cast to bf16, and verified; ``--dtype float32`` still gives float32. PEFT-form adapters (a
    re-saved base has other hashes; PSOFT then recomputes its subspace from each weight, as PEFT does)."""
    model_dir = resave(MODELS / "llama", tmp_path / "bf16", torch.bfloat16)
    adapter = peft_only(ADAPTERS / case, tmp_path / "adapter")
    result = CliRunner().invoke(
        cli, ["merge", str(model_dir), "--adapter", str(adapter), "--to", "safetensors", "-o", str(tmp_path / "stream")]
    )
    assert result.exit_code == 0, result.output
    assert "exported merged safetensors (bfloat16, the source's dtype)" in result.output, result.output
    info = json.loads((tmp_path / "stream" / "export.json").read_text())
    assert info["dtype"] == "bfloat16" and info["streamed"] and info["verification"]["ok"], info
    expected = in_memory(model_dir, adapter, tmp_path / "memory", "bfloat16")
    differ = [
        n for n in export_files(expected) if not filecmp.cmp(tmp_path / "stream" / n, expected / n, shallow=False)
    ]
    assert export_files(tmp_path / "stream") == export_files(expected) and not differ, differ
    wide = merge(model_dir, adapter, tmp_path / "f32", "safetensors", dtype="float32", verify=False)
    assert wide["dtype"] == "float32" and all(t.dtype == torch.float32 for t in tensors(tmp_path / "f32").values())


@pytest.mark.parametrize("name,case", [("llama", "llama-psoft"), ("gpt2", "gpt2-psoft")])
def test_sharded_source_gives_the_same_shards_and_an_index(tmp_path, name, case):
    model_dir = resave(MODELS / name, tmp_path / "sharded", shard="150KB")
    source_index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(source_index["weight_map"].values())) >= 3, "the fixture did not shard"
    summary = merge(model_dir, ADAPTERS / case, tmp_path / "stream", "safetensors")
    assert summary["verification"]["ok"], summary["verification"]
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source_index["weight_map"], "tensor-to-shard assignment differs from the source"
    shards = sorted(set(index["weight_map"].values()))
    assert [f for f in summary["files"] if f.endswith(".safetensors")] == shards
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors(tmp_path / "stream").values()
    )
    for shard in shards:
        with safe_open(str(tmp_path / "stream" / shard), "pt") as f:
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == shard)
    got, ref = tensors(tmp_path / "stream"), tensors(in_memory(model_dir, ADAPTERS / case, tmp_path / "memory"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), "merged tensors differ"


def test_header_and_file_are_what_the_safetensors_library_writes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    named = {
        "b.weight": torch.randn(3, 5, generator=gen).half(),
        "a.weight": torch.randn(2, 3, generator=gen),
        "c": torch.randn(7, generator=gen).bfloat16(),
        "aa": torch.arange(3),
        "z": torch.zeros(0),
        "m": torch.ones(4, dtype=torch.bool),
        "u": torch.arange(5, dtype=torch.uint8),
        "d": torch.randn(2, generator=gen, dtype=torch.float64),
        "i": torch.arange(3, dtype=torch.int32),
    }
    entries = [
        conv.Entry(k, k, tuple(t.shape), conv.ST_NAMES[t.dtype], t.numel() * t.element_size()) for k, t in named.items()
    ]
    conv._write_file(tmp_path / "ours.safetensors", entries, lambda e: named[e.key])
    assert (tmp_path / "ours.safetensors").read_bytes() == save(named, metadata=conv.METADATA), (
        "header order, offsets or padding differ from the safetensors library's"
    )


def test_a_tensor_the_files_lack_takes_the_in_memory_route():
    """BertModel has a pooler the BertForMaskedLM fixture does not hold (from_pretrained initializes it randomly):
    that checkpoint cannot be streamed, and ``plan`` says so rather than inventing the tensor."""
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        skeleton = AutoModel.from_config(AutoConfig.from_pretrained(MODELS / "bert"))
    with pytest.raises(conv.NotStreamable, match="pooler"):
        conv.plan(MODELS / "bert", skeleton, "float32", {})


# ------------------------------------------------------------------------------------------ verification failure


def test_failed_verification_keeps_the_export_unverified(tmp_path, monkeypatch):
    import psoft_export.verification as verify_mod

    monkeypatch.setitem(verify_mod.PRECISION_BOUNDS, ("safetensors", "float32"), 0.0)  # measured 4.9e-7: fails
    model_dir, adapter = MODELS / "llama", ADAPTERS / "llama-psoft"
    with pytest.raises(VerificationError, match=r"kept, unverified, in .*out\.unverified"):
        merge(model_dir, adapter, tmp_path / "out", "safetensors")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.unverified"], "a temporary directory was left behind"
    assert (tmp_path / "out.unverified" / "model.safetensors").is_file()
    result = CliRunner().invoke(
        cli, ["merge", str(model_dir), "--adapter", str(adapter), "--to", "safetensors", "-o", str(tmp_path / "out")]
    )  # again: the earlier .unverified is replaced
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1 and "out.unverified" in lines[0], result.output
    strict = CliRunner().invoke(
        cli,
        [
            "merge",
            str(model_dir),
            "--adapter",
            str(adapter),
            "--to",
            "safetensors",
            "-o",
            str(tmp_path / "s"),
            "--strict",
        ],
    )
    assert strict.exit_code == 1 and "nothing was written" in strict.output, strict.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.unverified"], "--strict must keep nothing"


def test_a_layer_left_unfolded_fails_verification(tmp_path, monkeypatch):
    """A planted bug (one adapted weight written unfolded) is caught by the tensor-by-tensor check."""
    import psoft_export.merge as merge_mod

    real = merge_mod.Stream.__init__

    def skip_one(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.fold.pop("model.layers.1.mlp.down_proj.weight")

    monkeypatch.setattr(merge_mod.Stream, "__init__", skip_one)
    with pytest.raises(VerificationError, match="weights: .*FAIL"):
        merge(MODELS / "llama", ADAPTERS / "llama-psoft", tmp_path / "out", "safetensors", strict=True)


def test_dtype_default_is_source_in_the_help():
    result = CliRunner().invoke(cli, ["merge", "--help"])
    assert "[default: source]" in result.output and "--strict" in result.output, result.output


# ------------------------------------------------------------------------------------------ memory

CHILD = """
import re, sys
import converters.safetensors, psoft_export.merge, transformers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama import modeling_llama
if sys.argv[1] in ("merge", "merge-verify"):
    psoft_export.merge.merge(sys.argv[2], sys.argv[3], sys.argv[4], "safetensors", verify=sys.argv[1] == "merge-verify")
print("VmHWM", re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def peak_rss_mb(*args: str) -> float:
    """Peak RSS (MiB) of a fresh child running :data:`CHILD` with ``args``: its ``VmHWM``, which starts at exec.
    (Not ``wait4``'s ``ru_maxrss``: that also counts the pages of the forked parent before exec, the whole pytest
    process.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split("VmHWM")[-1]) / 1024


def big_model(tmp: Path, layers: int = 6) -> tuple[Path, Path]:
    """A Llama of ``layers`` layers (hidden 768, MLP 3072; 38 MB float32 a layer, in shards of at most 40 MB) and a
    random OFT adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from psoft_export import adapter_io
    from psoft_export.adapters import OftConfig, inject

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=1000,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model_dir, adapter_dir = tmp / "big", tmp / "adapter"
    model.save_pretrained(model_dir, max_shard_size="40MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(MODELS / "llama" / name, model_dir / name)
    cfg = OftConfig(block_size=32)
    layers = inject(model, cfg, "all-linear")
    with torch.no_grad():
        for layer in layers.values():
            layer.q.normal_(0, 0.05)
    adapter_dir.mkdir()
    adapter_io.save_adapter(adapter_dir, model, cfg, base_model=str(model_dir))
    return model_dir, adapter_dir


def assert_streamed_peak(tmp_path, peak_rss_mb, what: str) -> None:
    """A streamed merge of a model much larger than its bound peaks within the bound: the largest shard + 4x the
    largest tensor (its float32 read, OFT's einsum operands and output, the cast or rope permutation for writing) +
    the adapter, above a child that imports the same modules and does nothing (``peak_rss_mb("baseline")``)."""
    model_dir, adapter = big_model(tmp_path)
    weights = sorted(model_dir.glob("*.safetensors"))
    total, shard = sum(p.stat().st_size for p in weights), max(p.stat().st_size for p in weights)
    largest = max(t.numel() * t.element_size() for p in weights for t in load_file(p).values())
    adapter_size = sum(p.stat().st_size for p in adapter.iterdir() if p.is_file())
    bound = shard + 4 * largest + adapter_size
    assert total > 2.5 * bound, "the model is too small for the test to tell streaming from an in-memory merge"
    baseline = peak_rss_mb("baseline")
    peak = peak_rss_mb("merge", str(model_dir), str(adapter), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "export.json").read_text())["streamed"]
    assert peak - baseline <= bound / MB, (
        f"{what} peak RSS {peak:.0f} MiB - baseline {baseline:.0f} MiB = {peak - baseline:.0f} MiB > bound "
        f"{bound / MB:.0f} MiB (largest shard {shard / MB:.0f} + 4 x largest tensor {largest / MB:.0f} + adapter "
        f"{adapter_size / MB:.1f}); the model is {total / MB:.0f} MiB"
    )


def test_peak_memory_is_one_tensor_not_the_model(tmp_path):
    assert_streamed_peak(tmp_path, peak_rss_mb, "streamed merge")


def test_verified_merge_peaks_at_a_layer_not_the_model(tmp_path):
    """Verification runs every PyTorch model one unit (decoder layer, embedding, head) at a time with its weights read
    then (psoft_export.streamed_run), so a verified merge peaks within the streamed merge's bound plus two float32
    layers (the loaded one, and its merged copy while the reference rounds it), not at the model (issue 16). The
    in-memory verification held one float32 model, 460 MiB here."""
    model_dir, adapter = big_model(tmp_path, layers=12)
    weights = sorted(model_dir.glob("*.safetensors"))
    tensors_ = {k: t for p in weights for k, t in load_file(p).items()}
    total, shard = sum(p.stat().st_size for p in weights), max(p.stat().st_size for p in weights)
    largest = max(t.numel() * t.element_size() for t in tensors_.values())
    layer = sum(t.numel() * 4 for k, t in tensors_.items() if k.startswith("model.layers.0."))
    adapter_size = sum(p.stat().st_size for p in adapter.iterdir() if p.is_file())
    bound = shard + 4 * largest + 2 * layer + adapter_size
    assert total > 2.5 * bound, "the model is too small for the test to tell a streamed verification from a whole one"
    baseline = peak_rss_mb("baseline")
    peak = peak_rss_mb("merge-verify", str(model_dir), str(adapter), str(tmp_path / "out"))
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["verification"]["ok"] and info["verification"].get("streamed"), info["verification"]
    assert peak - baseline <= bound / MB, (
        f"verified merge peak RSS {peak:.0f} MiB - baseline {baseline:.0f} MiB = {peak - baseline:.0f} MiB > bound "
        f"{bound / MB:.0f} MiB (largest shard {shard / MB:.0f} + 4 x largest tensor {largest / MB:.0f} + 2 x layer "
        f"{layer / MB:.0f} + adapter {adapter_size / MB:.1f}); the model is {total / MB:.0f} MiB"
    )
