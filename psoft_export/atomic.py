"""Output that is either complete or absent: write into a temporary sibling, rename at the end.

A killed process leaves at most a ``.<name>.tmp-*`` directory beside the target, never a half-written target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from psoft_export.errors import UserInputError


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output directory unless ``overwrite``; refuse an existing file."""
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output path {path} exists and is not a directory: choose another -o")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserInputError(f"output directory {path} already exists and is not empty: choose another -o or pass --overwrite")


@contextlib.contextmanager
def atomic_output_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path).absolute()
    check_output_dir(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise UserInputError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = storage_failure(exc)
        if reason:
            raise UserInputError(f"cannot write {path}: {reason}; free space or choose another -o") from None
        raise


STORAGE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
                  errno.EACCES: "Permission denied", errno.EDQUOT: "Disk quota exceeded"}


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


def _replace(tmp: Path, path: Path) -> None:
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
