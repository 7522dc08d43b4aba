"""The error hierarchy. Raise where the fact is known; the CLI turns it into an exit code in one place."""


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
