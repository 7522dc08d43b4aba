"""``psoft-export train``: one plain training loop for PSOFT and OFTv2 adapters, readable top to bottom.

AdamW (fused on CUDA), linear warmup then cosine decay (a pure function of the step), gradient clipping and
accumulation, bf16/fp16 autocast on GPU, optional gradient checkpointing, eval loss, a JSONL log and a loss
curve. Checkpoints hold everything needed to resume (adapter, heads, optimizer, RNG, step), are written
atomically, and a resumed run on CPU reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from psoft_export import adapter_io, distributed, fsdp, models, quantized
from psoft_export import data as data_mod
from psoft_export.adapters import adapter_layers, inject, parse_targets, select_targets
from psoft_export.adapters.cayley import orthogonality_error
from psoft_export.atomic import atomic_file, check_output_dir, check_overlap, mark, output_lock, storage_failure
from psoft_export.checkpoint import (
    file_sha256,
    load_config,
    load_tokenizer,
    loading_kwargs,
    weights_identity,
)
from psoft_export.decomposition import Decomposition, resolve_device
from psoft_export.errors import PsoftExportError, UserInputError
from psoft_export.train_config import TrainConfig, lr_at

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
KEEP_CHECKPOINTS = 2


class TrainingDiverged(PsoftExportError):
    exit_code = 1


class Interrupted(PsoftExportError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Run:
    """What the loop works on, built and validated before anything is written."""

    cfg: TrainConfig
    model: nn.Module
    tokenizer: object
    train_set: data_mod.Dataset
    eval_set: Optional[data_mod.Dataset]
    device: str
    dtype: Optional[torch.dtype]
    heads: list[str]
    total_steps: int
    decomposition: Optional[Decomposition]
    # What the run is tied to, checked on --resume: the data files' hashes and (OFT: PSOFT's decomposition already
    # holds them) the hashes of the targeted base weights.
    identity: dict = field(default_factory=dict)
    world: distributed.World = field(default_factory=distributed.World)  # the ranks under torchrun


def _precision(precision: str, device: str) -> Optional[torch.dtype]:
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device != "cuda":  # CPU autocast runs bf16; fp16 needs CUDA (and its GradScaler)
        raise UserInputError("--precision fp16 needs a CUDA device: use --precision bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def prepare(
    model_dir: str | Path,
    data: str | Path,
    cfg: TrainConfig,
    decomposition: Optional[str | Path] = None,
    eval_data: Optional[str | Path] = None,
    decompose_into: Optional[Path] = None,
    allow_pickle: bool = False,
    world: distributed.World = distributed.ONE_PROCESS,
) -> Run:
    """Validate every input and build the adapted model; raises :class:`UserInputError` before any output.

    PSOFT without ``decomposition`` decomposes the model into ``decompose_into`` (the same code as the
    ``decompose`` command) once the cheap checks have passed.
    """
    from psoft_export.decomposition import decompose

    model_dir = Path(model_dir)
    safe = loading_kwargs(model_dir, allow_pickle)  # validates the weights before any work
    if cfg.method == "psoft" and not safe["use_safetensors"]:
        raise UserInputError(
            f"{model_dir} holds pickled weights only: PSOFT's decomposition reads and hashes "
            "safetensors; convert the weights to model.safetensors, or train --method oft"
        )
    kind, records = data_mod.read_jsonl(data)
    eval_records = data_mod.read_jsonl(eval_data) if eval_data else None
    if eval_records and eval_records[0] != kind:
        raise UserInputError(f"--eval-data is {eval_records[0]} data but --data is {kind} data: use the same kind")
    if cfg.method == "psoft" and decomposition is None and decompose_into is not None:
        cfg = cfg.resolved()
        decomposition = decompose(
            model_dir,
            decompose_into,
            cfg.rank,
            targets=parse_targets(cfg.targets),
            svd=cfg.svd,
            alpha=cfg.alpha,
            seed=cfg.seed,
        ).path
    decomp = None
    if decomposition is not None:
        if cfg.method != "psoft":
            raise UserInputError("--decomposition is for --method psoft: OFT needs no subspace")
        decomp = Decomposition.load(decomposition)
        decomp.check_source(model_dir)
        cfg = _with_decomposition(cfg, decomp)
    cfg = cfg.resolved()
    method_cfg = cfg.method_config()
    _check_positions(model_dir, cfg.seq_len)
    device = resolve_device(cfg.device)
    dtype = _precision(cfg.precision, device)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    classes = data_mod.class_names(records) if kind == "classify" else None
    train_set = data_mod.tokenize(records, kind, tokenizer, cfg.seq_len, classes)
    eval_set = data_mod.tokenize(eval_records[1], kind, tokenizer, cfg.seq_len, classes) if eval_records else None
    torch.manual_seed(cfg.seed)  # new heads are initialized from this seed
    load_on = fsdp.load_device(cfg.fsdp, device)  # --fsdp: read on the host, then only a shard on the device
    model, heads = models.load_trainable(
        model_dir, kind, classes, dtype, load_on, safe, cfg.quantize, tokenizer.pad_token_id
    )
    inject(
        model,
        method_cfg,
        _targets(model, cfg, decomp, heads),
        decomp.factors_for(model, device) if decomp is not None else None,
    )
    for head in heads:
        model.get_submodule(head).requires_grad_(True)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.fsdp:
        fsdp.shard(model, world, device)  # the frozen base sharded over the ranks (psoft_export/fsdp.py)
    per_epoch = math.ceil(len(train_set) / cfg.batch_size / cfg.grad_accum / world.size)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * per_epoch))
    identity = {
        "data": file_sha256(Path(data)),
        "eval_data": file_sha256(Path(eval_data)) if eval_data else None,
        # (pickled checkpoints, read with --allow-pickle, are not hashed: ModelSource reads safetensors only)
        "base_weights": None
        if decomp is not None or not safe["use_safetensors"]
        else weights_identity(model_dir, list(adapter_layers(model)), getattr(model, "base_model_prefix", "")),
    }
    return Run(cfg, model, tokenizer, train_set, eval_set, device, dtype, heads, total, decomp, identity, world)


def _check_positions(model_dir: Path, seq_len: int) -> None:
    """Refuse a --seq-len the model has no position embeddings for (an index error deep in the forward pass)."""
    config = load_config(model_dir)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and seq_len > limit:
        raise UserInputError(
            f"--seq-len {seq_len} exceeds the {limit} positions of {model_dir}: use --seq-len {limit} or less"
        )


def _with_decomposition(cfg: TrainConfig, decomp: Decomposition) -> TrainConfig:
    """Rank, alpha and init come from the decomposition; a value the user gave that differs is refused."""
    m = decomp.manifest
    if cfg.rank is not None and cfg.rank != m["rank"]:
        raise UserInputError(
            f"--rank {cfg.rank} was given but decomposition {decomp.path} has rank {m['rank']}: "
            "drop --rank (the decomposition's rank is used) or re-run decompose with that rank"
        )
    if cfg.alpha is not None and float(cfg.alpha) != float(m["alpha"]):
        raise UserInputError(
            f"--alpha {cfg.alpha:g} was given but decomposition {decomp.path} was built with alpha "
            f"{float(m['alpha']):g}: drop --alpha or re-run decompose --alpha {cfg.alpha:g}"
        )
    return cfg.resolved(rank=m["rank"], alpha=float(m["alpha"]), init=m.get("init", "psoft"))


def _targets(model: nn.Module, cfg: TrainConfig, decomp: Optional[Decomposition], heads: list[str]) -> list[str]:
    """The modules to adapt: ``--targets`` on this model (or, by default, what the decomposition covers), never
    a module inside a new head (a decomposition of a masked-LM checkpoint also covers its LM head)."""
    names = set(dict(model.named_modules()))
    if decomp is not None and cfg.targets == "all-linear":
        chosen = [t for t in decomp.aligned(model) if t in names]
    else:
        chosen = select_targets(model, parse_targets(cfg.targets))
    return [t for t in chosen if not any(t == h or t.startswith(h + ".") for h in heads)]


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_paths(out_dir: Path) -> list[Path]:
    return sorted((out_dir / CHECKPOINTS).glob("step-*.pt"))


def save_checkpoint(out_dir: Path, run: Run, optimizer, step: int, history: list[dict]) -> Path:
    """``checkpoints/step-NNNNNNN.pt`` written to a temporary name and renamed; keeps the newest few. Under torchrun
    rank 0 writes it and every rank returns its name."""
    folder = out_dir / CHECKPOINTS
    path = folder / f"step-{step:07d}.pt"
    if not run.world.is_main:
        return path
    trainable = {n: p.detach().cpu() for n, p in run.model.named_parameters() if p.requires_grad}
    state = {
        "step": step,
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "history": history,
        "rng": torch.get_rng_state(),
        "config": asdict(run.cfg),
        "identity": run.identity,
        "cuda_rng": torch.cuda.get_rng_state() if run.device == "cuda" else None,
        "world_size": run.world.size,
        "global_batch": run.cfg.batch_size * run.cfg.grad_accum * run.world.size,
    }
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # serialized first (adapter-sized): torch.save's own writer hides ENOSPC's errno
    torch.save(state, buffer)
    try:
        atomic_file(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
    except Exception as exc:
        reason = storage_failure(exc)
        if reason is None:
            raise
        raise UserInputError(
            f"cannot write checkpoint {path}: {reason}; earlier checkpoints are kept: free space "
            "and continue with --resume"
        ) from None
    for old in _checkpoint_paths(out_dir)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(out_dir: Path, cfg: TrainConfig) -> dict:
    paths = _checkpoint_paths(out_dir)
    if not paths:
        raise UserInputError(f"--resume: {out_dir} has no checkpoints: start without --resume")
    try:
        state = torch.load(paths[-1], map_location="cpu", weights_only=True)
        stored = TrainConfig(**state["config"])
    except Exception as exc:  # truncated or damaged file: torch/pickle raise many types
        earlier = f" (the one before it, {paths[-2].name}, is kept)" if len(paths) > 1 else ""
        raise UserInputError(
            f"--resume: checkpoint {paths[-1]} is damaged ({type(exc).__name__}): move it away to "
            f"resume from the previous checkpoint{earlier}, or start again"
        ) from None
    ignore = {"save_every", "eval_every", "log_every", "device", "grad_checkpointing", "fsdp"}
    if stored.global_batch_size is not None and stored.global_batch_size == cfg.global_batch_size:
        ignore |= {"batch_size", "grad_accum"}  # another split of the same global batch: distributed.check_resume
    changed = [
        f.name for f in fields(TrainConfig) if f.name not in ignore and getattr(stored, f.name) != getattr(cfg, f.name)
    ]
    if changed:
        raise UserInputError(
            f"--resume: {', '.join('--' + c.replace('_', '-') for c in changed)} differ from the "
            "interrupted run: resume with the same options"
        )
    return state


def _check_identity(run: Run, stored: Optional[dict]) -> None:
    """``--resume`` continues the same run: the same data files and the same base weights."""
    if not stored:  # checkpoints written before 0.2.0
        return
    for name, flag in (("data", "--data"), ("eval_data", "--eval-data")):
        if stored.get(name) != run.identity.get(name):
            raise UserInputError(
                f"--resume: {flag} is not the file the interrupted run trained on (its sha256 "
                "differs): resume with the same data, or start a new run"
            )
    if stored.get("base_weights") and stored["base_weights"] != run.identity.get("base_weights"):
        raise UserInputError(
            "--resume: the model's targeted weights differ from the interrupted run's: resume with "
            "the same base model, or start a new run"
        )


# ---------------------------------------------------------------------------------------------- the loop


class _Signals:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and exits 130/143."""

    def __init__(self):
        self.received: Optional[int] = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _autocast(run: Run):
    if run.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.device, dtype=run.dtype)


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _inputs(batch: dict) -> dict:
    """The model's inputs: without the attention mask when it masks nothing (packed blocks), which is what the
    model assumes anyway and lets attention take its plain causal path."""
    if bool(batch["attention_mask"].all()):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


