"""Data-parallel scaling of ``psoft-export train`` under torchrun on CPU: step time, tokens/s and the bytes the ranks
exchange per optimizer step, predicted (4 x (trainable parameters + 4)) and measured (every ``all_reduce`` counted).

The same global batch at 1 and 2 ranks (``--global-batch-size``), so both runs train the same model. On a machine
with fewer cores than ranks x threads, 2 ranks measure the overhead of the all-reduce and of two processes, not a
speed-up. Prints one table and the commands it ran.

    python benchmarks/distributed.py [--model fixtures/models/llama] [--method psoft] [--steps 12] [--global-batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "fixtures" / "data"

# Run by torchrun in place of ``-m psoft_export``: counts the bytes of every all_reduce, written by each rank.
COUNTING = """
import atexit, json, os, sys
import torch.distributed as dist
from psoft_export.cli import main

calls = []
plain = dist.all_reduce

def counting(tensor, *args, **kwargs):
    calls.append(tensor.numel() * tensor.element_size())
    return plain(tensor, *args, **kwargs)

dist.all_reduce = counting
atexit.register(lambda: open(os.environ["BYTES_OUT"] + os.environ.get("RANK", "0"), "w").write(json.dumps(calls)))
main()
"""


def run(ranks: int, args, work: Path) -> dict:
    out = work / f"ranks-{ranks}"
    script = work / "counting.py"
    script.write_text(COUNTING)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        str(script),
        "train",
        args.model,
        "--data",
        str(DATA / "train.jsonl"),
        "-o",
        str(out),
        "--method",
        args.method,
        "--steps",
        str(args.steps),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.global_batch // ranks),
        "--global-batch-size",
        str(args.global_batch),
        "--rank",
        "16",
        "--block-size",
        "16",
        "--warmup",
        "0",
        "--json",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "BYTES_OUT": str(work / f"bytes-{ranks}-"),
    }
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    summary = json.loads(result.stdout)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][2:]  # after warm-up
    calls = json.loads((work / f"bytes-{ranks}-0").read_text())
    step_calls = [c for c in calls if c > 64]  # the step's bucket (the eval loss sums 2 numbers, 16 bytes)
    return {
        "ranks": ranks,
        "seconds": statistics.median(h["seconds"] for h in log),
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in log),
        "predicted": 4 * (summary["trainable_parameters"] + 4) if ranks > 1 else 0,
        "measured": statistics.median(step_calls) if step_calls else 0,
        "final_loss": summary["final_loss"],
        "command": " ".join(cmd[2:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "fixtures" / "models" / "llama"))
    parser.add_argument("--method", default="psoft", choices=["psoft", "oft"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(ranks, args, Path(tmp)) for ranks in (1, 2)]
    print(
        f"{args.method} on {args.model}, global batch {args.global_batch} x {args.seq_len} tokens, "
        f"{args.threads} thread(s) per rank, {os.cpu_count()} cores"
    )
    print("| ranks | step (s) | tokens/s | all-reduce bytes/step predicted | measured | final loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['predicted']:,} | "
            f"{r['measured']:,.0f} | {r['final_loss']:.5f} |"
        )
    for r in rows:
        print(f"  {r['command']}")


if __name__ == "__main__":
    main()
