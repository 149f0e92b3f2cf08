"""Errors a user can fix, reported as one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


def user_error_types() -> tuple[type[BaseException], ...]:
    from jfcnn import checkpoint, config_validation, train

    types: list[type[BaseException]] = [
        config_validation.ConfigError,
        checkpoint.CheckpointNotFoundError,
        train.NonFiniteLossError,
    ]
    try:
        from jfcnn.data import DatasetNotFoundError

        types.append(DatasetNotFoundError)
    except ImportError:
        pass
    return tuple(types)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Exits with status 1 and the error's message for errors a user can fix."""
    try:
        yield
    except user_error_types() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
