"""Data-parallel scaling of ``psoft-export train`` under torchrun: step time, tokens/s and the bytes the ranks
exchange per optimizer step, without and with ``--fsdp``. Predicted: the all-reduce of the trainable gradients,
4 x (trainable parameters + 4); with ``--fsdp`` also FSDP2's all-gathers of the frozen base, per micro-batch each
block twice (forward, and again for backward) and the root once. Measured: the bytes of every tensor passed to
``all_reduce`` and ``all_gather_single`` (FSDP2's all-gather), counted by wrapping them in each rank.

The same global batch at 1 and 2 ranks (``--global-batch-size``), so every run trains the same model. On a machine
with fewer cores than ranks x threads, 2 ranks measure the overhead of the collectives and of two processes, not a
speed-up. ``--device cuda`` runs on NCCL, one GPU per rank (``--ranks 1`` on a one-GPU machine). Prints one table
and the commands it ran.

Against PEFT + accelerate: the same model, data, global batch, sequence length and 2 ranks, PEFT's adapter
(``--peft``: PSOFT and LoRA at ``--rank`` for ``--method psoft``, OFT at ``--block-size`` for ``oft``) prepared by
``accelerate.Accelerator`` (under torchrun it reads the environment and, on CPU, joins with gloo: MULTI_CPU), so the
model is wrapped in ``DistributedDataParallel``. DDP all-reduces every trainable gradient in buckets during backward:
predicted 4 x trainable parameters per step (fp32 gradients, one micro-batch), measured by a DDP communication hook
that counts each bucket's bytes before calling the default ``allreduce_hook``. Ratios ours / PEFT printed below.

``--memory``: peak host memory per rank (RSS) of ``train --fsdp`` against DDP and one process on a Llama-shaped
model written here (hidden 2048, intermediate 8192, ``--layers``, vocab 32000, untied, bf16; random weights; OFT
b=32, ``--precision bf16``): the RSS when loaded, after sharding, the peak while loading, the peak while training
(``VmHWM`` reset after loading), and the base bytes each rank holds (``fsdp.local_bytes``).

    python benchmarks/distributed.py [--model fixtures/models/llama] [--method psoft] [--steps 12] [--global-batch 16]
        [--ranks 1,2] [--device cpu|cuda] [--peft peft-psoft,peft-lora]
    python benchmarks/distributed.py --memory [--layers 2,4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "fixtures" / "data"

# Run by torchrun in place of ``-m psoft_export``: counts the bytes of every all_reduce and all-gather, and records the
# process's memory around loading and sharding (``--memory``); written by each rank.
COUNTING = """
import atexit, json, os, sys
import torch.distributed as dist
import psoft_export.fsdp as fsdp, psoft_export.train as train
from psoft_export.cli import main

calls, memory = {"all_reduce": [], "all_gather_single": []}, {}

def counting(name):
    plain = getattr(dist, name)
    def count(tensor, *args, **kwargs):  # all_reduce's tensor; all_gather_single's output (the whole gathered size)
        calls[name].append(tensor.numel() * tensor.element_size())
        return plain(tensor, *args, **kwargs)
    return count

