"""Errors a user can fix, reported as one clear line instead of a traceback.

This module is a leaf: it imports nothing from jfcnn, so every other module
can raise these errors without an import cycle. Every error that a user can
fix (a config key, a missing data set or checkpoint, a diverged run) derives
from ``UserError``; the command-line entry points print its message as one
``error:`` line and exit with status 1 (see ``jfcnn.cli.exit_on_user_error``).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""

    exit_code = 1  # The command-line status for this error.


class ConfigError(UserError, ValueError):
    """A config key is unknown, missing, ill-typed or out of range."""


class DatasetNotFoundError(UserError, RuntimeError):
    """The data set a config asks for is not prepared (there is no download)."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A work directory has no (or not the requested) checkpoint."""


class CheckpointError(UserError):
    """A checkpoint that exists but cannot be used; ``.step`` and ``.path`` name it."""

    def __init__(self, message: str, *, step: int, path: str) -> None:
        super().__init__(message)
        self.step = step
        self.path = path


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged: unreadable, truncated, or failing their checksums."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint holds other arrays than the model built from the config; ``.key`` names one."""

    def __init__(self, message: str, *, step: int, path: str, key: str) -> None:
        super().__init__(message, step=step, path=path)
        self.key = key


class WorkdirMetadataError(UserError):
    """A work directory's data set metadata (``dataset.json``) cannot be read."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN/Inf loss, gradient or state."""


class TrainingInterrupted(UserError):
    """A person stopped the run (Ctrl-C); a checkpoint of the current step was saved."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a Ctrl-C.


class MissingDependencyError(UserError, ImportError):
    """An optional dependency (an extra of the jfcnn package) is not installed."""
