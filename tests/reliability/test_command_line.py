"""Every user mistake gets one `error:` line, a non-zero exit, and an untouched work directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from jfcnn import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(*args: str, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed run (TensorFlow's start-up chatter aside)."""
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--config.num_train_step=5"], "unknown config key `num_train_step`.*`num_train_steps`"),
        (
            ["--config.model.base_widht=8"],
            "unknown config key `model.base_widht`.*`model.base_width`",
        ),
        (["--config.model.norm=layer"], "`model.norm` is 'layer'; choose one of"),
        (["--config.data.name=nonexistent"], "Unknown data set 'nonexistent'"),
        (["--config.batch_size=many"], "batch_size=many"),
    ],
)
def test_bad_override_is_one_line_and_writes_nothing(tmp_path, flags, expected):
    workdir = tmp_path / "run"
    result = _train("--config", "configs/unet.py", "--workdir", str(workdir), *flags)
    assert re.search(expected, _error_line(result)), result.stderr[-2000:]
    assert not workdir.exists()


def test_missing_or_broken_config_file(tmp_path):
    line = _error_line(_train("--config", "configs/nope.py", "--workdir", str(tmp_path / "a")))
    assert "configs/nope.py does not exist" in line
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    line = _error_line(_train("--config", str(broken), "--workdir", str(tmp_path / "b")))
    assert "could not be loaded (line 1): SyntaxError" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_workdir_that_is_a_file_or_unwritable(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    small = ["--config.num_train_steps=1", "--config.data.image_size=32"]
    line = _error_line(_train("--config", "configs/unet.py", "--workdir", str(a_file), *small))
    assert "is a file, not a directory" in line
    assert a_file.read_text() == "mine"
    # /proc refuses new directories even to root: a stand-in for a read-only disk.
    line = _error_line(_train("--config", "configs/unet.py", "--workdir", "/proc/jfcnn", *small))
    assert "Cannot write to --workdir /proc/jfcnn" in line


def test_resuming_with_another_model_names_the_saved_one(tmp_path):
    # A work directory as a U-Net run leaves it (config.json and checkpoints/).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, runpy; sys.path.insert(0, sys.argv[1]); "
            "from jfcnn import checkpoint; "
            "checkpoint.save_config(sys.argv[2], runpy.run_path(sys.argv[3])['get_config']())",
            ROOT,
            str(tmp_path),
            os.path.join(ROOT, "configs", "unet.py"),
        ],
        check=True,
        capture_output=True,
    )
    (tmp_path / "checkpoints").mkdir()
    before = (tmp_path / "config.json").read_text()
    line = _error_line(
        _train("--config", "configs/maskrcnn.py", "--workdir", str(tmp_path), timeout=600)
    )
    assert "holds a run of task 'semantic' with model 'unet'" in line
    assert "config.json" in line
    assert (tmp_path / "config.json").read_text() == before


_HOLD_LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
from jfcnn import workdir
with workdir.lock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_run_on_a_workdir_stops_with_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, ROOT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.WorkdirError, match=f"in use by process {holder.pid} on"):
            with workdir_lib.lock(str(tmp_path)):
                pass
        line = _error_line(
            _train(
                "--config",
                "configs/unet.py",
                "--workdir",
                str(tmp_path),
                "--config.data.image_size=32",
                "--config.data.train_split=train[:16]",
                "--config.data.eval_split=validation[:8]",
                timeout=600,
            )
        )
        assert f"in use by process {holder.pid}" in line
        assert not (tmp_path / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the stale lock file blocks nothing.
    assert (tmp_path / workdir_lib.LOCK_FILE).exists()
    with workdir_lib.lock(str(tmp_path)):
        with open(tmp_path / workdir_lib.LOCK_FILE) as f:
            assert json.load(f)["pid"] == os.getpid()
