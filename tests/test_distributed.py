"""`split_cpu_into_devices`: one CPU device per core for train.py, unless the user chose.

Each case runs in a fresh interpreter: JAX fixes the device count when its
backends start, once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jfcnn import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import json, sys
from jfcnn import distributed
set_to = distributed.split_cpu_into_devices(int(sys.argv[1]), cores=int(sys.argv[2]))
import jax
print(json.dumps([set_to, jax.device_count(), jax.devices()[0].platform]))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _probe(batch_size: int, cores: int, **env: str) -> list:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(batch_size), str(cores)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_clean_env(**env),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("batch_size", "cores", "devices"),
    [
        (8, 2, 2),  # One device per core.
        (6, 4, 3),  # The most cores whose count divides the batch...
        (5, 4, 1),  # ... which can be one: then nothing is set.
        (64, 64, distributed.MAX_CPU_DEVICES),  # Capped however many cores.
    ],
)
def test_one_device_per_core_that_divides_the_batch(batch_size, cores, devices):
    set_to, count, platform = _probe(batch_size, cores)
    assert (count, platform) == (devices, "cpu")
    assert set_to == (devices if devices > 1 else 0)


@pytest.mark.parametrize(
    ("env", "devices"),
    [
        ({"JAX_NUM_CPU_DEVICES": "1"}, 1),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3),
    ],
    ids=["JAX_NUM_CPU_DEVICES", "XLA_FLAGS"],
)
def test_a_count_the_user_chose_is_kept(env, devices):
    assert _probe(8, 2, **env) == [0, devices, "cpu"]


def test_too_late_once_the_backends_exist_changes_nothing():
    import jax

    before = jax.device_count()  # Starts this process's backends.
    assert distributed.split_cpu_into_devices(8, cores=2) == 0
    assert jax.device_count() == before


@pytest.mark.parametrize("batch_size", [0, -4, 2.5, "8"])
def test_an_invalid_batch_size_is_left_to_config_validation(batch_size):
    assert distributed.split_cpu_into_devices(batch_size, cores=2) == 0
