"""Helpers shared by the command-line entry points (train.py, jfcnn.evaluate).

Kept small and free of heavy imports: ``require_extra`` runs before anything
imports the training stack, so a bare ``pip install jfcnn`` gets one line
naming the extra to install instead of an ``ImportError`` traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator

from jfcnn.errors import MissingDependencyError, UserError

# The modules each optional extra of the jfcnn package provides.
EXTRAS = {
    "train": (
        "ml_collections",
        "optax",
        "orbax.checkpoint",
        "tensorflow",
        "tensorflow_datasets",
        "tensorboard",
        "pycocotools",
        "PIL",
    ),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that are not importable here."""
    missing = []
    for name in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # The parent package of a dotted name is missing.
            found = False
        if not found:
            missing.append(name)
    return missing


def require_extra(extra: str, command: str) -> None:
    """Raises ``MissingDependencyError`` if the modules of ``extra`` are missing."""
    missing = missing_modules(extra)
    if missing:
        raise MissingDependencyError(
            f"{command} needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"run `pip install 'jfcnn[{extra}]'` (or `pip install -e '.[{extra}]'` in a checkout)."
        )


def exit_unless_installed(extra: str, command: str) -> None:
    """Exits with one ``error:`` line if the modules of ``extra`` are missing."""
    with exit_on_user_error():
        require_extra(extra, command)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Exits with status 1 and one ``error:`` line for errors a user can fix."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


class _LibraryInfoFilter(logging.Filter):
    """Drops INFO records of chatty libraries (Orbax, TFDS) from the absl log."""

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not any(p in record.pathname for p in self._NOISY)


def quiet_library_logs() -> None:
    """Keeps the log readable: progress lines, not every Orbax write."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _LibraryInfoFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_LibraryInfoFilter())
