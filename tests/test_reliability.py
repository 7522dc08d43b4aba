"""Bad input, interruption and untrusted files: one line, exit 2, nothing left; signals keep a resumable run.

Each bad-input case runs the real CLI in-process (click's runner) and asserts the exit code, the message and
that no output appeared. The signal tests run ``psoft-export train`` in a subprocess and compare the resumed
adapter with an uninterrupted run bit for bit (CPU, fixed seed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from psoft_export.cli import cli
from tests.conftest import MODELS, oft_train_args, require

DATA = MODELS.parent / "data"
LLAMA = str(MODELS / "llama")
TRAIN = ["--rank", "8", "--steps", "2", "--seq-len", "32", "--batch-size", "4"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_failure(result, message: str, out: Path):
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists(), f"{out} was created"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "a temporary was left"


BAD_DATA = {
    "missing": (None, "does not exist"),
    "empty": ("\n\n", "has no records"),
    "invalid-json": ('{"text": "a"}\n{"text": "b"}\n{"text": \n', ":3: invalid JSON"),
    "not-object": ('["a"]\n', ":1: expected a JSON object"),
    "missing-field": ('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', ':2: missing field "completion"'),
    "unknown-fields": ('{"question": "a"}\n', "a record needs"),
    "label-bool": ('{"text": "a", "label": true}\n{"text": "b", "label": 0}\n', "must be an integer class id"),
    "label-float": ('{"text": "a", "label": 0.5}\n{"text": "b", "label": 0}\n', "must be an integer class id"),
    "label-mixed": ('{"text": "a", "label": "x"}\n{"text": "b", "label": 0}\n', "mix integers and strings"),
    "one-class": ('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', "at least two classes"),
    "text-not-string": ('{"text": 5}\n', 'field "text" must be a string'),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_train_rejects_bad_data(tmp_path, case):
    text, message = BAD_DATA[case]
    data = tmp_path / "data.jsonl"
    if text is not None:
        data.write_text(text)
    out = tmp_path / "adapter"
    assert_clean_failure(invoke(["train", LLAMA, "--data", data, "-o", out, *TRAIN]), message, out)


BAD_OPTIONS = {
    "rank-too-big": (["--rank", "65"], "rank 65 is invalid"),
    "rank-zero": (["--rank", "0"], "rank must be a positive integer"),
    "block-size": (["--method", "oft", "--block-size", "24"], "block sizes that fit every target: 4, 8, 16, 32"),
    "no-target": (["--targets", "nothing_here"], "no module matched targets nothing_here"),
    "fp16-on-cpu": (["--precision", "fp16", "--device", "cpu"], "needs a CUDA device"),
    "lr": (["--lr", "-1"], "--lr must be a positive number"),
    "resume-nothing": (["--resume"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_train_rejects_bad_options(tmp_path, case):
    extra, message = BAD_OPTIONS[case]
    out = tmp_path / "adapter"
    args = ["train", LLAMA, "--data", DATA / "train.jsonl", "-o", out, *TRAIN, *extra]
    assert_clean_failure(invoke(args), message, out)


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (MODELS / "llama" / f).exists():
            shutil.copy(MODELS / "llama" / f, model / f)
    torch.save(load_file(MODELS / "llama" / "model.safetensors"), model / "pytorch_model.bin")
    out = tmp_path / "adapter"
    args = oft_train_args(model, DATA / "train.jsonl", out, "--steps", "1", "--seq-len", "32")
    assert_clean_failure(invoke(args), "pickled weights", out)
    result = invoke([*args, "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").is_file()


def test_output_parent_that_is_a_file(tmp_path):
    blocker = write(tmp_path / "file", "x")
    out = blocker / "adapter"
    result = invoke(["train", LLAMA, "--data", DATA / "train.jsonl", "-o", out, *TRAIN])
    assert result.exit_code == 2 and "cannot write to" in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def qwen_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa") / "adapter"
    result = invoke(["train", str(MODELS / "qwen2"), "--data", DATA / "train.jsonl", "-o", out, *TRAIN])
    assert result.exit_code == 0, result.output
    return out


def test_merge_rejects_an_adapter_of_another_model(tmp_path, qwen_adapter):
    out = tmp_path / "out"
    result = invoke(["merge", LLAMA, "--adapter", qwen_adapter, "--to", "safetensors", "-o", out])
    assert_clean_failure(result, "computed from other weights", out)


def test_merge_rejects_lora_and_missing_adapters(tmp_path, qwen_adapter):
    lora = tmp_path / "lora"
    shutil.copytree(qwen_adapter, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(["merge", str(MODELS / "qwen2"), "--adapter", lora, "--to", "onnx", "-o", out]), "is a LORA adapter", out
    )
    assert_clean_failure(
        invoke(["merge", str(MODELS / "qwen2"), "--adapter", tmp_path / "nope", "--to", "onnx", "-o", out]),
        "does not exist",
        out,
    )


def test_merge_rejects_a_damaged_adapter_file(tmp_path, qwen_adapter):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(["merge", str(MODELS / "qwen2"), "--adapter", broken, "--to", "safetensors", "-o", out]),
        "is not the file psoft-export wrote",
        out,
    )
    shutil.copy2(qwen_adapter / "adapter_model.safetensors", broken / "adapter_model.safetensors")
    (broken / "psoft_export.safetensors").write_bytes(b"\x00" * 16)
    assert_clean_failure(
        invoke(["merge", str(MODELS / "qwen2"), "--adapter", broken, "--to", "safetensors", "-o", out]),
        "not a readable safetensors file",
        out,
    )


# ------------------------------------------------------------------------------------------- signals


def _train_cmd(out: Path, steps: int = 300) -> list[str]:
    # Long enough that the signal, sent after checkpoint 2..5 appears, lands mid-run even on a fast machine
    # (a step of this tiny model can take ~10 ms; with 60 steps the run sometimes finished before the poll saw it).
    return [
        sys.executable,
        "-m",
        "psoft_export",
        "train",
        LLAMA,
        "--data",
        str(DATA / "train.jsonl"),
        "-o",
        str(out),
        "--rank",
        "8",
        "--steps",
        str(steps),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--save-every",
        "1",
        "--lr",
        "1e-2",
    ]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def _wait_for_checkpoint(proc, out: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"train ended early with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        # Any checkpoint at or past ``step``: older ones are pruned, and a fast machine can pass step in a blink.
        if any(int(p.stem.split("-")[1]) >= step for p in (out / "checkpoints").glob("step-*.pt")):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint for step {step} within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "adapter"
    subprocess.run(_train_cmd(out), check=True, env=_env(), capture_output=True)
    return load_file(out / "psoft_export.safetensors"), [json.loads(l) for l in (out / "train_log.jsonl").open()]


@pytest.mark.parametrize("sig,code", [(signal.SIGKILL, -9), (signal.SIGINT, 130)])
def test_interrupted_train_resumes_to_the_same_adapter(tmp_path, uninterrupted, sig, code):
    ref_tensors, ref_log = uninterrupted
    out = tmp_path / "adapter"
    proc = subprocess.Popen(_train_cmd(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, out, random.Random(os.getpid()).randint(2, 5))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, f"{sig!r}: exit {proc.returncode}: {stderr}"
    if sig == signal.SIGINT:
        assert "interrupted at step" in stderr and "--resume" in stderr
    assert not (out / "adapter_config.json").exists(), "an interrupted run must not look finished"
    assert not list((out / "checkpoints").glob(".*tmp*")) or sig == signal.SIGKILL
    resumed = subprocess.run(_train_cmd(out) + ["--resume"], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    tensors = load_file(out / "psoft_export.safetensors")
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in ref_tensors), "resumed adapter differs (bitwise)"
    log = [json.loads(l) for l in (out / "train_log.jsonl").open()]
    assert [h["loss"] for h in log] == [h["loss"] for h in ref_log], "resumed losses differ from the uninterrupted run"


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_merge_leaves_nothing(tmp_path, qwen_adapter, sig, code):
    """SIGTERM/SIGINT while merge writes: exit 143/130, no output directory and no temporary left behind.

    The merge of the tiny model ends about 0.65 s after its temporary directory appears; a signal that a loaded
    machine delivers later finds a finished run (exit 0, the output whole), and the attempt is made again."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "psoft_export", "merge", str(MODELS / "qwen2"), "--adapter", str(qwen_adapter)]
    cmd += ["--to", "onnx", "-o", str(out)]
    for _attempt in range(3):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.tmp-*")):
            assert proc.poll() is None, f"merge ended before it was interrupted: {proc.communicate()}"
            assert time.time() < deadline, "merge never created its temporary directory"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0 and (out / "export.json").is_file():  # the signal came after the publish
            shutil.rmtree(out)
            continue
        break
    else:
        pytest.fail("three merges finished before the signal reached them")
    assert proc.returncode == code, f"exit {proc.returncode}: {stderr}"
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.iterdir()), f"left behind: {list(tmp_path.iterdir())}"


