"""Running a benchmark step in a fresh child process and taking its peak RSS (``os.wait4``'s ``ru_maxrss``), the way
``benchmarks/decompose.py`` and ``benchmarks/scale.py`` measure memory: threads pinned, no hub access."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional


def child_env(threads: int, **extra: str) -> dict[str, str]:
    """The environment of a measured child: ``threads`` BLAS/OpenMP threads, offline, ``extra`` on top."""
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )


def run_measured(
    argv: list[str],
    threads: int,
    *,
    output: Optional[IO[str]] = None,
    cwd: Optional[Path] = None,
    **extra_env: str,
) -> tuple[Optional[str], float, float, int]:
    """Run ``python argv``: ``(stdout, seconds, peak RSS in MiB, exit code)``. With ``output``, stdout and stderr go
    there and the returned stdout is None; without, stdout is captured (stderr passes through)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=output if output is not None else subprocess.PIPE,
        stderr=subprocess.STDOUT if output is not None else None,
        env=child_env(threads, **extra_env),
        cwd=cwd,
        text=True,
    )
    stdout = None
    if output is None:
        stdout = proc.stdout.read()
        proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    return stdout, time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)
