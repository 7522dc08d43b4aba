#!/usr/bin/env python
"""Benchmark one training step of ours against PEFT (issue #4).

Usage::

    python benchmarks/train_step.py [--device cpu|cuda] [--threads 2] [--dtype fp32|bf16]
                                    [--hidden 768] [--intermediate 2048] [--layers 4] [--vocab 4096]
                                    [--heads 12] [--batch 4] [--seq 256] [--warmup 2] [--repeats 5]
                                    [--variants frozen,ours-psoft-r32,...] [--no-memory] [--profile] [--json]

Builds a randomly initialised ``LlamaForCausalLM`` (seeded, float32, from a ``LlamaConfig``; no files), then one
model copy per variant, every linear layer of the decoder targeted (``all-linear``: not ``lm_head``):

* ``frozen``: no adapter; the floor. Nothing in the model trains, but forward hooks make the outputs of layer 0's
  ``q_proj``/``k_proj``/``v_proj`` require grad (as leaves), so backward runs through every layer exactly as far as
  with an adapter (adapters leave the inputs of layer 0's q/k/v without grad too). There is no parameter to step,
  so the floor's step is forward + loss + backward only (AdamW on the adapters' few parameters is ~1 ms).
* ``ours-psoft-r32`` / ``ours-psoft-r128``: ``psoft_export.adapters`` PSOFT (exact Cayley, vectors on, default).
* ``peft-psoft-r128``: PEFT ``PsoftConfig(r=128)`` (its defaults: exact Cayley, full SVD).
* ``peft-lora-r32``: PEFT ``LoraConfig(r=32, lora_alpha=32, lora_dropout=0)``.
* ``ours-oft-b32``: ours OFTv2 (Cayley-Neumann, 6 terms, input-centric).
* ``peft-oft-b32``: PEFT ``OFTConfig(oft_block_size=32, r=0)`` (its defaults: Cayley-Neumann, 5 terms).
* ``wc-oft-b32``: ours OFT with a weight-centric forward ``y = x (W R^T)^T``, the rotated weight formed on every
  call (OFTv1 style), to show the input-centric gain.
* ``loop-ours-psoft-r32`` / ``loop-ours-psoft-r128`` / ``loop-ours-oft-b32`` (issue #19): the same models trained by
  the real ``psoft_export.train.train_loop`` with the CLI's defaults (AdamW, warmup + cosine schedule, clipping at
  1.0, orthogonality every ``--log-every`` 10 steps, the divergence check, the CLI's collation of packed rows with
  their attention mask and labels). A round runs 11 loop steps and counts the mean of the last 10 (one log step
  among them), timed between iterations of the loop, so all per-step work of the loop is inside. Their bars:
  against PEFT's bare step (0.9 / 1.0 / 1.0) and against our own bare step (the loop's overhead, 1.05).

A step is forward + causal-LM loss (labels = inputs) + backward + ``AdamW.step()`` + ``zero_grad``. Timing runs in
this one process, interleaved round-robin across variants (``--warmup`` untimed rounds, then ``--repeats`` timed
rounds), and reports the median. Peak memory (``--no-memory`` to skip) is measured per variant in a fresh child
process (this script re-executed): on CPU the child builds the base model, reads its RSS (*base*), injects the
adapter, resets the kernel's high-water mark (``/proc/self/clear_refs`` 5, so SVD scratch does not count), runs
three steps and reads ``VmHWM``; reported is *peak - base*: adapter buffers + parameters + gradients + optimizer
state + the step's activations and scratch (glibc's mmap threshold is pinned at 64 KiB in the child so freed
tensors leave the RSS). On CUDA it is ``torch.cuda.max_memory_allocated`` over the steps minus the allocation
before injection. The table also shows the bytes autograd saved for backward in one step (``saved MB``, distinct
storages, via ``saved_tensors_hooks``), a deterministic cross-check.

Prints the table, the ratios, PASS/FAIL for the bars of issue #4 and the exact command; ``--json`` prints one JSON
object instead. ``--profile`` adds a ``torch.profiler`` table of ours PSOFT r=128's top operators.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = (
    "frozen",
    "ours-psoft-r32",
    "ours-psoft-r128",
    "peft-psoft-r128",
    "peft-lora-r32",
    "ours-oft-b32",
    "peft-oft-b32",
    "wc-oft-b32",
    "loop-ours-psoft-r32",
    "loop-ours-psoft-r128",
    "loop-ours-oft-b32",
)
# (name, numerator, denominator, bar): time ratios must be <= bar.
TIME_BARS = (
    ("ours PSOFT r=32 / PEFT LoRA r=32", "ours-psoft-r32", "peft-lora-r32", 1.0),
    ("ours PSOFT r=128 / PEFT PSOFT r=128", "ours-psoft-r128", "peft-psoft-r128", 0.85),
    ("ours OFT b=32 / PEFT OFT b=32", "ours-oft-b32", "peft-oft-b32", 1.0),
)
# Issue #19: what the user runs (the real ``train_loop``, defaults and all) against PEFT's bare step, and the loop's
# own overhead over our bare step.
LOOP_BARS = (
    ("loop: ours PSOFT r=32 / PEFT LoRA r=32 (bare)", "loop-ours-psoft-r32", "peft-lora-r32", 0.9),
    ("loop: ours PSOFT r=128 / PEFT PSOFT r=128 (bare)", "loop-ours-psoft-r128", "peft-psoft-r128", 1.0),
    ("loop: ours OFT b=32 / PEFT OFT b=32 (bare)", "loop-ours-oft-b32", "peft-oft-b32", 1.0),
    ("loop overhead: loop PSOFT r=32 / bare PSOFT r=32", "loop-ours-psoft-r32", "ours-psoft-r32", 1.05),
    ("loop overhead: loop PSOFT r=128 / bare PSOFT r=128", "loop-ours-psoft-r128", "ours-psoft-r128", 1.05),
    ("loop overhead: loop OFT b=32 / bare OFT b=32", "loop-ours-oft-b32", "ours-oft-b32", 1.05),
)
LOOP_BLOCK = 10  # steps timed per round of a loop variant: one --log-every period at the default of 10
MEMORY_BAR = ("ours PSOFT r=32 peak / PEFT LoRA r=32 peak", "ours-psoft-r32", "peft-lora-r32", 1.0)
MB = 2**20


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: weights stay float32, the step runs under torch.autocast(bfloat16)",
    )
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12, help="attention heads (= kv heads); head dim = hidden / heads")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant child processes for peak memory")
    p.add_argument("--profile", action="store_true", help="torch.profiler top-operator table for ours-psoft-r128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: measure one variant's memory
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v.split(":")[0] not in VARIANTS or not _path_ok(v.removeprefix("loop-"))]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    return args


def _path_ok(variant: str) -> bool:
    """``ours-psoft-rN:PATH`` forces ``PsoftLinear.path`` (auto|token|merged|autograd) for a before/after table."""
    if ":" not in variant:
        return True
    from psoft_export.adapters.fused import PATHS

    name, path = variant.split(":", 1)
    return name.startswith("ours-psoft-") and path in PATHS


# ----------------------------------------------------------------------------------------------- models
def build_base(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 256),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(dtype=torch.float32)
    return model.to(args.device).train()


class _WeightCentricOft(torch.nn.Module):
    """OFTv1-style forward: form ``W R^T`` on every call, then ``x (W R^T)^T + b``; shares the OFT layer's ``q``."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.layer.base_layer
        return torch.nn.functional.linear(x, self.layer.merged_weight().to(x.dtype), base.bias)


