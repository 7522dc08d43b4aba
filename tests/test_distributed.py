"""``psoft-export train`` under torchrun (psoft_export/distributed.py): 2 ranks on this CPU with gloo.

Oracle: a single-process run with the same global batch and seed, float32, 1e-5 relative. The per-step losses are
compared with one process on the whole batch (HF's own mean over its 8 rows). The adapters too where every
micro-batch has the same width (packed text); with padded prompt/completion rows, splitting a batch changes the
padded width and so the float rounding (1e-7 in the loss), which Adam's first steps amplify in near-zero gradient
entries (3.7e-5 measured, with or without ranks): there the oracle for the adapter is one process with the same
split (``--global-batch-size 8 --batch-size 4``). The fixtures have no dropout (Llama: attention_dropout 0).

One test launches through ``torchrun`` itself; the others fork 2 ranks from this process with the environment
torchrun sets (rank 0 then hosts the rendezvous store): the same code, without 2 x 5 s of imports per launch.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from psoft_export import data as data_mod
from psoft_export import distributed
from psoft_export.errors import UserInputError
from psoft_export.train import TrainConfig, train
from tests.conftest import MODELS, ROOT

DATA = MODELS.parent / "data"
TOL = 1e-5
STEPS = 6
# PSOFT with --global-batch-size 8 as 2 ranks x 2 rows x 2 accumulation; OFT without it (2 ranks x 4 rows), on
# prompt/completion rows whose token counts differ: a wrong weighting of the ranks' losses shows there.
RUNS = {
    "psoft": {
        "data": "train.jsonl",
        "eval": "eval.jsonl",
        "ranks": ["--global-batch-size", "8", "--batch-size", "2"],
        "cfg": {"method": "psoft", "rank": 8, "seq_len": 32, "lr": 1e-2, "eval_every": 3},
    },
    "oft": {
        "data": "prompt_completion.jsonl",
        "eval": None,
        "ranks": ["--batch-size", "4"],
        "cfg": {"method": "oft", "block_size": 16, "seq_len": 64, "lr": 1e-2},
    },
}
COMMON = {"steps": STEPS, "warmup": 0.0, "log_every": 3, "batch_size": 8}


def argv(out: Path, method: str, *extra: str) -> list[str]:
    """``psoft-export train ...`` of ``method``'s 2-rank run."""
    spec = RUNS[method]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in spec["cfg"].items()]
    evals = ["--eval-data", str(DATA / spec["eval"])] if spec["eval"] else []
    return [
        "train",
        str(MODELS / "llama"),
        "--data",
        str(DATA / spec["data"]),
        "-o",
        str(out),
        "--warmup=0",
        f"--steps={STEPS}",
        "--log-every=3",
        *evals,
        *flags,
        *spec["ranks"],
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, args: list[str], env: dict, logs: Path, stop_at) -> None:
    """One forked rank: the CLI with the environment torchrun sets, its output in ``logs``, its exit code."""
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    out, err = open(logs / f"out{rank}", "w"), open(logs / f"err{rank}", "w")  # noqa: SIM115
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    torch.set_num_threads(1)  # 2 ranks on 2 cores; and no OpenMP pool inherited across fork
    code = 1
    try:
        if stop_at is not None and rank == 1:  # rank 1 alone is told to stop, at the start of step stop_at
            import psoft_export.train as train_mod

            lr_at = train_mod.lr_at

            def lr_then_sigterm(step, *a):
                if step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return lr_at(step, *a)

            train_mod.lr_at = lr_then_sigterm
        from psoft_export.cli import main

        sys.argv = ["psoft-export", *args]
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 - reported in the rank's log, which the test shows
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def forked(args: list[str], logs: Path, stop_at=None) -> tuple[list[int], list[str], list[str]]:
    """2 ranks forked from this process; their exit codes, stdouts and stderrs."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, args, env, logs, stop_at)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        if proc.exitcode is None:
            proc.kill()
    read = [(logs / f"{kind}{r}").read_text() for kind in ("out", "err") for r in range(2)]
    return [proc.exitcode for proc in procs], read[:2], read[2:]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m psoft_export ...`` (a free port, one machine)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "psoft_export",
        *args,
    ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def logged(out: Path, key: str = "loss", present: bool = False) -> list[float]:
    """``key`` of every step in ``out``'s log (``present``: of the steps that have it)."""
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r[key] for r in records if not present or key in r]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def assert_same_steps(got: Path, want: Path) -> None:
    """The logged loss and the (global, unclipped) gradient norm of every step, and the eval losses (each rank
    evaluates a share of the eval batches)."""
    evals = logged(want, "eval_loss", present=True)
    assert logged(got, "eval_loss", present=True) == pytest.approx(evals, rel=TOL), "eval losses differ"
    for key in ("loss", "grad_norm"):
        a, b = logged(got, key), logged(want, key)
        assert len(a) == len(b) == STEPS
        worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
        assert worst <= TOL, f"per-step {key} {a} vs the single-process run's {b}: relative {worst:.1e} > {TOL:.0e}"
        assert abs(b[-1] - b[0]) > 1e-3 * abs(b[0]), f"the {key} must move, else the comparison is vacuous"


