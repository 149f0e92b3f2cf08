"""`import jfcnn.ops` (and using it) must not import TensorFlow, `jfcnn.data`,
`jfcnn.tasks`, `jfcnn.train` or `jfcnn.models`: other JAX projects use these ops
without paying for, or conflicting with, a TensorFlow install."""

import subprocess
import sys
import textwrap


def test_ops_do_not_import_tensorflow():
    script = textwrap.dedent(
        """
        import sys

        import jax.numpy as jnp

        import jfcnn.ops

        out = jfcnn.ops.roi_align(jnp.ones((4, 4, 1)), jnp.array([[0.5, 0.5, 2.5, 2.5]]), 2)
        assert out.shape == (1, 2, 2, 1), out.shape
        assert float(out.sum()) == 4.0, out
        boxes = jnp.array([[[0.5, 0.5, 2.5, 2.5]]])
        dense = jfcnn.ops.roi_align_dense(jnp.ones((1, 4, 4, 1)), boxes, 2)
        assert float(dense.sum()) == 4.0, dense
        banned = ("tensorflow", "jfcnn.data", "jfcnn.tasks", "jfcnn.train", "jfcnn.models")
        leaked = sorted(
            m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in banned)
        )
        print("LEAKED", leaked)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout, result.stdout
