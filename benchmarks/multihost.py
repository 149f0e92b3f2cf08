"""Multi-process training on one machine: 2 processes x 4 devices against 1 x 8, and
the cost of the per-step preemption check.

Step time: `train.py` trains the same config twice, as 1 process with 8 CPU
devices and as 2 processes with 4 each joined on 127.0.0.1 (gloo collectives),
both with `jit`, the same global batch and steps. Each run's steps/s is the
median of its `train_log.jsonl` records after the first (which holds the
compilation). On one machine both layouts share its cores, so the ratio shows
what crossing a process boundary costs (collectives over TCP, two runtimes), not
what more hosts would gain.

Preemption check: 2 processes join a run and each times ``--checks``
consecutive calls of `PreemptionHandler.should_stop` (JAX's preemption sync
point, asked once after every training step), with no notice pending, as in a
run that is not being stopped.

    python benchmarks/multihost.py
    python benchmarks/multihost.py --config configs/unet.py --steps 40 --batch_size 16
    python benchmarks/multihost.py --skip_training  # only the preemption check
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "unet.py"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--log_every", type=int, default=5)
    parser.add_argument("--checks", type=int, default=100_000)
    parser.add_argument("--skip_training", action="store_true")
    # Internal: one process of the preemption-check measurement.
    parser.add_argument("--check_worker", nargs=2, metavar=("PORT", "ID"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_flags(port: int, index: int, count: int = 2) -> list[str]:
    return [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={count}",
        f"--process_id={index}",
    ]


def devices_env(count: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}


def run_all(commands: list[list[str]], env: dict[str, str]) -> None:
    processes = [
        subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=3600)
        if process.returncode:
            raise SystemExit(f"a process failed:\n{stderr[-3000:]}")


def steps_per_sec(workdir: str) -> tuple[float, dict]:
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    start = records[0]
    rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r][1:]
    return statistics.median(rates), start


def train(args, workdir: str, processes: int, devices: int) -> tuple[float, dict]:
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        args.config,
        "--workdir",
        workdir,
        "--config.parallelism=jit",
        f"--config.batch_size={args.batch_size}",
        f"--config.num_train_steps={args.steps}",
        f"--config.log_every_steps={args.log_every}",
        f"--config.eval_every_steps={10 * args.steps}",
        f"--config.checkpoint_every_steps={10 * args.steps}",
        "--config.num_eval_images=0",
    ]
    if processes == 1:
        commands = [command]
    else:
        port = free_port()
        commands = [command + process_flags(port, i, processes) for i in range(processes)]
    run_all(commands, devices_env(devices))
    return steps_per_sec(workdir)


def check_worker(port: str, index: str, checks: int) -> None:
    from jfcnn import distributed

    distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(index)
    )
    from jfcnn.train import PreemptionHandler

    handler = PreemptionHandler()
    assert handler.across_processes
    handler.should_stop(1)  # The first call also records where the run started.
    start = time.perf_counter()
    for step in range(2, checks + 2):
        if handler.should_stop(step):
            raise SystemExit("a preemption notice came in during the measurement")
    seconds = time.perf_counter() - start
    print(json.dumps({"process": int(index), "us_per_check": 1e6 * seconds / checks}))


def preemption_check_cost(checks: int) -> list[float]:
    port = free_port()
    command = [sys.executable, os.path.abspath(__file__), f"--checks={checks}", "--check_worker"]
    processes = [
        subprocess.Popen(
            command + [str(port), str(i)],
            cwd=ROOT,
            env=devices_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    costs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        if process.returncode:
            raise SystemExit(f"a check process failed:\n{stderr[-3000:]}")
        costs.append(json.loads(stdout.strip().splitlines()[-1])["us_per_check"])
    return costs


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check_worker:
        check_worker(*args.check_worker, args.checks)
        return
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            one, start_one = train(args, os.path.join(tmp, "1x8"), 1, 8)
            two, start_two = train(args, os.path.join(tmp, "2x4"), 2, 4)
        assert (start_one["processes"], start_one["devices"]) == (1, 8), start_one
        assert (start_two["processes"], start_two["devices"]) == (2, 8), start_two
        print(
            f"{os.path.basename(args.config)}, batch {args.batch_size}, {args.steps} steps, jit, "
            f"{os.cpu_count()} cores"
        )
        print(f"  1 process  x 8 devices: {one:.2f} steps/s")
        print(f"  2 processes x 4 devices: {two:.2f} steps/s ({two / one:.2f}x)")
    costs = preemption_check_cost(args.checks)
    print(
        f"preemption check (2 processes, {args.checks} consecutive steps): "
        + ", ".join(f"process {i} {c:.2f} us/step" for i, c in enumerate(costs))
    )


if __name__ == "__main__":
    main()
