"""The ``psoft-export`` command line: argument parsing, progress display and exit codes, nothing else.

Exit codes: 0 success, 1 verification failed or an unexpected error, 2 bad input (one line, no traceback;
``--debug`` shows it), 130/143 interrupted.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback

import click

from psoft_export import __version__
from psoft_export.defaults import DEFAULT_NITER, DEFAULT_OVERSAMPLE
from psoft_export.errors import PsoftExportError, Terminated, forget_signals, interrupt, raise_pending, received
from psoft_export.train_config import QUANTIZE_CHOICES

ALLOW_PICKLE = "Also read pickled .bin weights (with weights_only=True); by default only safetensors are read."
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(command):
    """Turn the package's errors into one line and an exit code; full tracebacks only with ``--debug``."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        forget_signals()
        try:
            result = command(*args, **kwargs)
            raise_pending()  # a signal whose exception a finalizer swallowed still ends the run as interrupted
            return result
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Terminated:
            _fail("terminated", 143)
        except Exception as exc:
            signum = received()
            if signum is not None:  # a library turned the signal's exception into its own (an interrupted import)
                if debug:
                    traceback.print_exc()
                _fail("interrupted", 130) if signum == signal.SIGINT else _fail("terminated", 143)
            if not isinstance(exc, PsoftExportError):
                raise
            if debug:
                traceback.print_exc()
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)

    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="psoft-export")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def cli(debug: bool) -> None:
    """Orthogonal fine-tuning (PSOFT, OFTv2) from decomposition to deployment.

    \b
    Typical chain:
      psoft-export decompose MODEL -o DECOMP --rank 32
      psoft-export train MODEL --data data.jsonl --decomposition DECOMP -o ADAPTER
      psoft-export merge MODEL --adapter ADAPTER --to gguf -o OUT
      psoft-export verify OUT --model MODEL --adapter ADAPTER
    """


@cli.command(context_settings=CONTEXT)
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Decomposition directory to write.")
@click.option("--rank", type=int, required=True, help="Rank r of the principal subspace kept per weight.")
@click.option(
    "--targets",
    default="all-linear",
    show_default=True,
    help="all-linear (every linear layer but the output head), names (q_proj,v_proj) or a regex.",
)
@click.option(
    "--svd",
    type=click.Choice(["exact", "full", "lowrank"]),
    default="exact",
    show_default=True,
    help="exact: the exact subspace (float32 Gram matrix's top eigenvectors refined in float64); "
    "full: torch.linalg.svd in float32 (PEFT's); lowrank: randomized (torch.svd_lowrank), fastest, "
    "approximate on flat spectra.",
)
@click.option("--niter", type=int, default=DEFAULT_NITER, show_default=True, help="Power iterations for --svd lowrank.")
@click.option(
    "--oversample",
    type=int,
    default=DEFAULT_OVERSAMPLE,
    show_default=True,
    help="Extra columns for --svd lowrank (q = rank + oversample). 0 with --niter 10 reproduces PEFT.",
)
@click.option(
    "--init",
    type=click.Choice(["psoft", "pissa"]),
    default="psoft",
    show_default=True,
    help="psoft: A = V_r^T (orthonormal rows); pissa: symmetric sqrt(S) split.",
)
@click.option("--alpha", type=float, default=None, help="Scaling numerator, s = alpha / r (default: r, so s = 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the lowrank random projection.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the SVDs run; auto uses CUDA when available.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-plot", is_flag=True, help="Skip spectra.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON on stdout.")
@handle_errors
def decompose(
    model_dir, out_dir, rank, targets, svd, niter, oversample, init, alpha, seed, device, overwrite, no_plot, as_json
) -> None:
    """Extract the SVD principal subspace of a model's target weights, once.

    Streams weights tensor by tensor from MODEL_DIR's safetensors (the model is never built) and writes
    OUT/decomposition.safetensors (A, B and singular values per target), OUT/manifest.json (content hash of
    each source weight, settings, versions, energy kept per target) and OUT/spectra.png. Later steps read it
    and refuse it for a model whose weights differ.
    """
    import json

    from tqdm import tqdm

    from psoft_export.adapters.surgery import parse_targets
    from psoft_export.decompose import decompose as run
    from psoft_export.decompose import format_table, ill_posed_warning

    def progress(jobs):
        return tqdm(jobs, desc="decompose", unit="tensor", disable=None, leave=False)

    result = run(
        model_dir,
        out_dir,
        rank,
        targets=parse_targets(targets),
        svd=svd,
        niter=niter,
        oversample=oversample,
        init=init,
        alpha=alpha,
        seed=seed,
        device=device,
        overwrite=overwrite,
        plot=not no_plot,
        progress=progress,
    )
    m = result.manifest
    if as_json:
        summary = {k: m[k] for k in ("rank", "alpha", "init", "svd", "niter", "oversample", "device", "seconds")}
        gaps = {n: {"gap": t["gap"], "f32_angle": t["f32_angle"]} for n, t in m["targets"].items()}
        click.echo(
            json.dumps(
                {
                    "output": str(result.path),
                    **summary,
                    "targets": len(m["targets"]),
                    "kinds": m["kinds"],
                    "ill_posed": m["ill_posed"],
                    "gaps": gaps,
                },
                indent=2,
            )
        )
        return
    click.echo(format_table(m))
    if m["ill_posed"]:
        click.echo(ill_posed_warning(m), err=True)
    click.echo(
        f"decomposed {len(m['targets'])} weights at rank {m['rank']} ({m['svd']} SVD on {m['device']}) "
        f"in {m['seconds']:.1f} s -> {result.path}"
    )