@torch.no_grad()
def evaluate(run: Run, data: data_mod.Dataset) -> float:
    """Mean loss over ``data`` (token-weighted for language modelling, row-weighted for classification)."""
    run.model.eval()
    total, count = 0.0, 0
    batches = data_mod.batches(data, run.cfg.batch_size, seed=0, epoch=0)
    for rows, counted in distributed.eval_share(run.world, batches, run.cfg.fsdp):  # --fsdp: ranks in lockstep
        batch = _to(data_mod.collate([data.rows[i] for i in rows], run.tokenizer.pad_token_id), run.device)
        with _autocast(run):
            loss = run.model(**batch).loss.float()
        n = len(rows) if data.kind == "classify" else int((batch["labels"][:, 1:] != data_mod.IGNORE).sum())
        n *= counted
        total, count = total + float(loss) * n, count + n
    total, count = run.world.sum([total, count], run.device)
    run.model.train()
    return total / max(count, 1)


def orthogonality(model: nn.Module) -> float:
    """Largest ``||R^T R - I||_F`` over the adapter's rotations (what the Cayley-Neumann series leaves)."""
    worst = 0.0
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            R = layer.rotation_blocks() if hasattr(layer, "rotation_blocks") else layer.orthogonal_part()
            worst = max(worst, float(orthogonality_error(R).max()))
    return worst