def assert_same_adapter(got: Path, want: Path) -> None:
    ta, tb = load_file(got / "psoft_export.safetensors"), load_file(want / "psoft_export.safetensors")
    assert ta.keys() == tb.keys()
    errs = {k: rel(ta[k], tb[k]) for k in ta}
    key = max(errs, key=errs.get)
    assert errs[key] <= TOL, (
        f"adapter tensor {key}: relative {errs[key]:.1e} from the single-process run's (> {TOL:.0e})"
    )


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """Single-process references: per method, the whole batch of 8 in one micro-batch; OFT also split as 2 x 4."""
    root = tmp_path_factory.mktemp("one")
    made, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same summation order inside each matmul
    for name, method, extra in [
        ("psoft", "psoft", {}),
        ("oft", "oft", {}),
        ("oft-split", "oft", {"batch_size": 4, "global_batch_size": 8}),
    ]:
        spec = RUNS[method]
        train(
            MODELS / "llama",
            DATA / spec["data"],
            root / name,
            TrainConfig(**{**COMMON, **spec["cfg"], **extra}),
            eval_data=DATA / spec["eval"] if spec["eval"] else None,
        )
        made[name] = root / name
    torch.set_num_threads(threads)
    return made


# ------------------------------------------------------------------------------------------ 2 ranks = 1 process