def _help(name: str) -> str:
    from psoft_export.train_config import TrainConfig

    return TrainConfig.__dataclass_fields__[name].metadata["help"]


@cli.command(context_settings=CONTEXT)
@click.argument("model_dir", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="JSONL: {text}, {prompt, completion} or {text, label}.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Adapter directory (PEFT format).")
@click.option("--method", type=click.Choice(["psoft", "oft"]), default="psoft", show_default=True)
@click.option(
    "--decomposition", type=click.Path(), help="Directory written by 'decompose' (PSOFT); default: decompose now."
)
@click.option("--rank", type=int, default=None, help=_help("rank"))
@click.option("--alpha", type=float, default=None, help=_help("alpha"))
@click.option("--block-size", type=int, default=32, show_default=True, help=_help("block_size"))
@click.option("--targets", default="all-linear", show_default=True, help=_help("targets"))
@click.option("--steps", type=int, default=None, help=_help("steps"))
@click.option("--epochs", type=float, default=None, help=_help("epochs"))
@click.option("--lr", type=float, default=None, help=_help("lr"))
@click.option("--batch-size", type=int, default=8, show_default=True, help=_help("batch_size"))
@click.option("--grad-accum", type=int, default=1, show_default=True, help=_help("grad_accum"))
@click.option("--global-batch-size", type=int, default=None, help=_help("global_batch_size"))
@click.option("--fsdp", is_flag=True, help=_help("fsdp"))
@click.option("--seq-len", type=int, default=256, show_default=True, help=_help("seq_len"))
@click.option("--cayley", type=click.Choice(["exact", "neumann"]), default=None, help=_help("cayley"))
@click.option("--neumann-terms", type=int, default=6, show_default=True, help=_help("neumann_terms"))
@click.option("--no-vectors", is_flag=True, help="PSOFT without the tunable vectors (strictly orthogonal R).")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help=_help("precision"),
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--grad-checkpointing", is_flag=True, help=_help("grad_checkpointing"))
@click.option("--eval-data", type=click.Path(), default=None, help="JSONL of the same kind for the eval loss.")
@click.option("--eval-every", type=int, default=0, show_default=True, help=_help("eval_every"))
@click.option("--save-every", type=int, default=0, show_default=True, help=_help("save_every"))
@click.option("--log-every", type=int, default=10, show_default=True, help=_help("log_every"))
@click.option("--warmup", type=float, default=0.05, show_default=True, help=_help("warmup"))
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help=_help("max_grad_norm"))
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help=_help("weight_decay"))
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUTPUT from its last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True, help=_help("seed"))
@click.option("--quantize", type=click.Choice(QUANTIZE_CHOICES), default=None, help=_help("quantize"))
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@handle_errors
def train(
    model_dir, data, out_dir, decomposition, no_vectors, eval_data, resume, overwrite, allow_pickle, as_json, **options
) -> None:
    """Train a PSOFT or OFTv2 adapter on a JSONL data set; writes a PEFT-compatible adapter directory.

    OUTPUT holds adapter_config.json + adapter_model.safetensors (PEFT loads them), the subspace
    (decomposition/), train_log.jsonl, loss.png and checkpoints/ for --resume. Under torchrun
    (torchrun --nproc_per_node N -m psoft_export train ...) each rank trains on its share of every
    global batch and rank 0 writes OUTPUT (docs/train.md).
    """
    import json

    from tqdm import tqdm

    from psoft_export.train import TrainConfig
    from psoft_export.train import train as run

    cfg = TrainConfig(vectors=not no_vectors, **options)
    interactive = sys.stderr.isatty()
    total = {}

    def progress(steps):
        total["steps"] = steps.stop
        return tqdm(
            steps,
            desc=f"train {cfg.method}",
            unit="step",
            disable=not interactive,
            initial=steps.start,
            total=steps.stop,
        )

    def on_log(record):  # where no progress bar can be drawn (CI, nohup, notebooks): a plain line now and then
        steps = total.get("steps", 0)
        every = max(1, steps // 20) if steps else 1
        if not interactive and (record["step"] % every == 0 or record["step"] == steps):
            click.echo(
                f"train: step {record['step']}/{steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:.0f} tok/s",
                err=True,
            )

    summary = run(
        model_dir,
        data,
        out_dir,
        cfg,
        decomposition=decomposition,
        eval_data=eval_data,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        on_log=on_log,
        allow_pickle=allow_pickle,
    )
    if summary is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    form = summary["peft_form"]
    if not form["faithful"]:
        click.echo(
            f"note: PEFT's PSOFT files were not written: {form['reason']} (> {form['tolerance']:.0e}); the "
            "adapter is complete in psoft-export's format, and 'merge --to safetensors --split' writes its "
            "exact LoRA form, which PEFT loads",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    evals = f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else ""
    click.echo(
        f"trained {cfg.method} for {summary['steps']} steps in {summary['seconds']:.1f} s on {summary['device']}: "
        f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}{evals}; "
        f"{summary['trainable_parameters']:,} trainable parameters -> {summary['output']}"
    )


def _print_report(report: dict) -> None:
    from psoft_export.verification import report_lines

    for line in report_lines(report):
        click.echo(f"  {line}")


@cli.command(context_settings=CONTEXT)
@click.argument("model_dir", type=click.Path())
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(), help="Adapter directory (ours or PEFT's).")
@click.option("--to", "fmt", required=True, help="Export format: safetensors, onnx or gguf.")
@click.option("--split", is_flag=True, help="Write the base and the adapter separately (LoRA form for PSOFT).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Output directory.")
@click.option(
    "--dtype",
    default="source",
    show_default=True,
    help="source, float32, float16 or bfloat16 (per format). source: merged safetensors and GGUF keep the "
    "source checkpoint's dtype (bf16 stays bf16); the other routes write float32.",
)
@click.option(
    "--quant",
    default=None,
    help="GGUF quantization of the 2-D weights: q8_0 or q4_0 (q4_0 keeps the output head Q8_0).",
)
@click.option(
    "--lora-rank", type=int, default=None, help="OFT to a LoRA-only target: rank of the truncated-SVD approximation."
)
@click.option("--no-verify", is_flag=True, help="Skip running the export in its runtime against PyTorch.")
@click.option(
    "--strict", is_flag=True, help="If verification fails, keep nothing (default: keep the export as OUT.unverified)."
)
@click.option(
    "--inputs", type=click.Path(), default=None, help='JSONL of {"text"} to verify on (default: fixed sentences).'
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@handle_errors
def merge(
    model_dir,
    adapter_dir,
    fmt,
    split,
    out_dir,
    dtype,
    quant,
    lora_rank,
    no_verify,
    strict,
    inputs,
    overwrite,
    allow_pickle,
    as_json,
) -> None:
    """Fold the rotations into the weights and export (safetensors, ONNX, GGUF), verified against PyTorch.

    \b
    merged (default)  safetensors: HF model dir | onnx: optimum export with KV cache | gguf: model.gguf
    --split           safetensors: adapter/ + lora/ | onnx: model.onnx + adapter.onnx_adapter
                      | gguf: model.gguf + adapter.gguf (llama.cpp LoRA)
    The export is written to a temporary directory and renamed only after verification passes; one that fails is
    kept as OUT.unverified (exit 1) unless --strict. Merged safetensors and GGUF are streamed tensor by tensor (the
    model is never built): peak memory about one tensor plus the adapter; verification holds one float32 model.
    """
    import json

    from psoft_export.merge import merge as run
    from psoft_export.verify import read_inputs

    summary = run(
        model_dir,
        adapter_dir,
        out_dir,
        fmt,
        split=split,
        dtype=dtype,
        quant=quant,
        lora_rank=lora_rank,
        verify=not no_verify,
        overwrite=overwrite,
        texts=read_inputs(inputs),
        allow_pickle=allow_pickle,
        strict=strict,
        on_stage=lambda name: click.echo(f"merge: {name} ...", err=True),
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    kind = "split" if split else "merged"
    dtype = quant or summary["dtype"] + (", the source's dtype" if summary["dtype_from"] == "source" else "")
    click.echo(f"exported {kind} {fmt} ({dtype}) -> {summary['output']}: {', '.join(summary['files'])}")
    if summary["lora_approximation"]:
        click.echo(
            f"  rank-{lora_rank} LoRA approximation of OFT: max relative weight error "
            f"{summary['lora_approximation']['max_rel_err']:.3e}"
        )
    if summary["verification"]:
        _print_report(summary["verification"])
    if summary.get("quantized_base"):
        _print_quantized(summary["quantized_base"])


def _print_quantized(q: dict) -> None:
    click.echo(
        f"  trained over a {q['quant_type']} base: folded into {q['dequantized']} dequantized weights, written "
        f"as {q['written_as']}"
    )
    gap = q.get("vs_trained_model")
    if gap:
        click.echo(
            f"  vs the 4-bit model as trained: rel err {gap['as_trained_rel_err']:.3e}; vs bitsandbytes' CPU "
            f"inference kernel (bf16 absmax): {gap['bnb_cpu_inference_rel_err']:.3e}"
        )


@cli.command(context_settings=CONTEXT)
@click.argument("export_dir", type=click.Path())
@click.option("--model", "model_dir", required=True, type=click.Path(), help="The base model directory.")
@click.option(
    "--adapter", "adapter_dir", required=True, type=click.Path(), help="The adapter the export was made from."
)
@click.option(
    "--inputs", type=click.Path(), default=None, help='JSONL of {"text"} to verify on (default: fixed sentences).'
)
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@handle_errors
def verify(export_dir, model_dir, adapter_dir, inputs, allow_pickle, as_json) -> None:
    """Run an export in its own runtime and compare it with the PyTorch model plus adapter.

    Exit 0 within tolerance, 1 beyond it, 2 for bad input.
    """
    import json

    from psoft_export.verify import verify as run

    report = run(export_dir, model_dir, adapter_dir, inputs, allow_pickle)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"{report.export}: {'ok' if report.ok else 'FAILED'}")
        _print_report(report.to_dict())
    if not report.ok:
        sys.exit(1)


def _quiet_interrupts(unraisable, _default=sys.unraisablehook) -> None:
    """No "Exception ignored in ..." traceback for a signal that landed in a finalizer: it is recorded, and acted on."""
    if not isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
        _default(unraisable)


def main() -> None:
    try:
        _main()
    except SystemExit as exc:
        if exc.code in (130, 143):  # interrupted: every ``finally`` has run; nothing in the interpreter's teardown
            sys.stdout.flush()  # (a library's finalizer, a signal handler already reset) may change the exit code
            sys.stderr.flush()
            os._exit(exc.code)
        raise


def _main() -> None:
    # Recorded as well as raised, so a signal that lands in a finalizer still stops the run before it publishes.
    # train installs its own handlers around the loop (checkpoint first).
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    sys.unraisablehook = _quiet_interrupts
    try:
        code = cli.main(prog_name="psoft-export", standalone_mode=False)
    except click.UsageError as exc:  # a bad option value, a missing argument: one line too, like our own errors
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # bare `psoft-export`: the help
            click.echo(exc.ctx.get_help())
            sys.exit(2)
        where = exc.ctx.command_path if exc.ctx is not None else "psoft-export"
        _fail(f"{exc.format_message()} (see '{where} --help')", 2)
    except click.Abort:
        _fail("interrupted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
