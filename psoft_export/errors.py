"""The error hierarchy. Raise where the fact is known; the CLI turns it into an exit code in one place."""

from typing import Optional


class PsoftExportError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UserInputError(PsoftExportError, ValueError):
    """Bad input from the user: a path, a rank, a target name, a file. One line says what and what to do.

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback (``--debug`` shows it).
    """

    exit_code = 2


class VerificationError(PsoftExportError):
    """An exported artifact disagrees with the PyTorch model beyond tolerance (exit code 1)."""

    exit_code = 1


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so every ``finally`` (temporary outputs) runs before exit code 143."""


# Signals received by :func:`interrupt`. A handler's exception is lost when the signal lands inside a ``__del__``
# (Python prints "Exception ignored in ..." and carries on), so the signal is also recorded here and checked again
# before anything is published (:func:`raise_pending`).
_PENDING: list = []


def interrupt(signum, frame=None):
    """Signal handler for SIGINT/SIGTERM outside the training loop: record the signal, then raise."""
    import signal

    _PENDING.append(signum)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def raise_pending() -> None:
    """Raise again a SIGINT/SIGTERM whose exception was swallowed (see :func:`interrupt`)."""
    import signal

    if _PENDING:
        raise KeyboardInterrupt() if _PENDING[0] == signal.SIGINT else Terminated()


def received() -> Optional[int]:
    """The first SIGINT/SIGTERM this process received through :func:`interrupt`, or ``None``.

    A library can turn the handler's exception into its own: an extension module whose import is interrupted
    raises ``ImportError: initialization failed`` (onnxruntime's, measured). Any error after a signal is the signal.
    """
    return _PENDING[0] if _PENDING else None


def forget_signals() -> None:
    """Start a command with no signal on record (the record is per process; in-process test runs share it)."""
    _PENDING.clear()