def status():  # resident bytes now, and the peak since the start or the last reset
    vm = dict(line.split(":") for line in open("/proc/self/status") if line.startswith(("Vm", "Rss")))
    return {k: int(vm[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

def preparing(plain):
    def prepare(*args, **kwargs):
        memory["start"] = status()["VmRSS"]
        run = plain(*args, **kwargs)
        memory["prepared"] = status()
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak from here is the training's
        return run
    return prepare

def sharding(plain):
    def shard(model, *args):
        memory["unsharded"] = status()["VmRSS"]
        model = plain(model, *args)
        memory["sharded"], memory["holds"] = status(), fsdp.local_bytes(model)
        return model
    return shard

def written():
    memory["end"] = status()
    with open(os.environ["BYTES_OUT"] + os.environ.get("RANK", "0"), "w") as f:
        json.dump({"calls": calls, "memory": memory}, f)

for name in calls:
    setattr(dist, name, counting(name))
train.prepare, fsdp.shard = preparing(train.prepare), sharding(fsdp.shard)
atexit.register(written)
main()
"""


def base_bytes(model: str, element: int = 4) -> tuple[int, int]:
    """Bytes of the base's parameters inside the transformer blocks and outside them (FSDP's root unit), at
    ``element`` bytes a number (float32 by default: the scaling runs train in fp32)."""
    from safetensors import safe_open

    blocks = root = 0
    for path in Path(model).glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                n = element * math.prod(f.get_slice(key).get_shape())
                blocks, root = (blocks + n, root) if ".layers." in key or ".h." in key else (blocks, root + n)
    return blocks, root


def torchrun(ranks: int, script: list[str], threads: int, out_prefix: Path) -> list[str]:
    """Run ``script`` under ``torchrun --standalone`` on ``ranks`` processes; its stdout, or exit with its error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "BYTES_OUT": str(out_prefix)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return [result.stdout, " ".join(cmd[2:])]


def train(ranks: int, fsdp: bool, args, work: Path, model: str, flags: list[str]) -> tuple[dict, list, list, str]:
    """``psoft-export train`` on ``ranks`` processes (COUNTING in place of ``-m psoft_export``): its ``--json``
    summary, its log after 2 warm-up steps, each rank's counted calls and memory, and the command."""
    out = work / f"{Path(model).name}-ranks-{ranks}{'-fsdp' if fsdp else ''}"
    script = work / "counting.py"
    script.write_text(COUNTING)
    argv = [str(script), "train", model, "-o", str(out), "--json", "--warmup", "0", "--device", args.device]
    argv += [*flags, "--batch-size", str(args.global_batch // ranks), "--global-batch-size", str(args.global_batch)]
    stdout, command = torchrun(ranks, argv + (["--fsdp"] if fsdp else []), args.threads, out.with_suffix(".rank"))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][2:]
    ranked = [json.loads(out.with_suffix(f".rank{r}").read_text()) for r in range(ranks)]
    return json.loads(stdout), log, ranked, command


def run(ranks: int, fsdp: bool, args, work: Path) -> dict:
    flags = ["--data", str(DATA / "train.jsonl"), "--method", args.method, "--steps", str(args.steps)]
    flags += ["--seq-len", str(args.seq_len), "--rank", str(args.rank), "--block-size", str(args.block_size)]
    summary, log, ranked, command = train(ranks, fsdp, args, work, args.model, flags)
    calls = ranked[0]["calls"]
    step_calls = [c for c in calls["all_reduce"] if c > 64]  # the step's bucket (the eval loss sums 2 numbers)
    blocks, root = base_bytes(args.model)
    micro = 1  # --batch-size is the rank's share of the global batch: one micro-batch per step
    return {
        "ranks": ranks,
        "mode": "fsdp" if fsdp else "ddp" if ranks > 1 else "one process",
        "seconds": statistics.median(h["seconds"] for h in log),
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in log),
        "trainable": summary["trainable_parameters"],
        "predicted": 4 * (summary["trainable_parameters"] + 4) if ranks > 1 else 0,
        "measured": statistics.median(step_calls) if step_calls else 0,
        "gather_predicted": micro * (2 * blocks + root) if fsdp else 0,
        "gather_measured": sum(calls["all_gather_single"]) / args.steps,
        "final_loss": summary["final_loss"],
        "command": command,
    }


# ------------------------------------------------------------------------------------------ PEFT + accelerate


def peft_config(name: str, args):
    from peft import LoraConfig, OFTConfig, PsoftConfig

    return {
        "peft-psoft": lambda: PsoftConfig(r=args.rank, psoft_alpha=args.rank, target_modules="all-linear"),
        "peft-lora": lambda: LoraConfig(
            r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules="all-linear"
        ),
        "peft-oft": lambda: OFTConfig(oft_block_size=args.block_size, r=0, target_modules="all-linear"),
    }[name]()


def peft_worker(args) -> None:
    """One rank of PEFT + accelerate's DDP (run by torchrun): the global batch of the seeded order our run uses,
    this rank's consecutive share of it, one micro-batch a step; rank 0 writes its per-step records as JSON."""
    import time

    import torch
    from accelerate import Accelerator
    from peft import get_peft_model
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psoft_export import data as data_mod
    from psoft_export.distributed import split

    accelerator = Accelerator(cpu=args.device == "cpu")  # torchrun's environment; MULTI_CPU: gloo
    rank, size = accelerator.process_index, accelerator.num_processes
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kind, records = data_mod.read_jsonl(DATA / "train.jsonl")
    data = data_mod.tokenize(records, kind, tokenizer, args.seq_len)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), peft_config(args.peft_worker, args)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(params, lr=args.lr))
    buckets: list[int] = []

    def counting(state, bucket):  # each gradient bucket DDP all-reduces: its bytes, then the default hook
        buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting)
    order = [rows for epoch in range(args.steps) for rows in data_mod.batches(data, args.global_batch, 0, epoch)]
    records = []
    model.train()
    for rows in order[: args.steps]:
        batch = data_mod.collate([data.rows[i] for i in split(rows, size)[rank]], pad)
        before = len(buckets)
        t0 = time.perf_counter()
        loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
        accelerator.backward(loss)  # DDP's bucketed all-reduces run here, overlapped with the backward
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        tokens = int(batch["attention_mask"].sum()) * size  # every rank's share is full (packed text)
        mean = accelerator.reduce(loss.detach(), "mean").item()  # outside the timed step
        records.append(
            {"seconds": seconds, "tokens_per_s": tokens / seconds, "bytes": sum(buckets[before:]), "loss": mean}
        )
    if rank == 0:
        how = f"{accelerator.distributed_type.value}, {accelerator.state.backend}, {type(model).__name__}"
        Path(os.environ["BYTES_OUT"] + "0").write_text(
            json.dumps({"trainable": trainable, "records": records, "how": how})
        )
    accelerator.wait_for_everyone()  # then leave together (a rank left alone in the teardown can hang)
    accelerator.end_training()


