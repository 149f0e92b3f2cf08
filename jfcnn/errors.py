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


class ConfigError(UserError, ValueError):
    """A config key is unknown, missing, ill-typed or out of range."""


class DatasetNotFoundError(UserError, RuntimeError):
    """The data set a config asks for is not prepared (there is no download)."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A work directory has no (or not the requested) checkpoint."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN/Inf loss, gradient or state."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency (an extra of the jfcnn package) is not installed."""
