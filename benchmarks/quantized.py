#!/usr/bin/env python
"""QOFT against QLoRA (issue #17): peak memory and step time of OFT over an NF4 base.

Usage::

    python benchmarks/quantized.py [--device cpu|cuda] [--threads 2] [--precision fp32|bf16]
                                   [--hidden 512] [--intermediate 1376] [--layers 4] [--vocab 2048] [--heads 8]
                                   [--batch 2] [--seq 128] [--block 32] [--warmup 1] [--repeats 3]
                                   [--variants ours-oft-nf4,...] [--no-memory] [--json]

Builds a randomly initialised ``LlamaForCausalLM`` (``benchmarks/train_step.py``'s builder, seeded), saves it as a
scratch checkpoint, and loads it per variant through the training code path (``psoft_export.models.load_trainable``:
``train --quantize nf4`` loads the same way, bitsandbytes ``Linear4bit``, NF4, blocks of 64, no double quantization,
bitsandbytes' lossy CPU repack off), every decoder linear layer targeted (``all-linear``, not ``lm_head``):

* ``ours-oft-nf4``: ours OFTv2 (input-centric, Cayley-Neumann) over the NF4 base: QOFT.
* ``ours-oft-f32``: ours OFTv2 over the float base (``--precision``'s dtype).
* ``peft-qlora``: PEFT ``LoraConfig(r, lora_alpha=r, lora_dropout=0)`` over the same NF4 base: QLoRA. ``r`` is
  chosen so that its trainable parameters match OFT's at ``--block`` (printed; no ``prepare_model_for_kbit_training``,
  whose gradient checkpointing would change what is timed).
* ``peft-oft-nf4``: PEFT ``OFTConfig(oft_block_size=block, r=0)`` over the same NF4 base.
* ``loop-ours-oft-nf4``: ``ours-oft-nf4`` trained by the real ``psoft_export.train.train_loop`` with the CLI's
  defaults (``train_step.LoopRunner``: clipping, schedule, logging, orthogonality on log steps, the CLI's
  collation); a round times 10 loop steps after one. What ``train --quantize nf4`` runs; memory as its bare variant.

A step is forward + causal-LM loss + backward + ``AdamW.step()`` + ``zero_grad`` (``train_step.Runner``; on CUDA
``torch.cuda.synchronize()`` before and after). Timing runs in this process, interleaved round-robin over the
variants, and reports the median of ``--repeats`` rounds. Memory (``--no-memory`` to skip) is measured per variant in
a fresh child process (this script re-executed): on CPU *base* is the RSS the loaded model adds, *peak* the
high-water mark (``VmHWM``, reset after loading) over three steps minus the RSS before loading; on CUDA *base* is
``torch.cuda.memory_allocated()`` after loading and *peak* ``torch.cuda.max_memory_allocated()`` over the steps. The
frozen base's tensor bytes (``psoft_export.quantized.base_nbytes``: parameters, buffers and quant states) are exact.

Bars: the frozen base holds <= 0.3x its float32 bytes (the whole base, and its 4-bit layers); OFT over NF4 steps no
slower than PEFT QLoRA at equal trainable parameters (ratio <= 1.0), bare and through the training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import train_step as ts  # noqa: E402

VARIANTS = ("ours-oft-nf4", "ours-oft-f32", "peft-qlora", "peft-oft-nf4", "loop-ours-oft-nf4")
BASE_BAR = 0.3  # frozen base bytes / its float32 bytes
TIME_BARS = (
    ("ours OFT over NF4 / PEFT QLoRA (equal trainable parameters)", "ours-oft-nf4", "peft-qlora", 1.0),
    ("loop: train --quantize nf4's loop / PEFT QLoRA (bare step)", "loop-ours-oft-nf4", "peft-qlora", 1.0),
)
INFO_RATIOS = (
    ("loop overhead: loop OFT over NF4 / bare OFT over NF4", "loop-ours-oft-nf4", "ours-oft-nf4"),
    ("ours OFT over NF4 / PEFT OFT over NF4", "ours-oft-nf4", "peft-oft-nf4"),
    ("ours OFT over NF4 / ours OFT over float", "ours-oft-nf4", "ours-oft-f32"),
)
MB = 2**20


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="train --precision of every variant")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--block", type=int, default=32, help="OFT block size (LoRA rank follows)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.dtype = "fp32"  # train_step.Runner's autocast switch: off (bf16 here loads the model in bf16, as train does)
    return args


# ----------------------------------------------------------------------------------------------- models
def save_base(args, out: Path) -> None:
    """The seeded float32 Llama of ``train_step.build_base``, saved as a checkpoint the training code loads."""
    model = ts.build_base(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    model.save_pretrained(out)


def lora_rank(model_dir: Path, block: int) -> tuple[int, int, int]:
    """``(r, OFT trainable count, LoRA trainable count at r)``: the LoRA rank whose count is closest to OFT's."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    oft = c.num_hidden_layers * sum((n // block) * block * (block - 1) // 2 for n, _ in shapes)
    per_rank = c.num_hidden_layers * sum(n + m for n, m in shapes)
    r = max(1, round(oft / per_rank))
    return r, oft, r * per_rank