def run_peft(name: str, args, work: Path) -> dict:
    prefix = work / f"{name}.rank"
    argv = [str(Path(__file__).resolve()), "--peft-worker", name, "--model", args.model, "--steps", str(args.steps)]
    argv += ["--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch), "--device", args.device]
    argv += ["--rank", str(args.rank), "--block-size", str(args.block_size), "--lr", str(args.lr)]
    _, command = torchrun(2, argv, args.threads, prefix)
    got = json.loads(Path(str(prefix) + "0").read_text())
    log = got["records"][2:]  # after warm-up, as ours
    return {
        "ranks": 2,
        "mode": f"{name} + accelerate ({got['how']})",
        "seconds": statistics.median(h["seconds"] for h in log),
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in log),
        "trainable": got["trainable"],
        "predicted": 4 * got["trainable"],
        "measured": statistics.median(h["bytes"] for h in log),
        "gather_predicted": 0,
        "gather_measured": 0,
        "final_loss": got["records"][-1]["loss"],
        "command": command,
    }


def scaling(args) -> None:
    counts = [int(r) for r in args.ranks.split(",")]
    peft = [p for p in args.peft.split(",") if p] if args.peft is not None else PEFT_ROWS[args.method]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(r, fsdp, args, Path(tmp)) for r in counts for fsdp in (False, True) if r > 1 or not fsdp]
        rows += [run_peft(name, args, Path(tmp)) for name in peft]
    print(
        f"{args.method} on {args.model}, global batch {args.global_batch} x {args.seq_len} tokens, "
        f"{args.threads} thread(s) per rank, {os.cpu_count()} cores, {args.device}"
    )
    print(
        "| ranks | mode | trainable | step (s) | tokens/s | all-reduce bytes/step: predicted | measured | "
        "all-gather bytes/step: predicted | measured | final loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['mode']} | {r['trainable']:,} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['predicted']:,} | {r['measured']:,.0f} | {r['gather_predicted']:,} | {r['gather_measured']:,.0f} | "
            f"{r['final_loss']:.5f} |"
        )
    ours = next((r for r in rows if r["mode"] == "ddp"), None)
    for other in (r for r in rows if "accelerate" in r["mode"]) if ours else []:
        print(
            f"ours DDP / {other['mode']}: step time {ours['seconds'] / other['seconds']:.2f}x, tokens/s "
            f"{ours['tokens_per_s'] / other['tokens_per_s']:.2f}x, all-reduce bytes "
            f"{ours['measured'] / other['measured']:.3f}x"
        )
    for r in rows:
        print(f"  {r['command']}")


PEFT_ROWS = {"psoft": ["peft-psoft", "peft-lora"], "oft": ["peft-oft"]}


# ------------------------------------------------------------------------------------------ --memory


