#!/usr/bin/env python
"""Scale benchmark (issue #16): the whole chain on a 1B Llama-shaped checkpoint, wall time and peak RSS per step.

Usage::

    python benchmarks/scale.py [--small] [--cache ~/.cache/psoft-export-bench] [--steps decompose,train,merge-st,...]
                               [--threads 2] [--json]

Builds once (cached under ``--cache``, never in CI) a Llama-3.2-1B-shaped ``LlamaForCausalLM`` directory: hidden
2048, MLP 8192, 16 layers, 32 heads / 8 KV heads, GPT-2's vocabulary size (50257), tied embeddings, 1.08 B
parameters, bfloat16, three safetensors shards with an index; tensors are seeded Gaussians (``std 0.02``, norms 1)
written one shard at a time, and the tokenizer is the Llama fixture's (ids < 1000, inside the vocabulary).
``--small`` builds a much smaller model of the same kind (hidden 256, MLP 1024, 2 layers) for a smoke test.

Every step runs ``psoft-export`` in a fresh child process; its peak RSS is the child's ``ru_maxrss`` (``wait4``; this
parent never imports torch, so nothing of it is counted), the baseline a child that imports the same modules and
stops. Steps (``--steps``, in order; later steps use earlier outputs):

* ``decompose``: ``decompose --rank 32`` (``--small``: 8); reported against largest weight + all factors (float32),
  whose bar belongs to issue 3 (docs/benchmarks.md).
* ``train``: ``train --method oft --steps 2 --batch-size 1 --seq-len 128``; no bound (reported).
* ``merge-st``: ``merge --to safetensors --no-verify`` (streamed); bound: largest source shard + 4 x the largest
  adapted weight in float32 (one fold's working set) + the adapter's files, plus ``SLACK_MB`` for what the process
  holds besides tensors (the meta skeleton, headers, tokenizer). PASS/FAIL is printed for this bound only.
* ``merge-st-verify``: the same with verification; bound: the merge bound + 2 x the largest unit in float32
  (verification runs each model one decoder layer, embedding or head at a time: ``psoft_export/streamed_run.py``).
* ``merge-gguf``: ``merge --to gguf --dtype float16 --no-verify`` (streamed); the merge bound, with 2 x the largest
  tensor in float32 in place of the fold's set where that is larger (GGUF widens and encodes every tensor).
* ``merge-gguf-verify``: the same with verification (llama.cpp); the merge bound + the larger of 2 x the largest
  unit in float32 and the float16 GGUF llama.cpp maps (2 bytes per parameter).
* ``anchor-gguf``: the route without psoft-export: PEFT ``merge_and_unload`` of the adapter's PEFT files over the
  bf16 base, ``save_pretrained``, llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` (issue 16's anchor; no
  verification). Bar: ``merge-gguf-verify`` no slower than it (printed when both ran).
* ``merge-onnx``: ``--to onnx`` (in-memory route; reported).

Prints a table (seconds, peak, baseline, peak - baseline, bound, PASS/FAIL where a bound exists) and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._child import run_measured  # noqa: E402

MB = 2**20
SHAPES = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 50257,
        "rank": 32,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 50257,
        "rank": 8,
    },
}
SHARDS = 3
SLACK_MB = 32
BARRED = ("merge-st", "merge-st-verify", "merge-gguf", "merge-gguf-verify")  # held to their bound (others: reported)
STEPS = (
    "decompose",
    "train",
    "merge-st",
    "merge-st-verify",
    "merge-gguf",
    "merge-gguf-verify",
    "anchor-gguf",
    "merge-onnx",
)
DEFAULT_STEPS = ("decompose", "train", "merge-st", "merge-st-verify")
IMPORTS = (
    "import psoft_export.cli, psoft_export.merge, psoft_export.train, psoft_export.decompose, "
    "converters.safetensors, transformers; from transformers import LlamaForCausalLM, PreTrainedTokenizerFast"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--small", action="store_true", help="a small model of the same kind (smoke test, about a minute)")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/psoft-export-bench").expanduser(),
        help="where the model and the outputs live (default ~/.cache/psoft-export-bench)",
    )
    p.add_argument("--steps", default=",".join(DEFAULT_STEPS), help=f"comma-separated, from {','.join(STEPS)}")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of every child (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--_build", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_anchor", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = "small" if args.small else "1b"
    args.step_list = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.step_list) - set(STEPS))
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}")
    return args


# ----------------------------------------------------------------------------------------------- the model (a child)
def build(out: Path, shape: str) -> None:
    """Write the checkpoint tensor by tensor, one shard in memory at a time (bf16: the 1B model's shard is ~0.7 GB)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {k: v for k, v in SHAPES[shape].items() if k != "rank"}
    config = LlamaConfig(**dims, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    names = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}  # tied
    sizes = {k: 2 * _numel(s) for k, s in names.items()}
    target = sum(sizes.values()) / SHARDS
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shard, filled, index, number = {}, 0, {}, 1
    for i, (key, s) in enumerate(names.items()):
        shard[key] = (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
        filled += sizes[key]
        if (filled >= target * number and number < SHARDS) or i == len(names) - 1:
            file = f"model-{number:05d}-of-{SHARDS:05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
            shard, number = {}, number + 1
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": index}, indent=2, sort_keys=True)
        + "\n"
    )
    config.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(ROOT / "fixtures" / "models" / "llama" / name, tmp / name)
    os.replace(tmp, out)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------- the parent
def spawn(argv: list[str], threads: int, log: Path | None = None) -> tuple[float, float, int]:
    """Run ``python argv``; seconds, peak RSS (MiB, ``wait4``) and exit code (output to ``log``)."""
    with open(log or os.devnull, "w") as out:
        _, seconds, peak, rc = run_measured(argv, threads, output=out, cwd=ROOT, PYTHONPATH=str(ROOT))
    return seconds, peak, rc


def step_argv(step: str, model: Path, work: Path, rank: int) -> list[str]:
    cli = ["-m", "psoft_export"]
    merge = [*cli, "merge", str(model), "--adapter", str(work / "adapter"), "--overwrite"]
    return {
        "decompose": [*cli, "decompose", str(model), "-o", str(work / "decomp"), "--rank", str(rank), "--overwrite"],
        "train": [
            *cli,
            "train",
            str(model),
            "--data",
            str(ROOT / "fixtures/data/train.jsonl"),
            "--method",
            "oft",
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--seq-len",
            "128",
            "-o",
            str(work / "adapter"),
            "--overwrite",
        ],
        "merge-st": [*merge, "--to", "safetensors", "--no-verify", "-o", str(work / "merged-st")],
        "merge-st-verify": [*merge, "--to", "safetensors", "-o", str(work / "merged-st-verified")],
        "merge-gguf": [*merge, "--to", "gguf", "--dtype", "float16", "--no-verify", "-o", str(work / "merged-gguf")],
        "merge-gguf-verify": [*merge, "--to", "gguf", "--dtype", "float16", "-o", str(work / "merged-gguf-verified")],
        "anchor-gguf": [str(Path(__file__).resolve()), "--_anchor", str(model), str(work / "adapter"), str(work)],
        "merge-onnx": [*merge, "--to", "onnx", "-o", str(work / "merged-onnx")],
    }[step]


def anchor(model: Path, adapter: Path, work: Path) -> None:
    """The route users take without us (issue 16's anchor): PEFT loads the base (bf16) with the adapter's PEFT files,
    ``merge_and_unload``, ``save_pretrained``, then llama.cpp's ``convert_hf_to_gguf.py --outtype f16``; no
    verification. llama.cpp's converter knows tokenizers by a hash, so the saved directory gets GPT-2's tokenizer
    (rebuilt from the llama-cpp-python sdist's vocab-only GGUF, the model's vocabulary size), before the clock's
    converter step like the rest; the tensors are what the timing is about."""
    import subprocess

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from tests.llama_cpp_tools import llama_cpp_source

    src = llama_cpp_source()
    if src is None:
        sys.exit("anchor-gguf needs llama.cpp's converter: pip download of the llama-cpp-python sdist failed")
    saved, out = work / "anchor-hf", work / "anchor-gguf"
    shutil.rmtree(saved, ignore_errors=True)
    out.mkdir(exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(saved)
    del base, merged
    tokenizer = AutoTokenizer.from_pretrained(src / "models", gguf_file="ggml-vocab-gpt-2.gguf")
    tokenizer.save_pretrained(saved)
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(saved), "--outtype", "f16"]
    subprocess.run([*cmd, "--outfile", str(out / "model.gguf")], env=env, check=True)


def header_shapes(model: Path) -> dict[str, tuple[list[int], str, str]]:
    """``{key: (shape, dtype, file)}`` from the safetensors headers (no torch in this process)."""
    out = {}
    for file in sorted(model.glob("*.safetensors")):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            for key, info in json.loads(f.read(n)).items():
                if key != "__metadata__":
                    out[key] = (info["shape"], info["dtype"], file.name)
    return out


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bounds(model: Path, work: Path, rank: int) -> dict[str, float]:
    """The memory bounds (MiB) the steps are held to (see the module docstring)."""
    tensors = header_shapes(model)
    targets = [s for k, (s, _, _) in tensors.items() if k.rsplit(".", 2)[-2] in TARGETS]
    largest = max(_numel(s) for s in targets) * 4
    factors = sum(rank * (s[0] + s[1]) * 4 for s in targets)
    shard = max(p.stat().st_size for p in model.glob("*.safetensors"))
    adapter = (
        sum(p.stat().st_size for p in (work / "adapter").glob("*") if p.is_file()) if (work / "adapter").is_dir() else 0
    )
    merge = (shard + 4 * largest + adapter) / MB + SLACK_MB
    # GGUF also widens every tensor to float32 and encodes it: the embedding (not adapted) can be the larger set
    widest = max(_numel(s) for s, _, _ in tensors.values()) * 4
    merge_gguf = (shard + max(4 * largest, 2 * widest) + adapter) / MB + SLACK_MB
    # Verification runs every PyTorch model one unit at a time (psoft_export/streamed_run.py): the largest unit (a
    # decoder layer, or the embedding, which the tied head loads again) in float32, twice (loaded and merged).
    layer = sum(_numel(s) for k, (s, _, _) in tensors.items() if k.startswith("model.layers.0.")) * 4
    unit = max(layer, widest)
    # llama.cpp then maps the GGUF export itself (its pages count in the RSS): merged float16 is 2 bytes a parameter.
    gguf16 = sum(_numel(s) for s, _, _ in tensors.values()) * 2
    return {
        "decompose": (largest + factors) / MB,
        "merge-st": merge,
        "merge-gguf": merge_gguf,
        "merge-st-verify": merge + 2 * unit / MB,
        "merge-gguf-verify": merge_gguf + max(2 * unit, gguf16) / MB,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args._build:
        build(args._build, args.shape)
        return 0
    if args._anchor:
        anchor(*args._anchor)
        return 0
    root = args.cache / args.shape
    model, work = root / "model", root / "work"
    work.mkdir(parents=True, exist_ok=True)
    if not model.is_dir():
        print(f"[build] {args.shape} model into {model} ...", file=sys.stderr, flush=True)
        seconds, _, rc = spawn(
            [str(Path(__file__).resolve()), *(["--small"] if args.small else []), "--_build", str(model)],
            args.threads,
            work / "build.log",
        )
        if rc:
            sys.exit(f"building the model failed (exit {rc}): see {work / 'build.log'}")
        print(f"[build] {seconds:.0f} s", file=sys.stderr, flush=True)
    _, baseline, _ = spawn(["-c", IMPORTS], args.threads)
    rank = SHAPES[args.shape]["rank"]
    results = {}
    for step in args.step_list:
        seconds, peak, rc = spawn(step_argv(step, model, work, rank), args.threads, work / f"{step}.log")
        results[step] = {"seconds": seconds, "peak_mb": peak, "delta_mb": peak - baseline, "exit": rc}
        print(
            f"[{step}] exit {rc}, {seconds:.1f} s, peak RSS {peak:.0f} MiB (log {work / f'{step}.log'})",
            file=sys.stderr,
            flush=True,
        )
    limits = bounds(model, work, rank)
    for step, r in results.items():
        r["bound_mb"] = limits.get(step)
        r["ok"] = (r["exit"] == 0 and r["delta_mb"] <= r["bound_mb"]) if step in BARRED else None
    command = "python benchmarks/scale.py " + shlex.join(argv)
    if args.json:
        print(
            json.dumps({"shape": args.shape, "baseline_mb": baseline, "steps": results, "command": command}, indent=2)
        )
        return 0 if all(r["exit"] == 0 and r["ok"] is not False for r in results.values()) else 1
    size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / MB
    print(f"model: {args.shape}, {size:.0f} MiB bf16 in {SHARDS} shards; baseline (imports) {baseline:.0f} MiB\n")
    head = ("step", "exit", "seconds", "peak MiB", "peak-base MiB", "bound MiB", "vs bound", "")
    rows = [
        (
            s,
            str(r["exit"]),
            f"{r['seconds']:.1f}",
            f"{r['peak_mb']:.0f}",
            f"{r['delta_mb']:.0f}",
            "-" if r["bound_mb"] is None else f"{r['bound_mb']:.0f}",
            "-" if r["bound_mb"] is None else f"{r['delta_mb'] / r['bound_mb']:.2f}x",
            "" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL"),
        )
        for s, r in results.items()
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    if "merge-gguf-verify" in results and "anchor-gguf" in results:
        ours, theirs = results["merge-gguf-verify"]["seconds"], results["anchor-gguf"]["seconds"]
        verdict = "PASS" if ours <= theirs else "FAIL"
        print(f"\nmerged GGUF with verification / anchor route without: {ours / theirs:.2f} (<= 1.00: {verdict})")
    print(f"\ncommand: {command}")
    return 0 if all(r["exit"] == 0 and r["ok"] is not False for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
