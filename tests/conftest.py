"""Session-wide test setup.

torch (the CUDA build that the `test` extra installs) segfaults when it is
imported after TensorFlow in the same process, so it is imported here first,
before any test module or fixture imports TensorFlow.

Under CI (``CI`` set), a skipped test fails the run: the torchvision
cross-checks are the strongest parity evidence and must never be silently
skipped because an optional dependency is missing.
"""

from __future__ import annotations

import os

try:  # Import order matters; see the module docstring.
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:  # Outside CI the torch cross-checks skip without torch.
    pass


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not os.environ.get("CI") or reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if skipped and exitstatus == 0:
        reporter.write_line(
            f"error: {len(skipped)} test(s) skipped under CI; install the `test` extra "
            "(it includes torch and torchvision) so that every cross-check runs.",
            red=True,
        )
        session.exitstatus = 1