def _make_requires_grad(_module, _inputs, output):
    return output.requires_grad_(True) if not output.requires_grad else output


def make_variant(name: str, base: torch.nn.Module, copy_base: bool = True):
    """``(model, trainable parameters)`` for a variant, on a deep copy of ``base``."""
    name = name.removeprefix("loop-")  # the loop variants train the same model, through train_loop
    model = copy.deepcopy(base) if copy_base else base
    model.requires_grad_(False)
    if name == "frozen":
        attn = model.model.layers[0].self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.register_forward_hook(_make_requires_grad)
        return model, []
    if name.startswith("ours-"):
        from psoft_export.adapters import OftConfig, PsoftConfig, inject

        name, _, path = name.partition(":")
        kind, size = name.split("-")[1], int(name.rsplit("-", 1)[1][1:])
        cfg = PsoftConfig(rank=size, alpha=float(size)) if kind == "psoft" else OftConfig(block_size=size)
        layers = inject(model, cfg, targets="all-linear")
        for layer in layers.values():
            if path:
                layer.path = path
    elif name == "wc-oft-b32":
        from psoft_export.adapters import OftConfig, inject
        from psoft_export.adapters.surgery import _parent

        layers = inject(model, OftConfig(block_size=32), targets="all-linear")
        for lname, layer in layers.items():
            parent, child = _parent(model, lname)
            setattr(parent, child, _WeightCentricOft(layer))
    else:
        from peft import LoraConfig, OFTConfig, get_peft_model
        from peft import PsoftConfig as PeftPsoftConfig

        if name == "peft-psoft-r128":
            cfg = PeftPsoftConfig(r=128, psoft_alpha=128, target_modules="all-linear")
        elif name == "peft-lora-r32":
            cfg = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        elif name == "peft-oft-b32":
            cfg = OFTConfig(oft_block_size=32, r=0, target_modules="all-linear")
        else:
            raise ValueError(name)
        model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


