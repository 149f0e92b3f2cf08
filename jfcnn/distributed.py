"""Joining a multi-process run (several hosts, or several processes on one) with `jax.distributed`.

A TPU pod slice or a GPU cluster runs the same command on every host; JAX's
multi-controller runtime joins them, and from then on ``jax.devices()`` are
all the run's devices and ``jax.process_count()`` is the number of
processes. `train.py`, ``python -m jfcnn.evaluate`` and ``python -m
jfcnn.predict`` call `initialize_from_flags` before any JAX computation:

- On Cloud TPU, SLURM and Open MPI, whose environment JAX reads, a run of
  more than one process is joined with no flag (`cluster_size` tells from the
  environment); ``--multiprocess`` forces ``jax.distributed.initialize()``
  with no arguments (JAX's own detection) and ``--nomultiprocess`` runs
  alone whatever the environment says.
- Anywhere else, the same three flags on every command::

      --coordinator_address=HOST:PORT --num_processes=N --process_id=I

  where HOST:PORT is reachable from every process and free on process 0's
  host, and I is 0..N-1, a different one per process.

On CPUs the processes' collectives run over TCP with gloo (JAX's
``jax_cpu_collectives_implementation``), so several processes on one machine
form a real multi-process run. A process that cannot reach the coordinator
within ``--distributed_timeout`` seconds stops with an error naming it; once
joined, a process whose peer dies stops too (its next collective fails, or
the coordinator misses the peer's heartbeats for `HEARTBEAT_TIMEOUT_S`).
Once joined, SIGTERM is JAX's: its preemption service passes a SIGTERM to any
process on to all of them, so that they can stop after the same step.

A process alone on a CPU host trains on one JAX device per core
(`split_cpu_into_devices`): XLA's CPU client keeps about one core busy per
device on a U-Net's small convolutions, so the batch is sharded over the cores
instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from jfcnn.errors import ConfigError, UserError

# A dead peer is noticed within this many seconds even by a process that waits in no
# collective (JAX's default is 100).
HEARTBEAT_TIMEOUT_S = 30
DEFAULT_TIMEOUT_S = 300

# Environment variables that give a multi-process cluster's size, as JAX reads them.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

# At most this many CPU devices from `split_cpu_into_devices`, however many cores.
MAX_CPU_DEVICES = 8


def define_flags(flag_values: Any = None) -> None:
    """Defines the flags `initialize_from_flags` reads (absl)."""
    from absl import flags

    flag_values = flag_values or flags.FLAGS
    flags.DEFINE_bool(
        "multiprocess",
        None,
        "Join a multi-process run that JAX detects (Cloud TPU, SLURM, Open MPI). "
        "Default: join when the environment names more than one process.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "HOST:PORT of process 0's coordinator; with --num_processes and --process_id, "
        "the same on every process.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Processes in the run (with --coordinator_address).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        "This process's index, 0..N-1 (with --coordinator_address).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "distributed_timeout",
        DEFAULT_TIMEOUT_S,
        "Seconds to wait for every process to join before giving up.",
        flag_values=flag_values,
    )


def initialize_from_flags(flag_values: Any = None) -> bool:
    """`initialize` with the values of the flags `define_flags` defined."""
    from absl import flags

    f = flag_values or flags.FLAGS
    return initialize(
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes,
        process_id=f.process_id,
        multiprocess=f.multiprocess,
        timeout_s=f.distributed_timeout,
    )


def split_cpu_into_devices(
    batch_size: int, *, cores: int | None = None, environ: Any = None
) -> int:
    """Makes JAX's CPU backend one device per core, for a batch sharded over them.

    On the 2-core machine of the README's benchmarks a U-Net step on two CPU
    devices (the batch split in two by ``jit``) ran 1.3-1.6x as fast as on one,
    whose step keeps about one core busy. Takes the largest count, up to the
    number of cores this process may use (and `MAX_CPU_DEVICES`), that divides
    ``batch_size``. Only the CPU backend changes: on a GPU or TPU host the
    accelerators stay JAX's devices. Must come before any JAX computation.

    Leaves the count alone, and returns 0, when the user chose one
    (``JAX_NUM_CPU_DEVICES``, ``jax_num_cpu_devices``, or
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``), when no count
    above 1 divides ``batch_size``, or when JAX's backends already exist.
    ``JAX_NUM_CPU_DEVICES=1`` keeps one device. Returns the count it set.
    """
    import jax

    environ = os.environ if environ is None else environ
    if not isinstance(batch_size, int) or batch_size < 1:
        return 0  # Config validation names the problem.
    if (
        "JAX_NUM_CPU_DEVICES" in environ
        or "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", "")
        or jax.config.jax_num_cpu_devices >= 0
    ):
        return 0
    if cores is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cores = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    count = max(d for d in range(1, min(cores, MAX_CPU_DEVICES) + 1) if batch_size % d == 0)
    if count == 1:
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # The backends exist: too late to change the count.
        return 0
    return count


def cluster_size(environ: Any = None) -> int:
    """The number of processes a cluster's environment names (1 if none)."""
    environ = os.environ if environ is None else environ
    for name in _CLUSTER_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    # A Cloud TPU VM of a multi-host slice lists every worker.
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return max(len(hosts), 1)


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    multiprocess: bool | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> bool:
    """Joins the multi-process run these settings describe; returns whether it did.

    With ``coordinator_address`` (and then ``num_processes`` and
    ``process_id``), the run those name; else with ``multiprocess=True``, or
    ``None`` and a cluster environment of several processes, the run JAX
    detects. Must come before any JAX computation.

    Raises:
      ConfigError: inconsistent settings (named, with the fix).
      UserError: the coordinator could not be reached in ``timeout_s`` seconds.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        _check_explicit(coordinator_address, num_processes, process_id)
        if multiprocess is False:
            raise ConfigError(
                "--nomultiprocess contradicts --coordinator_address: drop one of them."
            )
        kwargs = {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
        }
        where = f"the coordinator at {coordinator_address}"
    elif multiprocess or (multiprocess is None and cluster_size() > 1):
        kwargs = {}
        where = "the coordinator of the cluster JAX detected"
    else:
        return False
    if timeout_s < 1:
        raise ConfigError(f"--distributed_timeout must be at least 1 second, got {timeout_s}.")

    import jax

    if jax.distributed.is_initialized():
        return True
    if coordinator_address is not None and process_id != 0:
        # JAX aborts the whole process (no exception) when registration times out:
        # check first that the coordinator answers, to stop with a message instead.
        _wait_for_coordinator(coordinator_address, timeout_s)
    # CPU collectives across processes (a no-op for accelerators' own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Its SIGTERM handler and sync point make every process stop at the same step
    # (jfcnn.train.PreemptionHandler).
    jax.config.update("jax_enable_preemption_service", True)
    try:
        jax.distributed.initialize(
            **kwargs,
            initialization_timeout=int(timeout_s),
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )
    except (RuntimeError, ValueError) as e:  # jax raises XlaRuntimeError, a RuntimeError.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not join the multi-process run through {where} within {timeout_s} s "
            f"({message[:300]}). Start every process with the same --coordinator_address "
            "and --num_processes (process 0 hosts the coordinator), check that the "
            "address is reachable from this host and the port free, or raise "
            "--distributed_timeout."
        ) from None
    if jax.process_index() != 0:
        # Progress is process 0's to log; the others keep warnings and errors.
        from absl import logging

        logging.set_verbosity(logging.WARNING)
    return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once HOST:PORT ``address`` accepts a connection; UserError after ``timeout_s``."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"could not reach the coordinator at {address} within {timeout_s} s "
                    f"({e.strerror or e}). Process 0 hosts it: start it with the same "
                    "--coordinator_address and --num_processes, check that the address is "
                    "reachable from this host, or raise --distributed_timeout."
                ) from None
            time.sleep(0.5)


def _check_explicit(address: str | None, num_processes: int | None, process_id: int | None):
    missing = [
        name
        for name, value in (
            ("--coordinator_address", address),
            ("--num_processes", num_processes),
            ("--process_id", process_id),
        )
        if value is None
    ]
    if missing:
        raise ConfigError(
            f"a multi-process run needs --coordinator_address, --num_processes and "
            f"--process_id together; missing {', '.join(missing)}."
        )
    if not re.fullmatch(r"\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}", address):
        raise ConfigError(
            f"--coordinator_address={address!r} is not HOST:PORT (e.g. 10.0.0.2:12345)."
        )
    if num_processes < 1:
        raise ConfigError(f"--num_processes must be at least 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process_id={process_id} is not in 0..{num_processes - 1} "
            f"(--num_processes={num_processes})."
        )


@contextlib.contextmanager
def exit_on_peer_failure() -> Iterator[None]:
    """In a multi-process run, a failed collective because another process died
    ends this one at once with one ``error:`` line (status 1), instead of a
    traceback and an abort in JAX's shutdown, which waits for the dead peer."""
    try:
        yield
    except Exception as e:
        import jax

        if not (jax.distributed.is_initialized() and is_peer_failure(e)):
            raise
        message = str(e).strip().splitlines()[0][:300]
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} stops: another "
            f"process of this run failed or was stopped ({message}). See the other "
            "processes' logs; rerun all of them to resume from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` says another process of the run is gone (a failed collective)."""
    text = str(error)
    return any(
        marker in text
        for marker in (
            "Connection closed by peer",
            "Connection reset by peer",
            "heartbeat timeout",
            "Gloo",
            "unhealthy",
        )
    )
