"""The optional ``progress`` callback of ``train_and_evaluate`` (the notebooks' progress bars)."""

from __future__ import annotations

import math

import tiny_configs

from jfcnn.train import train_and_evaluate


def test_progress_is_called_at_each_logged_step_with_the_logged_metrics(shapes_data_dir, tmp_path):
    config = tiny_configs.shipped_config("unet.py")
    overrides = {**tiny_configs.UNET_OVERRIDES, "data.data_dir": shapes_data_dir}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    calls = []

    result = train_and_evaluate(config, str(tmp_path), progress=lambda *args: calls.append(args))

    # 12 steps, logged every 4, with a checkpoint every 4 and an evaluation at 8:
    # metrics are flushed at steps 4, 8 and 12, once each.
    assert [(step, total) for step, total, _ in calls] == [(4, 12), (8, 12), (12, 12)]
    for _, _, metrics in calls:
        assert {"loss", "learning_rate", "steps_per_sec"} <= set(metrics)
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert result["step"] == 12 and 0.0 <= result["mean_iou"] <= 1.0

    # Resuming a finished run trains no step, so it reports no progress.
    calls.clear()
    train_and_evaluate(config, str(tmp_path), progress=lambda *args: calls.append(args))
    assert calls == []
