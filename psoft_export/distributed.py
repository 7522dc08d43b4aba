"""Data parallelism for ``psoft-export train`` under ``torchrun``, on ``torch.distributed`` (no runtime of our own).

Every rank holds the whole model (the frozen base and the adapter) and takes its own slice of each global batch.
After the backward pass the gradients of the trainable tensors only (the adapter, new heads) are summed over the
ranks in one flat all-reduce, together with the step's loss, token count and stop request; the frozen base is
never communicated. The model is not wrapped in ``DistributedDataParallel``: DDP buckets and hooks every
parameter that requires a gradient, overlaps the reduction with backward, and needs ``find_unused_parameters``
and ``no_sync`` for gradient accumulation. Here the trainable set is small (a few MB even for a 70B base), the
reduction happens once per optimizer step, after the last micro-batch, and one explicit ``all_reduce`` of one
bucket is easy to check: ``4 x (trainable parameters + 4)`` bytes per step.

The average is exact (up to the order of float sums). A global batch is G consecutive rows of the seeded order that
the single-process loop uses (:func:`psoft_export.data.batches` with batch size G), split between the ranks and
then into micro-batches.
Each micro-batch's mean loss is weighted by its share of the loss terms of the whole global batch (label tokens
for language modelling, rows for classification), which every rank counts itself from the rows, so the summed
gradients are those of the mean over all tokens of the global batch: what one process computes on that batch.

Rank 0 alone writes (the output directory, the subspace, checkpoints, the log, the adapter, progress output);
the others read what it wrote (the subspace, the checkpoint to resume from) and wait for it on the rendezvous
store, whose waits have their own, long timeout: rank 0's decomposition or adapter check may take longer than a
collective should ever wait.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from psoft_export import data as data_mod
from psoft_export.errors import PsoftExportError, UserInputError

TIMEOUT_ENV = "PSOFT_EXPORT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
# How long the other ranks wait for rank 0's own work (decomposing the base, checking and writing the adapter),
# which grows with the model; a rank 0 that dies ends the wait earlier (torchrun stops the job).
MAIN_WORK_TIMEOUT = timedelta(hours=24)
KEY = "psoft_export"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; one process is ``World()`` (rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: Optional[object] = field(default=None, compare=False, repr=False)  # the rendezvous store (size > 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` (every ``size``-th from ``rank``); all of them in one process."""
        return items if self.size == 1 else items[self.rank :: self.size]

    def sum(self, values: list, device: str) -> list:
        """``values`` summed over the ranks (float64); unchanged in one process."""
        if self.size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()


ONE_PROCESS = World()


def detect(env=os.environ) -> World:
    """The world ``torchrun`` describes in ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; one process without them."""
    if "WORLD_SIZE" not in env:
        return ONE_PROCESS
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        try:
            values[name] = int(env[name])
        except (KeyError, ValueError):
            raise UserInputError(
                f"WORLD_SIZE={env['WORLD_SIZE']} is set but {name}={env.get(name)!r} is not a rank "
                "number: launch with torchrun, which sets WORLD_SIZE, RANK and LOCAL_RANK"
            ) from None
    size, rank = values["WORLD_SIZE"], values["RANK"]
    if size < 1 or not 0 <= rank < size:
        raise UserInputError(f"RANK={rank} is not a rank of WORLD_SIZE={size}: launch with torchrun")
    return World(rank, size, values["LOCAL_RANK"])


def timeout_seconds(env=os.environ) -> float:
    value = env.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserInputError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds > 0")
    return seconds


@contextmanager
def process_group(world: World, device: str) -> Iterator[World]:
    """Join the other ranks (gloo on CPU, NCCL on CUDA with device ``LOCAL_RANK``; ``device`` as ``--device``
    gives it) and leave at exit.

    The rendezvous and every collective wait at most ``PSOFT_EXPORT_DIST_TIMEOUT`` seconds (default 300); a rank
    that cannot reach the others says which address it tried.
    """
    if world.size == 1:
        yield world
        return
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise UserInputError(
            f"WORLD_SIZE={world.size} is set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun"
        )
    seconds = timeout_seconds()
    timeout = timedelta(seconds=seconds)
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(world.local_rank)  # "cuda" then means this rank's device everywhere
    try:
        _reach(world, addr, port, seconds)
        # The rendezvous by hand (what init_process_group does for env://) to keep the store for waits on rank 0.
        store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            store=dist.PrefixStore("default_pg", store),
            rank=world.rank,
            world_size=world.size,
            timeout=timeout,
            device_id=torch.device("cuda", world.local_rank) if cuda else None,
        )
    except (RuntimeError, ValueError, OSError) as exc:  # DistStoreError, DistNetworkError, refused, timed out
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"rank {world.rank} of {world.size} could not reach the others at {addr}:{port} within {seconds:g} s "
            f"({reason[:200]}): check that every rank was launched (torchrun --nnodes/--nproc_per_node), the "
            f"--master_addr/--master_port or --rdzv_endpoint and the firewall; {TIMEOUT_ENV} sets the timeout"
        ) from None
    try:
        yield replace(world, store=store)
    finally:
        dist.destroy_process_group()


