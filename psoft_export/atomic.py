"""Output that is either complete or absent: write into a temporary sibling, rename at the end.

A killed process leaves at most a ``.<name>.tmp-*`` directory beside the target, never a half-written target.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from psoft_export.errors import UserInputError, raise_pending

MARKER = ".psoft-export"  # every output directory this tool writes holds it; --overwrite replaces only those


def check_output_dir(path: Path, overwrite: bool, inputs: Iterable[Optional[Path]] = ()) -> None:
    """Refuse an output path that would destroy something the user owns.

    An existing file, a non-empty directory without ``--overwrite``, a directory this tool did not write (no
    :data:`MARKER`), and any path that is, contains or lies inside an input of the same run are refused.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output path {path} exists and is not a directory: choose another -o")
    check_overlap(path, inputs)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserInputError(
                f"output directory {path} already exists and is not empty: choose another -o or pass --overwrite"
            )
        if not (path / MARKER).is_file():
            raise UserInputError(
                f"--overwrite: {path} was not written by psoft-export (no {MARKER} marker), so it is "
                "not replaced: choose another -o or remove it yourself"
            )


def check_overlap(path: Path, inputs: Iterable[Optional[Path]]) -> None:
    """Refuse an output that is, contains or lies inside an input of the same run."""
    target = Path(path).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise UserInputError(f"-o {path} overlaps the input {given} of this run: choose an -o outside it")


def mark(path: Path, command: str) -> None:
    """Write the marker that lets a later ``--overwrite`` replace this directory."""
    (Path(path) / MARKER).write_text(json.dumps({"written_by": "psoft-export", "command": command}) + "\n")


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on output ``path`` (a ``.NAME.lock`` file beside it) for the whole run, so two runs
    never write one output; the second is refused with the holder's pid."""
    path = Path(path).absolute()
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot write to {path.parent}: {exc.strerror or exc}; choose another -o") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # read-only or forbidden: found before any work
            raise UserInputError(f"cannot write to {path.parent}: {exc.strerror or exc}; choose another -o") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserInputError(
                f"{path} is being written by another psoft-export run (pid {holder}): wait for it "
                "to finish or choose another -o"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by the previous holder meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(
    path: Path, overwrite: bool = False, inputs: Iterable[Optional[Path]] = (), command: str = ""
) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on any error it is removed.

    The output is locked for the duration (:func:`output_lock`) and checked by :func:`check_output_dir`.
    """
    path = Path(path).absolute()
    with output_lock(path):
        check_output_dir(path, overwrite, inputs)
        with _atomic_dir(path) as tmp:
            yield tmp
            mark(tmp, command)


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise UserInputError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        raise_pending()  # SIGINT/SIGTERM received while writing: never publish, even if its exception was lost
        replace_dir(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = storage_failure(exc)
        if reason:
            raise UserInputError(f"cannot write {path}: {reason}; free space or choose another -o") from None
        raise


STORAGE_ERRNOS = {
    errno.ENOSPC: "No space left on device",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
    errno.EDQUOT: "Disk quota exceeded",
}


def storage_failure(exc: BaseException) -> Optional[str]:
    """The reason when ``exc`` is a full/read-only/forbidden disk, also when a library wraps the OS error
    (safetensors raises ``SafetensorError: ... (os error 28)``); ``None`` otherwise."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return exc.strerror or STORAGE_ERRNOS[exc.errno]
    text = str(exc)
    for number, reason in STORAGE_ERRNOS.items():
        if f"(os error {number})" in text or reason in text:
            return reason
    return None


def atomic_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary sibling of ``path`` and rename it into place: ``path`` is whole or untouched."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(tmp: Path, path: Path) -> None:
    # mkdtemp makes 0700 and some writers 0600; an output directory is normally shared: honour the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for file in tmp.rglob("*"):
        os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