# ------------------------------------------------------------------------------------------- full and read-only disks


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 300 KiB tmpfs (root only; skipped where mounting is not allowed) and a read-only one."""
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), ro.mkdir()
    mounted = []
    try:
        for where, opts in ((full, "size=300k"), (ro, "ro,size=64k")):
            if subprocess.run(
                ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True
            ).returncode:
                pytest.skip("cannot mount a tmpfs here (not root?)")
            mounted.append(where)
        yield full, ro
    finally:
        for where in mounted:
            subprocess.run(["umount", str(where)], capture_output=True)


@pytest.mark.parametrize("to", ["safetensors", "gguf"])
def test_full_disk_is_a_clean_error(tiny_disk, qwen_adapter, to):
    if to == "gguf":
        require("llama_cpp")
    full, _ = tiny_disk
    result = invoke(["merge", str(MODELS / "qwen2"), "--adapter", qwen_adapter, "--to", to, "-o", full / "out"])
    assert result.exit_code == 2 and "No space left on device; free space or choose another -o" in result.output, (
        result.output
    )
    assert "Traceback" not in result.output and not list(full.iterdir()), list(full.iterdir())


def test_read_only_output_is_a_clean_error(tiny_disk, qwen_adapter):
    _, ro = tiny_disk
    for args in (
        ["merge", str(MODELS / "qwen2"), "--adapter", qwen_adapter, "--to", "onnx", "-o", ro / "out"],
        ["train", LLAMA, "--data", DATA / "train.jsonl", "-o", ro / "adapter", *TRAIN],
        ["decompose", LLAMA, "--rank", "4", "-o", ro / "decomp"],
    ):
        result = invoke(args)
        assert result.exit_code == 2 and "Read-only file system" in result.output, (args[0], result.output)
        assert "Traceback" not in result.output


# ------------------------------------------------------------------------ issue 13: nothing deleted, nothing mixed


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(result, message: str) -> None:
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_overwrite_never_replaces_an_input_of_the_same_run(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(LLAMA, model)
    before = snapshot(model)
    refused(invoke(["decompose", model, "-o", model, "--rank", 4, "--overwrite"]), "overlaps the input")
    refused(invoke(["decompose", model, "-o", model / "sub", "--rank", 4]), "overlaps the input")
    assert snapshot(model) == before, "decompose -o MODEL --overwrite must leave the model untouched"
    dec = tmp_path / "dec"
    assert invoke(["decompose", model, "-o", dec, "--rank", 8]).exit_code == 0
    dec_before = snapshot(dec)
    refused(
        invoke(
            ["train", model, "--data", DATA / "train.jsonl", "--decomposition", dec, "-o", dec, "--overwrite", *TRAIN]
        ),
        "overlaps the input",
    )
    assert snapshot(dec) == dec_before, "train -o DECOMP --overwrite must leave the decomposition untouched"


def test_overwrite_only_replaces_what_psoft_export_wrote(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for args in (
        ["decompose", LLAMA, "-o", mine, "--rank", 4, "--overwrite"],
        [
            "train",
            LLAMA,
            "--data",
            DATA / "train.jsonl",
            "-o",
            mine,
            "--overwrite",
            "--method",
            "oft",
            "--block-size",
            16,
            "--steps",
            1,
            "--seq-len",
            32,
        ],
    ):
        refused(invoke(args), "was not written by psoft-export")
        assert (mine / "thesis.tex").read_text() == "years of work"
    ours = tmp_path / "ours"
    assert invoke(["decompose", LLAMA, "-o", ours, "--rank", 4]).exit_code == 0
    assert (ours / ".psoft-export").is_file()
    assert invoke(["decompose", LLAMA, "-o", ours, "--rank", 8, "--overwrite"]).exit_code == 0
    assert json.loads((ours / "manifest.json").read_text())["rank"] == 8


def test_a_second_run_on_a_locked_output_is_refused_with_the_holders_pid(tmp_path):
    from psoft_export.atomic import output_lock

    out = tmp_path / "out"
    with output_lock(out):
        result = invoke(["train", LLAMA, "--data", DATA / "train.jsonl", "-o", out, *TRAIN])
        refused(result, f"is being written by another psoft-export run (pid {os.getpid()})")
        refused(invoke(["decompose", LLAMA, "-o", out, "--rank", 4]), "another psoft-export run")
    assert not out.exists()
    assert not list(tmp_path.glob(".out.lock")), "the lock file is removed when released"
    assert invoke(["decompose", LLAMA, "-o", out, "--rank", 4]).exit_code == 0


def test_nan_in_an_adapter_tensor_is_refused(tmp_path, qwen_adapter):
    from safetensors.torch import save_file

    broken = tmp_path / "nan"
    shutil.copytree(qwen_adapter, broken)
    tensors = load_file(broken / "psoft_export.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(broken / "psoft_export.safetensors"))
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(["merge", str(MODELS / "qwen2"), "--adapter", broken, "--to", "safetensors", "-o", out]),
        "holds NaN or Inf values",
        out,
    )


def test_completion_prompt_longer_than_seq_len_is_found_before_training(tmp_path):
    data = write(tmp_path / "long.jsonl", json.dumps({"prompt": "word " * 200, "completion": " end"}) + "\n")
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(oft_train_args(LLAMA, data, out, "--seq-len", 16, "--steps", 1)),
        "record 1: its prompt fills all 16 tokens",
        out,
    )


def test_sparse_integer_labels_are_refused_at_once(tmp_path):
    data = write(tmp_path / "sparse.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 300000000}\n')
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(oft_train_args(str(MODELS / "bert"), data, out, "--steps", 1)),
        "class ids 0..K-1",
        out,
    )


# ------------------------------------------------------------------------------- issue 13: nothing unchecked


OFT = ["--method", "oft", "--block-size", "16", "--steps", "2", "--seq-len", "32", "--batch-size", "4"]


def test_an_oft_adapter_is_tied_to_its_base_weights(tmp_path):
    adapter = tmp_path / "oft-llama"
    assert invoke(["train", LLAMA, "--data", DATA / "train.jsonl", "-o", adapter, *OFT]).exit_code == 0
    meta = json.loads((adapter / "psoft_export.json").read_text())
    assert len(meta["base_weights"]) == 14
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(["merge", str(MODELS / "qwen2"), "--adapter", adapter, "--to", "safetensors", "-o", out]),
        "was computed from other weights",
        out,
    )


def test_resume_refuses_other_data(tmp_path):
    out = tmp_path / "run"
    args = ["train", LLAMA, "-o", out, "--save-every", "1", *OFT]
    assert invoke([*args, "--data", DATA / "train.jsonl"]).exit_code == 0
    (out / "psoft_export.safetensors").unlink()  # as if the final save had failed
    other = write(tmp_path / "other.jsonl", '{"text": "something else entirely"}\n' * 50)
    refused(invoke([*args, "--data", other, "--resume"]), "--data is not the file the interrupted run trained on")


def test_edited_decomposition_factors_are_refused(tmp_path):
    from safetensors.torch import save_file

    dec = tmp_path / "dec"
    assert invoke(["decompose", LLAMA, "-o", dec, "--rank", 8]).exit_code == 0
    factors = load_file(dec / "decomposition.safetensors")
    key = next(k for k in factors if k.endswith(".A"))
    factors[key] = factors[key] * 1.001
    save_file(factors, str(dec / "decomposition.safetensors"))
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(["train", LLAMA, "--data", DATA / "train.jsonl", "--decomposition", dec, "-o", out, *TRAIN]),
        "is not the file decompose wrote",
        out,
    )


@pytest.mark.parametrize("alpha", ["nan", "inf", "-1"])
def test_decompose_refuses_a_non_finite_alpha(tmp_path, alpha):
    assert_clean_failure(
        invoke(["decompose", LLAMA, "-o", tmp_path / "out", "--rank", 4, "--alpha", alpha]),
        "--alpha must be a finite number > 0",
        tmp_path / "out",
    )


def test_decompose_refuses_nan_weights(tmp_path):
    from safetensors.torch import save_file

    model = tmp_path / "model"
    shutil.copytree(LLAMA, model)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert_clean_failure(
        invoke(["decompose", model, "-o", tmp_path / "out", "--rank", 4]), "holds NaN or Inf values", tmp_path / "out"
    )


def test_a_damaged_manifest_is_one_line(tmp_path):
    dec = tmp_path / "dec"
    assert invoke(["decompose", LLAMA, "-o", dec, "--rank", 8]).exit_code == 0
    manifest = json.loads((dec / "manifest.json").read_text())
    del manifest["rank"]
    (dec / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(["train", LLAMA, "--data", DATA / "train.jsonl", "--decomposition", dec, "-o", out, *TRAIN]),
        "is incomplete or damaged",
        out,
    )


def test_a_garbage_tokenizer_is_one_line(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(LLAMA, model)
    (model / "tokenizer.json").write_text("{not json")
    out = tmp_path / "out"
    assert_clean_failure(
        invoke(["train", model, "--data", DATA / "train.jsonl", "-o", out, *OFT]), "cannot load the tokenizer", out
    )


def test_seq_len_beyond_the_positions_is_refused(tmp_path):
    out = tmp_path / "out"
    limit = json.loads((MODELS / "gpt2" / "config.json").read_text())["n_positions"]
    assert_clean_failure(
        invoke(oft_train_args(str(MODELS / "gpt2"), DATA / "train.jsonl", out, "--steps", 1, "--seq-len", limit + 1)),
        f"exceeds the {limit} positions",
        out,
    )


def test_a_truncated_checkpoint_on_resume_is_one_line(tmp_path):
    out = tmp_path / "run"
    args = ["train", LLAMA, "--data", DATA / "train.jsonl", "-o", out, *OFT]
    assert invoke(args).exit_code == 0
    ckpt = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    refused(invoke([*args, "--resume"]), "is damaged")


def test_verify_refuses_a_corrupt_export_record(tmp_path, qwen_adapter):
    out = tmp_path / "export"
    assert (
        invoke(
            ["merge", str(MODELS / "qwen2"), "--adapter", qwen_adapter, "--to", "safetensors", "-o", out, "--no-verify"]
        ).exit_code
        == 0
    )
    (out / "export.json").write_text("{broken")
    refused(invoke(["verify", out, "--model", str(MODELS / "qwen2"), "--adapter", qwen_adapter]), "is not valid JSON")


@pytest.mark.parametrize(
    "line", ['{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"text": "a", "label": ' + "9" * 5000 + "}"]
)
def test_hostile_jsonl_is_one_line(tmp_path, line):
    data = write(tmp_path / "hostile.jsonl", line + "\n")
    out = tmp_path / "out"
    assert_clean_failure(invoke(["train", LLAMA, "--data", data, "-o", out, *OFT]), "hostile.jsonl:1:", out)


@pytest.mark.parametrize(
    "field,value,message",
    [("hidden_size", 10**9, "hidden_size=1000000000"), ("num_hidden_layers", 10**7, "num_hidden_layers=10000000")],
)
@pytest.mark.parametrize("command", ["decompose", "train"])
def test_absurd_config_sizes_are_refused_before_any_allocation(tmp_path, field, value, message, command):
    model = tmp_path / "model"
    shutil.copytree(LLAMA, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, field: value}))
    out = tmp_path / "out"
    args = (
        ["decompose", model, "-o", out, "--rank", 4]
        if command == "decompose"
        else ["train", model, "--data", DATA / "train.jsonl", "-o", out, *OFT]
    )
    start = time.perf_counter()
    assert_clean_failure(invoke(args), message, out)
    assert time.perf_counter() - start < 30, "refused at once, not after an allocation"


def test_allow_pickle_edge_cases_are_one_line(tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODELS / "llama" / f, model / f)
    torch.save(load_file(MODELS / "llama" / "model.safetensors"), model / "model.pt")
    out = tmp_path / "adapter"
    oft = ["train", model, "--data", DATA / "train.jsonl", "-o", out, "--allow-pickle", *OFT]
    assert_clean_failure(invoke(oft), "has no pytorch_model.bin", out)
    (model / "model.pt").rename(model / "pytorch_model.bin")
    psoft = ["train", model, "--data", DATA / "train.jsonl", "-o", out, "--allow-pickle", *TRAIN]
    assert_clean_failure(invoke(psoft), "PSOFT's decomposition reads and hashes safetensors", out)


def test_full_disk_during_training_is_a_clean_error(tiny_disk):
    """Issue 13.6: checkpoints every step onto a 300 KiB disk: one line, exit 2, and what was written stays."""
    full, _ = tiny_disk
    out = full / "run"
    result = invoke(
        [
            "train",
            LLAMA,
            "--data",
            DATA / "train.jsonl",
            "-o",
            out,
            "--save-every",
            1,
            "--method",
            "oft",
            "--block-size",
            16,
            "--steps",
            200,
            "--seq-len",
            32,
            "--batch-size",
            2,
        ]
    )
    assert result.exit_code == 2 and "No space left on device" in result.output, result.output
    assert "Traceback" not in result.output
    assert "--resume" in result.output.splitlines()[-1]


def test_a_signal_swallowed_by_a_finalizer_still_stops_the_publish(tmp_path, monkeypatch):
    """CI once saw SIGTERM land inside a regex object's ``__del__``: Python printed "Exception ignored" and the
    merge went on to publish and exit 0. The signal is recorded too, and checked before the rename."""
    from psoft_export import errors
    from psoft_export.atomic import atomic_output_dir

    monkeypatch.setattr(errors, "_PENDING", [])

    class Finalized:
        def __del__(self):
            errors.interrupt(signal.SIGTERM)  # what the handler does when the signal arrives during this __del__

    out = tmp_path / "out"
    with pytest.raises(errors.Terminated):
        with atomic_output_dir(out) as tmp:
            (tmp / "weights.bin").write_bytes(b"x")
            Finalized()  # the exception raised in __del__ is swallowed (printed as "Exception ignored")
            (tmp / "more.bin").write_bytes(b"y")  # the work carried on
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [], list(tmp_path.iterdir())


def test_a_signal_a_library_turned_into_its_own_error_is_an_interruption(tmp_path, qwen_adapter, monkeypatch):
    """SIGINT during the import of onnxruntime's extension surfaces as ``ImportError: initialization failed``
    raised from the KeyboardInterrupt (seen under load: a traceback, exit 1). Any error after a recorded signal is
    the signal: one line, exit 130, nothing written."""
    import converters
    from psoft_export import errors

    monkeypatch.setattr(errors, "_PENDING", [])
    imported = converters.module

    def interrupted_import(name):
        if name != "onnx":
            return imported(name)
        errors._PENDING.append(signal.SIGINT)  # what the handler records before it raises
        raise ImportError("initialization failed") from KeyboardInterrupt()

    monkeypatch.setattr(converters, "module", interrupted_import)
    out = tmp_path / "out"
    result = invoke(["merge", str(MODELS / "qwen2"), "--adapter", qwen_adapter, "--to", "onnx", "-o", out])
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