def _reach(world: World, addr: str, port: str, seconds: float) -> None:
    """Connect to the rendezvous store once, in Python, before torch does: an unreachable address is then one
    error of ours instead of c10d's retry log and C++ stack trace. Rank 0 hosts the store unless torchrun does."""
    if world.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((addr, int(port)), timeout=min(5.0, seconds)).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise OSError(exc.strerror or str(exc) or type(exc).__name__) from None
            time.sleep(0.2)


def wait_for_main(world: World, name: str) -> None:
    """Wait until rank 0 has reached ``meet(world, name)`` (it has written what the others read)."""
    if world.size > 1 and not world.is_main:
        _wait(world, [f"{KEY}/{name}/0"], name)


def meet(world: World, name: str) -> None:
    """Every rank arrives at ``name`` before any goes on: a barrier on the store with the long timeout of rank 0's
    own work. After the last one (``done``) a collective barrier keeps rank 0, which may host the store, alive until
    every rank has seen it."""
    if world.size == 1:
        return
    world.store.set(f"{KEY}/{name}/{world.rank}", "1")
    _wait(world, [f"{KEY}/{name}/{r}" for r in range(world.size)], name)
    if name == "done":
        dist.barrier()


def _wait(world: World, keys: list[str], name: str) -> None:
    try:
        world.store.wait(keys, MAIN_WORK_TIMEOUT)
    except RuntimeError as exc:  # rank 0 ended (its own error says why) and took the store with it
        raise PsoftExportError(
            f"rank {world.rank}: the other ranks stopped before '{name}' ({str(exc).strip()[:120]}): see rank 0's error"
        ) from None


# ------------------------------------------------------------------------------------------------ batches


def step_batches(data: data_mod.Dataset, cfg, world: World, pad_id: int, start: int) -> Iterator:
    """For each optimizer step from ``start``: this rank's micro-batches as ``(batch, divisor)`` pairs, the loss of
    each micro-batch to be divided by its divisor.

    One process without ``--global-batch-size`` runs the loop as it always has: ``--grad-accum`` consecutive
    batches of the seeded order, each loss divided by ``--grad-accum``. Otherwise the step's rows are the next
    global batch of G = batch x grad-accum x ranks rows, and the divisor is the global batch's loss terms over the
    micro-batch's, so the sum over all ranks is the mean over all tokens of the global batch.
    """
    if world.size == 1 and cfg.global_batch_size is None:
        return _accumulated(data, cfg, pad_id, start)
    return _global(data, cfg, world, pad_id, start)


def _accumulated(data: data_mod.Dataset, cfg, pad_id: int, start: int) -> Iterator:
    batches = data_mod.iterate(data, cfg.batch_size, cfg.seed, pad_id, start=start * cfg.grad_accum)
    while True:
        yield ((next(batches), cfg.grad_accum) for _ in range(cfg.grad_accum))


def _global(data: data_mod.Dataset, cfg, world: World, pad_id: int, start: int) -> Iterator:
    size = cfg.batch_size * cfg.grad_accum * world.size
    terms = [loss_terms(row, data.kind) for row in data.rows]
    per_epoch = len(data_mod.batches(data, size, cfg.seed, 0))
    step = start
    while True:
        epoch, offset = divmod(step, per_epoch)
        for rows in data_mod.batches(data, size, cfg.seed, epoch)[offset:]:
            total = sum(terms[i] for i in rows)
            micro = [_micro(part, cfg.batch_size, terms) for part in split(rows, world.size)]
            mine = [(data_mod.collate([data.rows[i] for i in m], pad_id), total / n) for m, n in micro[world.rank]]
            if getattr(cfg, "fsdp", False):  # every FSDP forward is a collective: as many as the busiest rank
                filler = [next(i for i in rows if terms[i])] if any(micro) else []
                mine += [(data_mod.collate([data.rows[i] for i in filler], pad_id), math.inf)] * (
                    max(map(len, micro)) - len(mine)
                )  # a real row whose loss has weight 0 (loss / inf): no gradient, no loss
            yield mine
            step += 1


def _micro(rows: list, batch: int, terms: list) -> list[tuple[list, int]]:
    """``rows`` in micro-batches of ``batch`` with their loss terms; one without terms adds nothing and is left out."""
    chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    return [(m, n) for m, n in ((m, sum(terms[i] for i in m)) for m in chunks) if n]


def eval_share(world: World, batches: list, lockstep: bool) -> list[tuple[list, bool]]:
    """This rank's eval batches, each with whether it counts. ``lockstep`` (``--fsdp``, whose forwards are
    collectives): padded with uncounted repeats of the first batch to as many as the busiest rank has."""
    mine = [(b, True) for b in world.shard(batches)]
    if lockstep and world.size > 1 and batches:
        mine += [(batches[0], False)] * (len(batches[0 :: world.size]) - len(mine))
    return mine


def loss_terms(row: dict, kind: str) -> int:
    """How many terms ``row`` adds to the model's mean loss: its label tokens after the shift, or 1 (a class)."""
    if kind == "classify":
        return 1
    return int((row["labels"][1:] != data_mod.IGNORE).sum())


