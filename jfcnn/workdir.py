"""The work directory of a run: checked before use, and locked while a run trains.

A work directory holds everything a run saved (config, checkpoints, logs), so
two training processes must never share one: the second would overwrite the
first's config and checkpoints. ``lock`` takes an exclusive ``flock`` on
``<workdir>/.lock``; the kernel drops it when the process ends however it ends
(SIGKILL, a crash, a reboot), so a stale lock file never blocks a later run.
Evaluation and prediction only read a work directory and take no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator

from jfcnn.errors import UserError

LOCK_FILE = ".lock"


class WorkdirError(UserError):
    """The work directory cannot be used: not a directory, not writable, or in use."""


def check(workdir: str) -> None:
    """Raises ``WorkdirError`` if ``workdir`` exists and is not a directory; creates nothing."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(
            f"--workdir {os.path.abspath(workdir)} is a file, not a directory; choose another "
            "--workdir."
        )


def prepare(workdir: str) -> str:
    """Creates ``workdir`` if needed and checks it is a writable directory.

    Returns its absolute path. Raises ``WorkdirError`` naming the problem.
    """
    workdir = os.path.abspath(workdir)
    check(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise WorkdirError(
            f"Cannot write to --workdir {workdir} ({e.strerror or e}); choose a writable "
            "directory (a run saves its config, checkpoints and logs there)."
        ) from e
    return workdir


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
    """Holds an exclusive lock on ``workdir`` for the duration of the block.

    Raises ``WorkdirError`` naming the process that holds it.
    """
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(
                f"{workdir} is in use by {_describe_holder(path)}; wait for that run to end "
                "(or stop it), or train in another --workdir."
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # Releases the lock; the file stays (removing it would race).


def _describe_holder(path: str) -> str:
    try:
        with open(path) as f:
            holder = json.load(f)
        return (
            f"process {holder['pid']} on {holder['host']} (started {holder['started']}: "
            f"{holder['command']})"
        )
    except (OSError, ValueError, KeyError):
        return "another process"