def load_variant(name: str, model_dir: Path, args) -> tuple[torch.nn.Module, list]:
    """The model of ``name`` loaded by the training code, its adapter attached; ``(model, trainable params)``."""
    from psoft_export.checkpoint import loading_kwargs
    from psoft_export.models import load_trainable

    dtype = torch.bfloat16 if args.precision == "bf16" else None
    name = name.removeprefix("loop-")  # the loop variant trains the same model through train_loop
    quantize = None if name == "ours-oft-f32" else "nf4"
    model, _ = load_trainable(model_dir, "causal", None, dtype, args.device, loading_kwargs(model_dir), quantize)
    model.requires_grad_(False)
    if name.startswith("ours-"):
        from psoft_export.adapters import OftConfig, inject

        inject(model, OftConfig(block_size=args.block), targets="all-linear")
    else:
        from peft import LoraConfig, OFTConfig, get_peft_model

        if name == "peft-qlora":
            r = lora_rank(model_dir, args.block)[0]
            cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules="all-linear")
        else:
            cfg = OFTConfig(oft_block_size=args.block, r=0, target_modules="all-linear")
        model = get_peft_model(model, cfg)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def base_bytes(name: str, model_dir: Path, args) -> dict:
    """Exact tensor bytes of the frozen base: whole, and of its 4-bit layers."""
    from psoft_export import quantized
    from psoft_export.checkpoint import loading_kwargs
    from psoft_export.models import load_trainable

    quantize = None if name == "ours-oft-f32" else "nf4"
    model, _ = load_trainable(model_dir, "causal", None, None, "cpu", loading_kwargs(model_dir), quantize)
    layers = 0
    for n in quantized.quantized_modules(model):
        w = model.get_submodule(n).weight
        layers += w.numel() * w.element_size() + w.quant_state.absmax.numel() * w.quant_state.absmax.element_size()
    linear_f32 = sum(
        m.in_features * m.out_features * 4
        for n, m in model.named_modules()
        if n != "lm_head" and hasattr(m, "in_features")
    )
    return {"whole": quantized.base_nbytes(model.requires_grad_(False)), "layers": layers, "layers_f32": linear_f32}