def split(rows: list, parts: int) -> list[list]:
    """``rows`` in ``parts`` consecutive slices whose sizes differ by at most one (a short last batch too)."""
    q, r = divmod(len(rows), parts)
    bounds = [i * q + min(i, r) for i in range(parts + 1)]
    return [rows[bounds[i] : bounds[i + 1]] for i in range(parts)]


# ------------------------------------------------------------------------------------------------ the step


def start_together(world: World, params: list[torch.Tensor], identity: dict) -> None:
    """Every rank trains on the files rank 0 trains on (their hashes: a node with other data would otherwise train
    on it silently) and starts from rank 0's trainable tensors (as DDP does), whatever its own initialisation did."""
    if world.size == 1:
        return
    main = [identity if world.is_main else None]
    dist.broadcast_object_list(main, src=0)
    differ = [name for name in identity if identity[name] != main[0].get(name)]
    if differ:
        raise UserInputError(
            f"rank {world.rank}: {', '.join(differ)} differ from rank 0's (sha256): every node must "
            "hold the same model and data files"
        )
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        dist.broadcast(flat, src=0)
        _unflatten(flat, params, lambda p, chunk: p.copy_(chunk))


def all_reduce_step(
    params: list[torch.Tensor], losses: list[torch.Tensor], tokens: int, received: Optional[int]
) -> tuple[list[torch.Tensor], int, Optional[int]]:
    """Sum the trainable gradients, the weighted losses, the token count and the stop requests of every rank in one
    float32 all-reduce (``4 x (trainable parameters + 4)`` bytes). Returns the global loss (as a one-element list
    of a tensor, as the loop keeps them), the global token count and the signal every rank acts on."""
    device = params[0].device
    local = torch.stack(losses).sum().float() if losses else torch.zeros((), device=device)  # a rank with no rows
    stats = torch.tensor(
        [tokens, received == signal.SIGINT, received == signal.SIGTERM], dtype=torch.float32, device=device
    )
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    bucket = torch.cat(grads + [local.reshape(1).to(device), stats])
    dist.all_reduce(bucket)
    offset = _unflatten(bucket, params, _set_grad)
    tokens, interrupts, terminates = bucket[offset + 1 :].tolist()
    agreed = signal.SIGTERM if terminates else signal.SIGINT if interrupts else None
    return [bucket[offset]], int(tokens), agreed


def _set_grad(p: torch.Tensor, chunk: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = chunk.to(p.dtype).clone()
    else:
        p.grad.copy_(chunk)


def _unflatten(flat: torch.Tensor, params: list[torch.Tensor], put) -> int:
    offset = 0
    for p in params:
        put(p, flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return offset


def reseed(world: World, seed: int, step: int) -> None:
    """Under torchrun each rank draws its own dropout masks from (seed, step, rank), so a resumed run draws the
    same masks without per-rank RNG states in the checkpoint. One process keeps its single RNG stream."""
    if world.size > 1:
        torch.manual_seed((seed * 1_000_003 + step * world.size + world.rank) % 2**63)


# ------------------------------------------------------------------------------------------------ resume


def dropout_in(model: nn.Module) -> Optional[str]:
    """The first active dropout of ``model`` (a module with p > 0, or the attention's), or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"{name} p={module.p:g}"
    p = getattr(getattr(model, "config", None), "attention_dropout", 0.0)
    return f"attention_dropout={p:g}" if isinstance(p, (int, float)) and p > 0 else None


def check_resume(state: dict, cfg, world: World, model: nn.Module) -> None:
    """``--resume`` with another split of the batch (ranks, micro-batch, accumulation) is allowed when it trains the
    same model: the same ``--global-batch-size`` (the same rows per step, the same token-weighted loss) and no
    dropout (whose masks depend on the split). Anything else is refused with the reason."""
    config = state["config"]
    then = (state.get("world_size", 1), config["batch_size"], config["grad_accum"])
    now = (world.size, cfg.batch_size, cfg.grad_accum)
    if then == now:
        return
    before, after = math.prod(then), math.prod(now)
    layout = "{} rank(s) x --batch-size {} x {} accumulation".format
    if cfg.global_batch_size is None or config.get("global_batch_size") != cfg.global_batch_size:
        raise UserInputError(
            f"--resume: the checkpoint was written by {then[0]} rank(s) (global batch {before}) and this run has "
            f"{now[0]} (global batch {after}): resume on {then[0]} rank(s), or start runs with --global-batch-size, "
            "which keeps the global batch whatever the number of ranks"
        )
    dropout = dropout_in(model)
    if dropout:
        raise UserInputError(
            f"--resume: the checkpoint was written by {layout(*then)} and this run is {layout(*now)}: the same global "
            f"batch {after}, but the model has dropout ({dropout}), whose masks depend on that split: resume with "
            f"{then[0]} rank(s) and --batch-size {then[1]}"
        )
    if world.is_main:
        print(
            f"note: resuming a run checkpointed as {layout(*then)} as {layout(*now)}: the same global batch "
            f"{after}, so the same rows in each step and the same updates (up to float rounding)",
            file=sys.stderr,
        )
