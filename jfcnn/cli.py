"""Helpers shared by the command-line entry points (train.py, jfcnn.evaluate).

Kept small and free of heavy imports: ``require_extra`` runs before anything
imports the training stack, so a bare ``pip install jfcnn`` gets one line
naming the extra to install instead of an ``ImportError`` traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from typing import Any

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
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (which saves a checkpoint itself):
        # while building data or compiling there is no progress to lose.
        print("error: interrupted (Ctrl-C); nothing was lost.", file=sys.stderr)
        sys.exit(130)


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


# ---------------------------------------------------------------------------
# Flags


def parse_flags_or_exit(argv: Sequence[str], flag_values: Any, config_flag: str = "config"):
    """absl ``flags_parser`` that turns every flag and config-file error into one line.

    ml_collections reports an unknown ``--config.key`` override, a missing
    config file or one with a syntax error as a traceback from inside flag
    parsing; this parser names the file or the key (with the closest known
    key) and exits with status 1.
    """
    from absl import flags

    path = _flag_value(argv, config_flag)
    if path is not None and not os.path.isfile(path):
        print(f"error: config file {path} does not exist (see configs/).", file=sys.stderr)
        sys.exit(1)
    try:
        rest = flag_values(argv)
        getattr(flag_values, config_flag)  # A config file's loading errors surface here.
        return rest
    except flags.Error as e:
        message = f"{e} (see --helpshort)"
    except Exception as e:  # noqa: BLE001 (any error while loading the config file)
        message = _explain_config_error(e, argv, config_flag)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _explain_config_error(error: Exception, argv: Sequence[str], config_flag: str) -> str:
    path = _flag_value(argv, config_flag)
    if path is None:
        return str(error)
    try:
        # Configs may import each other as `from configs import base`.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
        config = runpy.run_path(path)["get_config"]()
    except Exception as e:  # noqa: BLE001
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        return f"config file {path} could not be loaded{where}: {type(e).__name__}: {e}"
    finally:
        sys.path.pop(0)
    prefix = f"--{config_flag}."
    for arg in argv:
        if arg.startswith(prefix):
            key = arg[len(prefix) :].split("=", 1)[0]
            unknown = _unknown_key(config, key)
            if unknown:
                return f"{arg}: {unknown}"
    return f"{type(error).__name__}: {error}"


def _unknown_key(config: Any, dotted: str) -> str | None:
    """Why ``dotted`` is not a key of ``config``, or None if it is one."""
    node, seen = config, []
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            name = ".".join([*seen, part])
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" Did you mean `{'.'.join([*seen, close[0]])}`?" if close else ""
            return f"unknown config key `{name}`.{hint}"
        node, seen = node[part], [*seen, part]
    return None