def _diverged(value: float, step: int, last_good: Optional[Path], out_dir: Path) -> str:
    """Advice that works: ``--resume`` only when a checkpoint exists to resume from."""
    if last_good is not None:
        return (
            f"loss became {value} at step {step + 1}; last good checkpoint {last_good}: lower --lr (or use "
            "--cayley exact) and continue with --resume"
        )
    reuse = (
        f" (reuse the subspace: --decomposition {out_dir / adapter_io.DECOMPOSITION_DIR})"
        if (out_dir / adapter_io.DECOMPOSITION_DIR).is_dir()
        else ""
    )
    return (
        f"loss became {value} at step {step + 1}, before any checkpoint: start again with a lower --lr "
        f"(or --cayley exact) and another -o{reuse}"
    )


def train_loop(
    run: Run,
    out_dir: Path,
    resume: bool = False,
    progress: Optional[Callable] = None,
    on_log: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Run the optimisation, checkpointing into ``out_dir/checkpoints``; return the summary."""
    cfg, model = run.cfg, run.model
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused on CPU too: one kernel for every parameter (0.4 ms a step against 1.6 ms one by one, on the benchmark
    # Llama's 28 adapters; docs/benchmarks.md).
    fused = run.device in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay, fused=fused)
    scaler = torch.amp.GradScaler("cuda") if run.dtype == torch.float16 else None
    start, history = 0, []
    if resume:
        state = load_checkpoint(out_dir, cfg)
        _check_identity(run, state.get("identity"))
        distributed.check_resume(state, cfg, run.world, model)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and run.device == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        start, history = state["step"], state["history"]
    else:
        torch.manual_seed(cfg.seed)
    distributed.start_together(run.world, params, run.identity)
    feed = distributed.step_batches(run.train_set, cfg, run.world, run.tokenizer.pad_token_id, start)
    model.train()
    steps = range(start, run.total_steps)
    bar = progress(steps) if progress else steps
    last_good = _checkpoint_paths(out_dir)[-1] if resume else None
    with _Signals() as signals:
        for step in bar:
            t0 = time.perf_counter()
            distributed.reseed(run.world, cfg.seed, step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, run.total_steps, cfg.peak_lr, cfg.warmup)
            losses, tokens = [], 0
            for batch, divisor in next(feed):  # divisor: --grad-accum, or the global batch's share (distributed.py)
                tokens += int(batch["attention_mask"].sum())  # on the host, before the copy: no device sync
                with _autocast(run):
                    loss = model(**_to(_inputs(batch), run.device)).loss / divisor
                (scaler.scale(loss) if scaler else loss).backward()
                losses.append(loss.detach())
            if run.world.size > 1:  # sum the trainable gradients (still scaled: fp16 skips a step on every rank)
                losses, tokens, agreed = distributed.all_reduce_step(params, losses, tokens, signals.received)
            if scaler:
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            # One host sync per step (not three per micro-batch): the loss and the norm together. A non-finite loss
            # stops the run here, before the optimizer step, so the parameters stay those of the last good step.
            loss_sum, grad_norm = torch.stack([torch.stack(losses).sum().float(), norm.float()]).tolist()
            if not math.isfinite(loss_sum):
                raise TrainingDiverged(_diverged(loss_sum, step, last_good, out_dir))
            (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            record = {
                "step": step + 1,
                "loss": loss_sum,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / seconds,
                "seconds": seconds,
            }
            done = step + 1 == run.total_steps
            if run.eval_set is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                record["eval_loss"] = evaluate(run, run.eval_set)
            if (step + 1) % cfg.log_every == 0 or done:
                record["orthogonality_error"] = orthogonality(model)
            history.append(record)
            if on_log:
                on_log(record)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            received = signals.received if run.world.size == 1 else agreed  # ranks stop at the same step
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or received:
                last_good = save_checkpoint(out_dir, run, optimizer, step + 1, history)
            if received:
                code = 130 if received == signal.SIGINT else 143
                raise Interrupted(
                    f"interrupted at step {step + 1}; checkpoint {last_good} written: continue with --resume", code
                )
    if last_good is None or not last_good.name.endswith(f"{run.total_steps:07d}.pt"):
        save_checkpoint(out_dir, run, optimizer, run.total_steps, history)  # nothing trained is lost to a later failure
    return {"steps": run.total_steps, "history": history}


# ---------------------------------------------------------------------------------------------- the verb


def train(
    model_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    decomposition: Optional[str | Path] = None,
    eval_data: Optional[str | Path] = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[Callable] = None,
    on_log: Optional[Callable[[dict], None]] = None,
    allow_pickle: bool = False,
) -> dict:
    """Train an adapter of ``model_dir`` on ``data`` and write the adapter directory ``out_dir``.

    The adapter's subspace lives in ``out_dir/decomposition``: a copy of ``decomposition`` or computed here.
    Bad input fails before ``out_dir`` exists; a failed run keeps its checkpoints for ``--resume``.
    Under torchrun (``WORLD_SIZE`` set) this process is one rank of a data-parallel run (distributed.py); ranks
    other than 0 write nothing and return None.
    """
    out_dir = Path(out_dir).absolute()
    world = distributed.detect()
    cfg = cfg.for_world(world.size)  # a --global-batch-size the ranks cannot split is refused before any wait
    with distributed.process_group(world, cfg.device) as world:
        if not world.is_main:
            return _train_replica(model_dir, data, out_dir, cfg, decomposition, eval_data, resume, allow_pickle, world)
        with output_lock(out_dir):
            summary = _train_locked(
                model_dir,
                data,
                out_dir,
                cfg,
                decomposition,
                eval_data,
                resume,
                overwrite,
                progress,
                on_log,
                allow_pickle,
                world,
            )
        distributed.meet(world, "done")
        return summary


def _train_replica(
    model_dir,
    data,
    out_dir: Path,
    cfg: TrainConfig,
    decomposition,
    eval_data,
    resume: bool,
    allow_pickle: bool,
    world: distributed.World,
) -> None:
    """A rank other than 0: trains its share and writes nothing; it reads the subspace (and, resuming, the
    checkpoint) that rank 0 wrote into ``out_dir``, which therefore lies on a filesystem every node shares."""
    stored = out_dir / adapter_io.DECOMPOSITION_DIR
    subspace = stored if resume or decomposition is None else decomposition  # as rank 0 reads it
    if cfg.method == "psoft" and subspace == stored and not resume:
        distributed.wait_for_main(world, "setup")  # rank 0 decomposes the base into out_dir first
    needed = ([out_dir] if resume else []) + ([stored] if cfg.method == "psoft" and subspace == stored else [])
    for path in needed:
        if not path.is_dir():
            raise UserInputError(
                f"rank {world.rank}: {path}, written by rank 0, is not visible here: -o must be "
                "on a filesystem every node shares"
            )
    run = prepare(
        model_dir,
        data,
        cfg,
        subspace if cfg.method == "psoft" else None,
        eval_data,
        allow_pickle=allow_pickle,
        world=world,
    )
    distributed.meet(world, "setup")
    train_loop(run, out_dir, resume)
    fsdp.for_saving(run)  # --fsdp: takes part in gathering what rank 0 saves
    distributed.meet(world, "done")


def _train_locked(
    model_dir,
    data,
    out_dir: Path,
    cfg: TrainConfig,
    decomposition,
    eval_data,
    resume: bool,
    overwrite: bool,
    progress,
    on_log,
    allow_pickle: bool,
    world: distributed.World = distributed.ONE_PROCESS,
) -> dict:
    stored = out_dir / adapter_io.DECOMPOSITION_DIR
    inputs = [model_dir, data, eval_data, decomposition]
    if resume:
        if not out_dir.is_dir():
            raise UserInputError(f"--resume: {out_dir} does not exist: start without --resume")
        check_overlap(out_dir, [i for i in inputs if i is not decomposition])
        run = prepare(
            model_dir,
            data,
            cfg,
            stored if cfg.method == "psoft" else None,
            eval_data,
            allow_pickle=allow_pickle,
            world=world,
        )
    else:
        check_output_dir(out_dir, overwrite, inputs)
        staging = out_dir.with_name(f".{out_dir.name}.decomposition-{os.getpid()}")
        try:
            run = prepare(
                model_dir,
                data,
                cfg,
                decomposition,
                eval_data,
                decompose_into=staging,
                allow_pickle=allow_pickle,
                world=world,
            )
            if out_dir.exists():
                shutil.rmtree(out_dir)  # check_output_dir made sure it is ours (marker) and no input
            out_dir.mkdir(parents=True)
            mark(out_dir, "train")
            if run.cfg.method == "psoft":
                shutil.copytree(decomposition, stored) if decomposition is not None else os.replace(staging, stored)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    distributed.meet(world, "setup")  # the other ranks read out_dir from here on
    history = train_loop(run, out_dir, resume, progress, on_log)["history"]
    peft_form = save_trained(fsdp.for_saving(run), out_dir, model_dir, history)  # --fsdp: gathered to rank 0
    return {
        "output": str(out_dir),
        "steps": run.total_steps,
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "eval_loss": history[-1].get("eval_loss"),
        "trainable_parameters": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        "seconds": sum(h["seconds"] for h in history),
        "device": run.device,
        "peft_form": peft_form,
        "ranks": world.size,
        "global_batch": run.cfg.batch_size * run.cfg.grad_accum * world.size,
        "config": {"rank": run.cfg.rank if run.cfg.method == "psoft" else None, "lr": run.cfg.lr},
    }


class SaveFailed(PsoftExportError):
    """Training finished but writing the adapter did not; the final checkpoint holds the trained state."""


def save_trained(run: Run, out_dir: Path, model_dir: str | Path, history: list[dict]) -> dict:
    """Write the log, the adapter files and the loss plot. The final checkpoint is already on disk, so a failure
    here loses nothing: the error says how to finish with ``--resume`` (which skips straight to this step)."""
    cfg = run.cfg
    try:
        _write_log(out_dir, history)
        extra = {
            "train": {
                **asdict(cfg),
                "steps": run.total_steps,
                "final_loss": history[-1]["loss"],
                "eval_loss": history[-1].get("eval_loss"),
                "data_sha256": run.identity.get("data"),
            },
            "base_weights": run.identity.get("base_weights"),
            **quantized.adapter_record(run.model, cfg.quantize, run.decomposition),
        }
        report = adapter_io.save_adapter(
            out_dir,
            run.model,
            cfg.method_config(),
            base_model=_base_model_id(model_dir),
            task=run.train_set.kind,
            classes=run.train_set.labels or None,
            heads=run.heads,
            extra=extra,
        )
    except Exception as exc:
        reason = storage_failure(exc) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        checkpoint = next(reversed(_checkpoint_paths(out_dir)), None)
        error = SaveFailed(
            f"training finished ({run.total_steps} steps) but writing the adapter failed: {reason}; "
            f"the trained state is kept in {checkpoint}: fix the cause and run the same command with "
            "--resume to write the adapter without retraining"
        )
        error.exit_code = 2 if storage_failure(exc) or isinstance(exc, UserInputError) else 1
        raise error from exc
    try:
        _plot(history, out_dir / PLOT_FILE)
    except Exception:  # a plot is a convenience: never fail a finished run for it
        pass
    return report


def _base_model_id(model_dir: str | Path) -> str:
    """What ``base_model_name_or_path`` must hold so ``AutoPeftModel...`` finds the base from any directory."""
    return str(Path(model_dir).resolve())


def _write_log(out_dir: Path, history: list[dict]) -> None:
    atomic_file(out_dir / LOG_FILE, lambda tmp: tmp.write_text("".join(json.dumps(h) + "\n" for h in history)))


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