# ----------------------------------------------------------------------------------------------- the step
class Runner:
    def __init__(self, name: str, model, params, args, input_ids) -> None:
        self.name, self.model, self.params, self.args, self.input_ids = name, model, params, args, input_ids
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.autocast = args.dtype == "bf16"

    def step(self) -> float:
        dev = self.args.device
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def saved_bytes(self) -> int:
        """Bytes autograd saves for backward in one forward pass (distinct storages; parameters/buffers excluded)."""
        skip = {t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())}
        seen: dict[int, int] = {}

        def pack(t):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in skip:
                    seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(device_type=self.args.device, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        del loss
        return sum(seen.values())


class _BlockDone(Exception):
    """Ends a block of loop steps (raised from the progress iterator, so no final checkpoint is written)."""


class LoopRunner(Runner):
    """The real training loop (``psoft_export.train.train_loop`` with its defaults: clipping, schedule, logging at
    ``--log-every`` 10, orthogonality on log steps, divergence check) on packed rows of random tokens, fed through
    the CLI's own collation (attention mask and labels). One ``step()`` runs :data:`LOOP_BLOCK` + 1 loop steps and
    returns the mean wall time of the last :data:`LOOP_BLOCK` (the first builds AdamW's state), measured between
    consecutive iterations of the loop, so everything the loop does per step is inside."""

    def __init__(self, name: str, model, params, args, input_ids) -> None:
        import tempfile
        from types import SimpleNamespace

        from psoft_export import data as data_mod
        from psoft_export.train import Run
        from psoft_export.train_config import TrainConfig

        super().__init__(name, model, params, args, input_ids)
        self.opt = None
        cfg = TrainConfig(
            method="oft" if "-oft-" in name else "psoft",
            batch_size=args.batch,
            seq_len=args.seq,
            steps=10**6,
            lr=1e-4,
            seed=args.seed,
        )
        g = torch.Generator().manual_seed(args.seed + 2)
        rows = [torch.randint(0, args.vocab, (args.seq,), generator=g) for _ in range(8 * args.batch)]
        train_set = data_mod.Dataset("causal", [{"input_ids": r, "labels": r} for r in rows])
        self.run = Run(
            cfg=cfg,
            model=model,
            tokenizer=SimpleNamespace(pad_token_id=0),
            train_set=train_set,
            eval_set=None,
            device=args.device,
            dtype=torch.bfloat16 if args.dtype == "bf16" else None,
            heads=[],
            total_steps=10**6,
            decomposition=None,
        )
        self.out = Path(tempfile.mkdtemp(prefix="psoft-bench-loop-"))

    def step(self) -> float:
        from psoft_export.train import train_loop

        stamps: list[float] = []

        def progress(steps):
            for step in steps:
                if self.args.device == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                if len(stamps) == LOOP_BLOCK + 2:
                    raise _BlockDone()
                yield step

        try:
            train_loop(self.run, self.out, progress=progress)
        except _BlockDone:
            pass
        return (stamps[-1] - stamps[1]) / LOOP_BLOCK


def make_inputs(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)


# ----------------------------------------------------------------------------------------------- memory (child)
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    if platform.system() == "Linux":
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def child_memory(args) -> dict:
    torch.set_num_threads(args.threads)
    base = build_base(args)
    input_ids = make_inputs(args)
    _trim()
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_kib("VmRSS") * 1024
    model, params = make_variant(args.child, base, copy_base=False)
    runner = Runner(args.child, model, params, args, input_ids)
    _trim()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(3):
        runner.step()
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"variant": args.child, "peak_minus_base": peak - before}