def llama_shaped(path: Path, layers: int) -> None:
    """The 1B shape of docs/train.md (hidden 2048, intermediate 8192, 16 heads, vocab 32000, untied) with ``layers``
    blocks: random bf16 weights (memory does not depend on their values), the fixture Llama's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    for tokenizer in (ROOT / "fixtures" / "models" / "llama").glob("*token*"):
        shutil.copy(tokenizer, path / tokenizer.name)


def measure(layers: int, args, work: Path) -> list[dict]:
    """One process, 2 ranks DDP and 2 ranks ``--fsdp`` on the ``layers``-block model: a row per rank."""
    model = work / f"llama-2048x{layers}"
    llama_shaped(model, layers)
    blocks, root = base_bytes(str(model), element=2)
    flags = ["--data", str(DATA / "train.jsonl"), "--method", "oft", "--block-size", "32", "--steps", "3"]
    flags += ["--seq-len", "64", "--precision", "bf16"]
    rows = []
    for ranks, fsdp in ((1, False), (2, False), (2, True)):
        summary, _, ranked, command = train(ranks, fsdp, args, work, str(model), flags)
        gathered = (root - root // ranks) + 2 * blocks // layers if fsdp else 0  # the rest of the root, 2 blocks
        held = (blocks + root) // (ranks if fsdp else 1)
        for rank, got in enumerate(ranked):
            m = got["memory"]
            rows.append(
                {
                    "layers": layers,
                    "mode": "--fsdp" if fsdp else "DDP" if ranks > 1 else "one process",
                    "rank": rank,
                    "start": m["start"],
                    "load_peak": m["prepared"]["VmHWM"],
                    "after_load": m["prepared"],
                    "end": m["end"],
                    "held": m["holds"]["sharded"] if "holds" in m else blocks + root,
                    "held_predicted": held,
                    "train_peak": m["end"]["VmHWM"],
                    # predicted above the runtime: the held base, the gathered units, the trainable tensors with
                    # their gradients and 2 Adam states (float32: 16 B each); activations not counted
                    "predicted": held + gathered + 16 * summary["trainable_parameters"],
                    "command": command,
                }
            )
    return rows


def memory(args) -> None:
    args.global_batch = 2  # one row per rank on 2 ranks
    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for layers in args.layers.split(",") for row in measure(int(layers), args, Path(tmp))]
    print(f"OFT b=32, bf16, global batch 2 x 64 tokens, 3 steps, {args.threads} thread(s) per rank, GiB per rank")
    print(
        "| layers | mode | rank | RSS after imports | peak while loading | after loading: anon + file-backed "
        "| base held: predicted | measured | peak while training | at the end: anon + file-backed "
        "| training peak - imports: predicted | measured |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        load, end = r["after_load"], r["end"]
        print(
            f"| {r['layers']} | {r['mode']} | {r['rank']} | {r['start'] / gib:.2f} | {r['load_peak'] / gib:.2f} | "
            f"{load['RssAnon'] / gib:.2f} + {load['RssFile'] / gib:.2f} | {r['held_predicted'] / gib:.3f} | "
            f"{r['held'] / gib:.3f} | {r['train_peak'] / gib:.2f} | {end['RssAnon'] / gib:.2f} + "
            f"{end['RssFile'] / gib:.2f} | {r['predicted'] / gib:.2f} | {(r['train_peak'] - r['start']) / gib:.2f} |"
        )
    counts = sorted({r["layers"] for r in rows})
    if len(counts) > 1:  # per block: the slope between the two largest, to 16 blocks (the 1B shape)
        lo, hi = counts[-2], counts[-1]
        for mode in ("one process", "DDP", "--fsdp"):
            for key in ("load_peak", "train_peak"):
                a, b = (max(r[key] for r in rows if r["layers"] == n and r["mode"] == mode) for n in (lo, hi))
                per = (b - a) / (hi - lo)
                print(
                    f"{mode} {key}: {per / gib:.3f} GiB per block; at 16 blocks {(b + (16 - hi) * per) / gib:.2f} GiB"
                )
    for command in dict.fromkeys(r["command"] for r in rows):
        print(f"  {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "fixtures" / "models" / "llama"))
    parser.add_argument("--method", default="psoft", choices=["psoft", "oft"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="PSOFT and LoRA rank")
    parser.add_argument("--block-size", type=int, default=16, help="OFT block size")
    parser.add_argument("--lr", type=float, default=1e-2, help="PEFT runs' AdamW rate (ours: the method's default)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--ranks", default="1,2", help="comma-separated numbers of ranks (--fsdp rows from 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peft", default=None, help="PEFT rows: peft-psoft, peft-lora, peft-oft ('' for none)")
    parser.add_argument("--memory", action="store_true", help="peak memory per rank on a 1B-shaped Llama instead")
    parser.add_argument("--layers", default="2,4", help="--memory: numbers of blocks of the 1B-shaped model")
    parser.add_argument("--peft-worker", default=None, help=argparse.SUPPRESS)  # one rank of a PEFT row
    args = parser.parse_args()
    if args.peft_worker:
        peft_worker(args)
    elif args.memory:
        memory(args)
    else:
        scaling(args)


if __name__ == "__main__":
    main()