# ----------------------------------------------------------------------------------------------- memory (child)
def child_memory(args) -> dict:
    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  (imported before the baseline: libraries are not the model's memory)
    import peft  # noqa: F401
    import transformers.integrations.bitsandbytes  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import psoft_export.train  # noqa: F401

    model_dir = Path(args.model_dir)
    input_ids = ts.make_inputs(args)
    ts._trim()
    cuda = args.device == "cuda"
    before = torch.cuda.memory_allocated() if cuda else ts._rss_kib("VmRSS") * 1024
    model, params = load_variant(args.child, model_dir, args)
    ts._trim()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
    else:
        base = ts._rss_kib("VmRSS") * 1024 - before
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark from here: loading's scratch is gone
    runner = ts.Runner(args.child, model, params, args, input_ids)
    for _ in range(3):
        runner.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = ts._rss_kib("VmHWM") * 1024 - before
    return {"variant": args.child, "base": base, "peak": peak, "trainable": sum(p.numel() for p in params)}


def measure_memory(args, argv: list[str], model_dir: Path) -> dict[str, dict]:
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    for v in args.variants:
        if v.startswith("loop-"):  # the same model and step as its bare variant: its memory is that one's
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), *ts._strip(argv), "--child", v]
        res = subprocess.run([*cmd, "--model-dir", str(model_dir)], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory child for {v} failed:\n{res.stderr[-3000:]}")
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_memory(args)))
        return 0
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="psoft-bench-qoft-") as scratch:
        model_dir = Path(scratch)
        save_base(args, model_dir)
        rank, oft_count, lora_count = lora_rank(model_dir, args.block)
        sizes = {"nf4": base_bytes("ours-oft-nf4", model_dir, args), "f32": base_bytes("ours-oft-f32", model_dir, args)}
        memory = {} if args.no_memory else measure_memory(args, argv, model_dir)
        input_ids = ts.make_inputs(args)
        runners = {}
        for v in args.variants:
            model, params = load_variant(v, model_dir, args)
            runners[v] = (ts.LoopRunner if v.startswith("loop-") else ts.Runner)(v, model, params, args, input_ids)
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        for round_ in range(args.warmup + args.repeats):
            for v, runner in runners.items():
                t = runner.step()
                if round_ >= args.warmup:
                    times[v].append(t)
        trainable = {v: sum(p.numel() for p in r.params) for v, r in runners.items()}
    median = {v: statistics.median(ts_) for v, ts_ in times.items()}
    whole = sizes["nf4"]["whole"] / sizes["f32"]["whole"]
    layers = sizes["nf4"]["layers"] / sizes["f32"]["layers_f32"]
    result = {
        "command": "python benchmarks/quantized.py " + shlex.join(argv),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "lora_rank": rank,
        "trainable_formula": {"oft": oft_count, "lora": lora_count},
        "trainable": trainable,
        "step_s": median,
        "memory_mb": {v: {k: m[k] / MB for k in ("base", "peak")} for v, m in memory.items()},
        "base_bytes": sizes,
        "ratios": {"base_whole_nf4_f32": whole, "base_4bit_layers_f32": layers},
    }
    bars = [("frozen base (whole) NF4 / float32 bytes", whole, BASE_BAR)]
    bars.append(("frozen base (4-bit layers) NF4 / float32 bytes", layers, BASE_BAR))
    bars += [(label, median[a] / median[b], bar) for label, a, b, bar in TIME_BARS if a in median and b in median]
    info = [(label, median[a] / median[b]) for label, a, b in INFO_RATIOS if a in median and b in median]
    result["bars"] = [{"name": n, "value": x, "bar": b, "pass": x <= b} for n, x, b in bars]
    result["info"] = dict(info)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    unit = "GPU MB (allocated)" if args.device == "cuda" else "RSS MB"
    print(f"| variant | trainable | step (s) | base {unit} | peak {unit} |")
    print("|---|---:|---:|---:|---:|")
    for v in args.variants:
        m = result["memory_mb"].get(v, {})
        base, peak = (f"{m['base']:.1f}", f"{m['peak']:.1f}") if m else ("-", "-")
        print(f"| {v} | {trainable[v]:,} | {median[v]:.3f} | {base} | {peak} |")
    print(f"\nLoRA rank {rank} for OFT block {args.block}: trainable {lora_count:,} vs {oft_count:,} (formula)")
    for n, x, b in bars:
        print(f"{n}: {x:.3f} (bar <= {b}) {'PASS' if x <= b else 'FAIL'}")
    for n, x in info:
        print(f"{n}: {x:.3f} (info)")
    print(f"\ncommand: {result['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