def measure_memory(args, argv: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    for v in args.variants:
        if v.startswith("loop-"):  # the same model and adapter as its bare variant
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), *_strip(argv), "--child", v]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory child for {v} failed:\n{res.stderr[-3000:]}")
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])["peak_minus_base"] / MB
    return out


def _strip(argv: list[str]) -> list[str]:
    """Drop flags the child must not see."""
    drop = {"--json", "--profile", "--no-memory"}
    keep, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
            continue
        if a in drop:
            continue
        if a in ("--variants", "--repeats", "--warmup"):
            skip_next = True
            continue
        if a.startswith(("--variants=", "--repeats=", "--warmup=")):
            continue
        keep.append(a)
    return keep


# ----------------------------------------------------------------------------------------------- profile
def profile_variant(runner: Runner, rows: int = 22) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.args.device == "cuda" else [])
    runner.step()
    with profile(activities=acts) as prof:
        for _ in range(2):
            runner.step()
    key = "self_cuda_time_total" if runner.args.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ----------------------------------------------------------------------------------------------- main
def flop_model(args) -> dict[str, float]:
    """Predicted FLOPs per step (forward + backward) of each variant, from the matmul shapes alone.

    Frozen: ``4 T o i`` per linear layer (forward + input gradient; layer 0's q/k/v skip the input gradient), the
    head, and attention ``12 T seq h`` per layer. Extras per linear layer: PSOFT per token ``4 T r (i + o) + 6 T r^2``
    (PEFT and ``:token``/``:autograd``); ours ``auto`` as chosen by ``fused.choose``; LoRA ``6 T r (i + o)`` (A and B
    both train); OFT ``6 T i b``; weight-centric OFT ``4 o i b + 2 T o i`` (form and differentiate ``W R^T``, plus
    the full weight gradient ``dY^T x``)."""
    from psoft_export.adapters.fused import choose

    h, m, L, V, T = args.hidden, args.intermediate, args.layers, args.vocab, args.batch * args.seq
    shapes = [(h, h)] * 4 + [(m, h), (m, h), (h, m)]  # (out, in) of q, k, v, o, gate, up, down
    frozen = 4 * T * (sum(o * i for o, i in shapes) * L + V * h) + 12 * T * args.seq * h * L - 3 * 2 * T * h * h

    def psoft(r: int, path: str) -> float:
        total = 0.0
        for o, i in shapes:
            fwd_m, bwd_m = choose(T, o, i, r, "token" if path in ("token", "autograd") else path)
            weight = 2 * o * r * (r + i) + o * i
            total += 2 * T * r * (i + o) + 2 * T * r * r  # u, g, dM
            total += weight if fwd_m else 2 * T * r * (r + o)
            total += weight if bwd_m else 2 * T * r * (r + i)
        return L * total

    extra = {
        "frozen": 0.0,
        "peft-psoft-r128": psoft(128, "token"),
        "peft-lora-r32": L * sum(6 * T * 32 * (i + o) for o, i in shapes),
        "ours-oft-b32": L * sum(6 * T * i * 32 for o, i in shapes),
        "peft-oft-b32": L * sum(6 * T * i * 32 for o, i in shapes),
        "wc-oft-b32": L * sum(4 * o * i * 32 + 2 * T * o * i for o, i in shapes),
    }
    out = {}
    for v in args.variants:
        name, _, path = v.removeprefix("loop-").partition(":")
        if name.startswith("ours-psoft-r"):
            out[v] = frozen + psoft(int(name.rsplit("r", 1)[1]), path or "auto")
        else:
            out[v] = frozen + extra[name]
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(child_memory(args)))
        return 0
    torch.set_num_threads(args.threads)
    command = "python benchmarks/train_step.py " + " ".join(shlex.quote(a) for a in argv)

    base = build_base(args)
    input_ids = make_inputs(args)
    runners = []
    for v in args.variants:
        model, params = make_variant(v, base)
        runners.append((LoopRunner if v.startswith("loop-") else Runner)(v, model, params, args, input_ids))
    del base
    gc.collect()

    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(args.warmup):
        for r in runners:
            r.step()
    for _ in range(args.repeats):
        for r in runners:
            times[r.name].append(r.step())
    med = {k: statistics.median(v) for k, v in times.items()}
    saved = {r.name: r.saved_bytes() / MB for r in runners if not isinstance(r, LoopRunner)}
    prof_table = None
    if args.profile:
        target = next((r for r in runners if r.name == "ours-psoft-r128"), None)
        if target is not None:
            prof_table = profile_variant(target)
    del runners
    gc.collect()
    memory = {} if args.no_memory else measure_memory(args, argv)

    floor = med.get("frozen")
    bars = []
    for label, num, den, bar in TIME_BARS + LOOP_BARS:
        if num in med and den in med:
            ratio = med[num] / med[den]
            bars.append({"bar": f"{label} <= {bar}", "ratio": ratio, "pass": ratio <= bar})
    label, num, den, bar = MEMORY_BAR
    if num in memory and den in memory:
        ratio = memory[num] / memory[den]
        bars.append({"bar": f"{label} <= {bar}", "ratio": ratio, "pass": ratio <= bar})

    result = {
        "command": command,
        "device": args.device,
        "torch": torch.__version__,
        "threads": args.threads,
        "dtype": args.dtype,
        "size": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab", "heads", "batch", "seq")},
        "median_s": med,
        "times_s": times,
        "peak_mb": memory,
        "saved_mb": saved,
        "flops": flop_model(args),  # predicted per step
        "bars": bars,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "n/a"
    print(
        f"train step: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}, {args.heads} heads, batch {args.batch} x {args.seq} tokens, all-linear, "
        f"{args.device} {args.threads} threads, {args.dtype}; torch {torch.__version__}, PEFT {peft_version}; "
        f"median of {args.repeats} interleaved (warmup {args.warmup})"
    )
    print()
    flops = result["flops"]
    head = (
        f"{'variant':<26}{'median s':>10}{'min s':>9}{'max s':>9}{'x frozen':>10}{'GFLOP':>8}{'FLOP x fr':>10}"
        f"{'peak MB':>10}{'saved MB':>10}"
    )
    print(head)
    print("-" * len(head))
    for v in args.variants:
        ts = times[v]
        xf = f"{med[v] / floor:.2f}" if floor else "-"
        pk = f"{memory[v]:.0f}" if v in memory else "-"
        ff = flops[v] / flops["frozen"] if "frozen" in flops else float("nan")
        print(
            f"{v:<26}{med[v]:>10.3f}{min(ts):>9.3f}{max(ts):>9.3f}{xf:>10}{flops[v] / 1e9:>8.1f}{ff:>10.2f}"
            f"{pk:>10}{saved[v] if v in saved else float('nan'):>10.0f}"
        )
    print()
    for b in bars:
        print(f"{'PASS' if b['pass'] else 'FAIL'}  {b['bar']}: {b['ratio']:.3f}")
    if "wc-oft-b32" in med and "ours-oft-b32" in med:
        print(f"info  weight-centric OFT / ours input-centric OFT: {med['wc-oft-b32'] / med['ours-oft-b32']:.2f}x")
    if prof_table:
        print("\nprofile: ours-psoft-r128, 2 steps\n" + prof_table)
    print(f"\ncommand: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
