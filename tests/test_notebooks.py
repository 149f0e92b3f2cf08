"""The lecture notebooks run, top to bottom, and are committed without outputs.

Each notebook in ``notebooks/`` is executed in a fresh kernel of this
interpreter with ``JFCNN_NOTEBOOK_FAST=1`` (the notebooks' small settings).
Their cells assert what they show, so a notebook that runs is a notebook whose
pictures and tables still match the ops. Committed notebooks carry no outputs:
outputs would go stale the moment an op changed, and the executed versions are
one ``jupyter execute`` away.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(name for name in os.listdir(NOTEBOOK_DIR) if name.endswith(".ipynb"))
# Whole-notebook budget in fast mode. On an idle 2-core CPU the two op notebooks
# take well under a minute each (mostly importing torch and JAX), the two that
# train about 1.5 minutes each (mostly compiling); the rest is for loaded machines.
NOTEBOOK_TIMEOUT_S = 360
# A kernel spec of its own, so that a user-level "python3" spec pointing at
# another interpreter cannot be picked up instead of this one.
KERNEL_NAME = "jfcnn-notebook-test"
# IPython colours its tracebacks; pytest's report is plain text.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def test_notebooks_are_found():
    assert {
        "mask_rcnn.ipynb",
        "roi_align.ipynb",
        "transposed_convolution.ipynb",
        "unet.ipynb",
    } <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    nbformat.validate(nb)
    stale = [
        index
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not stale, (
        f"{name}: cells {stale} carry outputs; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace notebooks/{name})"
    )
    assert "widgets" not in nb.metadata, (
        f"{name}: saved widget state; delete the notebook's metadata.widgets before committing"
    )


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> str:
    """A Jupyter data directory holding a kernel spec that runs this interpreter."""
    data_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = data_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jfcnn notebook test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(data_dir)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_spec_dir, monkeypatch, tmp_path):
    path = os.path.join(NOTEBOOK_DIR, name)
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("JFCNN_NOTEBOOK_FAST", "1")
    # The notebooks' scratch directories (tempfile.mkdtemp) go where pytest removes them.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", kernel_spec_dir)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # jfcnn importable from the kernel even without an editable install.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    )
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S

    def remaining_time(cell) -> int:
        # nbclient's timeout is per cell; giving each cell what is left of the
        # notebook's budget makes it a per-notebook timeout.
        return max(1, int(deadline - time.monotonic()))

    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout_func=remaining_time,
        resources={"metadata": {"path": NOTEBOOK_DIR}},
    )
    failure = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        # The message holds the failing cell's source and traceback.
        failure = f"{name} failed:\n{error}"
    except nbclient.exceptions.CellTimeoutError as error:
        failure = f"{name} ran past its {NOTEBOOK_TIMEOUT_S} s budget:\n{error}"
    if failure is not None:  # Outside the except: one traceback, not a chain of two.
        pytest.fail(_ANSI_ESCAPE.sub("", failure), pytrace=False)