def test_torchrun_trains_what_one_process_trains_and_rank_0_alone_writes(one, tmp_path):
    """torchrun, PSOFT (rank 0 decomposes, rank 1 waits and reads the subspace): the same losses and adapter as one
    process; the same files as one process writes, one log line per step, one progress line per step, one summary."""
    out = tmp_path / "two"
    result = torchrun(argv(out, "psoft"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_steps(out, one["psoft"])
    assert_same_adapter(out, one["psoft"])
    assert len(logged(out, "eval_loss", present=True)) == 2, "--eval-every 3 of 6 steps"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one["psoft"].iterdir())
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{STEPS:07d}.pt"]
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == list(
        range(1, STEPS + 1)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["two"], "no lock, staging or temporary file left beside it"
    assert sum(line.startswith("train: step") for line in result.stderr.splitlines()) == STEPS, result.stderr
    assert sum(line.startswith("trained psoft") for line in result.stdout.splitlines()) == 1, result.stdout
    state = torch.load(out / "checkpoints" / f"step-{STEPS:07d}.pt", weights_only=True)
    assert (state["world_size"], state["global_batch"]) == (2, 8)


def test_two_ranks_weight_uneven_token_counts_exactly(one, tmp_path):
    """OFT on prompt/completion rows (each rank's token count differs): the logged loss is the mean over all tokens
    of the global batch, and the adapter is one process's with the same split."""
    codes, _, errs = forked(argv(tmp_path / "two", "oft"), tmp_path / "logs")
    assert codes == [0, 0], errs
    assert_same_steps(tmp_path / "two", one["oft"])
    assert_same_adapter(tmp_path / "two", one["oft-split"])


# ------------------------------------------------------------------------------------------ interrupted, resumed


def test_a_rank_interrupted_resumes_to_the_same_adapter(one, tmp_path):
    """SIGTERM to rank 1 only: every rank stops after the same step and rank 0 checkpoints it; --resume on 2 ranks
    ends bit-identical to an uninterrupted 2-rank run, and on 1 process (the same --global-batch-size) within 1e-5
    of the single-process run."""
    whole = tmp_path / "whole"
    codes, _, errs = forked(argv(whole, "psoft"), tmp_path / "logs-whole")
    assert codes == [0, 0], errs
    out = tmp_path / "run"
    codes, _, errs = forked(argv(out, "psoft"), tmp_path / "logs-stopped", stop_at=2)
    assert codes == [143, 143], errs
    assert all(e.strip().splitlines()[-1].startswith("error: interrupted at step 3") for e in errs), errs
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003.pt"]
    assert not (out / "psoft_export.safetensors").exists()
    other = tmp_path / "other"
    shutil.copytree(out, other)

    codes, _, errs = forked(argv(out, "psoft", "--resume"), tmp_path / "logs-resumed")
    assert codes == [0, 0], errs
    assert logged(out) == logged(whole), "resumed losses differ from the uninterrupted 2-rank run"
    a, b = load_file(out / "psoft_export.safetensors"), load_file(whole / "psoft_export.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted 2-rank run"

    cfg = TrainConfig(**{**COMMON, **RUNS["psoft"]["cfg"], "global_batch_size": 8})
    train(MODELS / "llama", DATA / "train.jsonl", other, cfg, eval_data=DATA / "eval.jsonl", resume=True)  # allowed
    assert_same_steps(other, one["psoft"])
    assert_same_adapter(other, one["psoft"])


def test_resume_on_another_split_only_when_it_trains_the_same_model(capsys):
    """Another number of ranks needs the same --global-batch-size and no dropout; the refusals say why."""
    cfg = TrainConfig(batch_size=4, grad_accum=1)
    state = {"world_size": 2, "config": {"batch_size": 4, "grad_accum": 1, "global_batch_size": None}}
    model = nn.Linear(2, 2)
    with pytest.raises(
        UserInputError,
        match=r"written by 2 rank\(s\) \(global batch 8\) and this run has 1 "
        r"\(global batch 4\): resume on 2 rank\(s\)",
    ):
        distributed.check_resume(state, cfg, distributed.World(), model)
    same = TrainConfig(global_batch_size=8).for_world(1)
    state["config"]["global_batch_size"] = 8
    distributed.check_resume(state, same, distributed.World(), model)
    assert "the same global batch 8" in capsys.readouterr().err
    with pytest.raises(UserInputError, match=r"dropout \(1 p=0.1\)"):
        distributed.check_resume(state, same, distributed.World(), nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    state["world_size"] = 1
    state["config"].update(batch_size=8)
    distributed.check_resume(state, same, distributed.World(), model)  # the same layout: nothing to say


# ------------------------------------------------------------------------------------------ batches


def _rows(n: int) -> data_mod.Dataset:
    """Rows whose first token is their index, with 1..8 label tokens after the shift."""
    rows = []
    for i in range(n):
        ids = torch.tensor([i] + [5] * (3 + i % 8))
        labels = ids.clone()
        labels[: 1 + i % 3] = data_mod.IGNORE
        rows.append({"input_ids": ids, "labels": labels})
    return data_mod.Dataset("completion", rows)


@pytest.mark.parametrize("ranks,batch", [(1, 2), (2, 2), (2, 4), (4, 1)])
def test_ranks_split_each_global_batch_of_the_seeded_order(ranks, batch):
    """Over two epochs (21 rows, global batch 8: a short last batch), the ranks' rows of each step are the step's
    global batch from data.batches, and the loss weights of all micro-batches sum to 1."""
    data, size = _rows(21), 8
    cfg = TrainConfig(batch_size=batch, global_batch_size=size, seed=3).for_world(ranks)
    feeds = [distributed.step_batches(data, cfg, distributed.World(r, ranks), 0, start=0) for r in range(ranks)]
    expected = data_mod.batches(data, size, 3, 0) + data_mod.batches(data, size, 3, 1)
    for step, rows in enumerate(expected):
        parts = [list(next(feed)) for feed in feeds]
        got = [int(i) for part in parts for micro, _ in part for i in micro["input_ids"][:, 0]]
        assert got == rows, f"step {step}: the ranks' rows {got}, the global batch's {rows}"
        weights = sum(1 / divisor for part in parts for _, divisor in part)  # micro-batch's share of the loss terms
        assert abs(weights - 1) < 1e-12, f"step {step}: the micro-batches' loss weights sum to {weights}"


def test_one_process_without_global_batch_is_the_accumulating_loop():
    data, cfg = _rows(21), TrainConfig(batch_size=4, grad_accum=2, seed=1)
    feed = distributed.step_batches(data, cfg, distributed.World(), 0, start=3)
    plain = data_mod.iterate(data, 4, 1, 0, start=6)
    for _ in range(4):
        for batch, divisor in next(feed):
            assert divisor == 2 and torch.equal(batch["input_ids"], next(plain)["input_ids"])


def test_global_batch_size_is_split_or_refused():
    cfg = TrainConfig(global_batch_size=8).for_world(2)  # --batch-size 8 is more than a rank's share: 4
    assert (cfg.batch_size, cfg.grad_accum) == (4, 1)
    cfg = TrainConfig(global_batch_size=16, batch_size=2).for_world(2)
    assert (cfg.batch_size, cfg.grad_accum) == (2, 4)
    assert TrainConfig(batch_size=4).for_world(8).grad_accum == 1, "without it nothing changes"
    with pytest.raises(UserInputError, match="--global-batch-size 12 is not divisible by the 8 ranks"):
        TrainConfig(global_batch_size=12).for_world(8)
    with pytest.raises(UserInputError, match="12 rows per rank, not a multiple of --batch-size 8"):
        TrainConfig(global_batch_size=12).for_world(1)
    with pytest.raises(UserInputError, match="--grad-accum 3 contradicts"):
        TrainConfig(global_batch_size=16, batch_size=2, grad_accum=3).for_world(2)


# ------------------------------------------------------------------------------------------ launch errors


def _cli(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "psoft_export",
        "train",
        str(MODELS / "llama"),
        "--data",
        str(DATA / "train.jsonl"),
        "-o",
        str(tmp_path / "out"),
        "--method",
        "oft",
        "--block-size",
        "16",
        "--seq-len",
        "32",
        "--steps",
        "1",
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False, timeout=120
    )


def test_a_global_batch_the_ranks_cannot_split_is_one_line_exit_2(tmp_path):
    ranks = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}  # what torchrun sets; refused before any rendezvous
    result = _cli(tmp_path, "--global-batch-size", "3", env=ranks)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        (
            "error: --global-batch-size 3 is not divisible by the 2 ranks: use a multiple of 2, or launch a number of "
            "ranks that divides 3"
        )
    ], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_rank_that_cannot_reach_the_others_names_the_address(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        distributed.TIMEOUT_ENV: "2",
    }
    result = _cli(tmp_path, env=env)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: rank 1 of 2 could not reach the others at 127.0.0.1:{port} within 2 s"), lines
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ --fsdp (FSDP2)


def assert_same_format(got: Path, want: Path) -> None:
    """The same files, the same tensor names, shapes and dtypes, the same record but for ``train.fsdp``."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for name in ("psoft_export.safetensors", "adapter_model.safetensors"):
        a, b = load_file(got / name), load_file(want / name)
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}, name
        errs = {k: rel(a[k], b[k]) for k in a}
        assert max(errs.values()) <= TOL, f"{name}: {errs}"
    ma, mb = (json.loads((d / "psoft_export.json").read_text()) for d in (got, want))
    for meta in (ma, mb):
        meta.pop("versions")
        meta["peft_form"].pop("seconds")
        meta["train"] = {k: v for k, v in meta["train"].items() if k not in ("fsdp", "final_loss", "eval_loss")}
    ma["peft_form"]["rel_err"] = mb["peft_form"]["rel_err"] = None  # measured float rounding, not format
    assert ma.keys() == mb.keys() and ma["peft_form"]["faithful"] == mb["peft_form"]["faithful"]


@pytest.mark.parametrize("method", ["psoft", "oft"])
def test_fsdp_trains_what_one_process_trains(one, tmp_path, method):
    """--fsdp on 2 ranks (the base sharded, the adapter whole on each rank): the losses, gradient norms and eval
    losses of every step and the final adapter of the single-process run, in the single-process run's format."""
    out = tmp_path / "fsdp"
    codes, _, errs = forked(argv(out, method, "--fsdp"), tmp_path / "logs")
    assert codes == [0, 0], errs
    assert_same_steps(out, one[method])
    want = one["psoft"] if method == "psoft" else one["oft-split"]
    assert_same_adapter(out, want)
    assert_same_format(out, want)
    state = torch.load(out / "checkpoints" / f"step-{STEPS:07d}.pt", weights_only=True)
    assert all(type(t) is torch.Tensor for t in state["trainable"].values()), "checkpoints hold whole tensors"


def test_fsdp_ranks_keep_in_step_on_a_short_last_batch(tmp_path):
    """13 rows, global batch 8 as 2 ranks x micro-batches of 2: every second step has 5 rows, 3 on rank 0 (2
    micro-batches) and 2 on rank 1 (1): rank 1 runs a zero-weight repeat so that FSDP's all-gathers pair up. The
    losses are the single-process run's; the adapter is the 2-rank run's without --fsdp (the same micro-batches:
    one process splits the short batch 2+2+1, whose padded widths round differently, 4.5e-5 measured)."""
    rows = (DATA / "prompt_completion.jsonl").read_text().splitlines()[:13]
    data = tmp_path / "short.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = {"method": "oft", "block_size": 16, "seq_len": 64, "lr": 1e-2, "steps": 4, "warmup": 0.0}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
    args = ["train", str(MODELS / "llama"), "--data", str(data), *flags]
    for out, extra in (("fsdp", ["--fsdp"]), ("ddp", [])):
        run = [*args, "-o", str(tmp_path / out), "--global-batch-size=8", "--batch-size=2", *extra]
        codes, _, errs = forked(run, tmp_path / f"logs-{out}")
        assert codes == [0, 0], errs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(MODELS / "llama", data, tmp_path / "one", TrainConfig(**cfg, global_batch_size=8, batch_size=2))
    finally:
        torch.set_num_threads(threads)
    a, b = logged(tmp_path / "fsdp"), logged(tmp_path / "one")
    assert a == pytest.approx(b, rel=TOL) and len(a) == 4
    assert_same_adapter(tmp_path / "fsdp", tmp_path / "ddp")


def _holdings(rank: int, env: dict, path: Path) -> None:
    """One forked rank: the model prepared with --fsdp, what this rank holds of it written to ``path``."""
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    code = 1
    try:
        from psoft_export import fsdp
        from psoft_export.train import prepare

        cfg = TrainConfig(method="oft", block_size=16, seq_len=32, fsdp=True).for_world(2)
        with distributed.process_group(distributed.detect(), "cpu") as world:
            run = prepare(MODELS / "llama", DATA / "train.jsonl", cfg, world=world)
            path.with_suffix(f".{rank}").write_text(json.dumps(fsdp.local_bytes(run.model)))
        code = 0
    finally:
        os._exit(code)


def test_fsdp_holds_half_the_base_on_each_rank(tmp_path):
    """The base's parameters are sharded (half on each of 2 ranks), the trainable tensors whole on both."""
    from safetensors import safe_open

    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_holdings, args=(r, env, tmp_path / "held")) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    held = [json.loads((tmp_path / f"held.{r}").read_text()) for r in range(2)]
    with safe_open(MODELS / "llama" / "model.safetensors", "pt") as f:
        base = sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())  # noqa: SIM118
    assert held[0]["sharded"] + held[1]["sharded"] == base, (held, base)
    assert abs(held[0]["sharded"] - held[1]["sharded"]) <= 0.02 * base, held
    assert held[0]["other"] == held[1]["other"] == 0, "no frozen parameter left whole"
    assert held[0]["trainable"] == held[1]["trainable"] > 0


@pytest.mark.parametrize(
    "extra,env,message",
    [
        (
            ["--fsdp"],
            {},
            "error: --fsdp shards the base across the ranks of a torchrun launch and this is one process: launch "
            "with torchrun --nproc_per_node N (N >= 2), or drop --fsdp",
        ),
        (
            ["--fsdp", "--quantize", "nf4"],
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
            "error: --fsdp with --quantize nf4: FSDP2 shards float parameters and bitsandbytes' 4-bit weights are "
            "not ones; drop --quantize (FSDP shards the float base) or --fsdp",
        ),
    ],
)
def test_fsdp_where_it_cannot_work_is_one_line_exit_2(tmp_path, extra, env, message):
    result = _cli(tmp_path, *extra, env=env)
    assert result.returncode == 2 and result.stderr.splitlines() == [message], result.stderr
    assert not (tmp_path / "out").exists()
