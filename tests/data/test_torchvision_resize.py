"""torchvision's detection resize as a fit mode (``config.data.resize = "torchvision"``).

The sizes must be torchvision's exactly (its ``_resize_image_and_masks``:
``interpolate(scale_factor=..., recompute_scale_factor=True)`` floors
``side * scale`` in double precision), the pixels its bilinear interpolation,
and the evaluation pipeline must resize the same way and say where each image
ends on its canvas.
"""

from __future__ import annotations

import numpy as np
import pytest

import jfcnn.data as data_lib
from jfcnn.data import pipeline
from jfcnn.errors import ConfigError

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")


def _torchvision_resized(height, width, min_size, max_size):
    from torchvision.models.detection.transform import _resize_image_and_masks

    image = torch.zeros((1, height, width))
    return tuple(_resize_image_and_masks(image, min_size, max_size)[0].shape[1:])


@pytest.mark.parametrize(
    ("height", "width", "min_size", "max_size"),
    [
        (480, 640, 800, 1333),  # COCO's common size: the shorter side binds.
        (427, 640, 800, 1333),
        (200, 1000, 800, 1333),  # The longer side binds.
        (640, 427, 800, 1333),
        (150, 322, 320, 512),  # 322 * (512 / 322) floors to 511.
        (75, 161, 160, 256),
        (1, 1, 800, 1333),
        (333, 333, 800, 1333),
    ],
)
def test_sizes_are_torchvision_sizes(height, width, min_size, max_size):
    got = [int(n) for n in pipeline.torchvision_size(height, width, min_size, max_size)]
    assert tuple(got) == _torchvision_resized(height, width, min_size, max_size)


def test_many_sizes_are_torchvision_sizes():
    rng = np.random.default_rng(0)
    for height, width in rng.integers(20, 700, (200, 2)):
        got = [int(n) for n in pipeline.torchvision_size(height, width, 160, 256)]
        assert tuple(got) == _torchvision_resized(int(height), int(width), 160, 256)


def test_fit_image_is_torchvision_interpolation_on_a_zero_canvas():
    image = np.random.default_rng(1).integers(0, 256, (75, 161, 3), np.uint8)
    canvas, resized = pipeline.fit_image(image, 256, True, torchvision=(160, 256))
    canvas = canvas.numpy()
    assert canvas.shape == (256, 256, 3) and list(resized.numpy()) == [119, 255]
    tensor = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(
        tensor, scale_factor=256 / 161, mode="bilinear", recompute_scale_factor=True
    )[0].permute(1, 2, 0)
    np.testing.assert_allclose(canvas[:119, :255], want.numpy(), atol=1e-5)
    assert not canvas[119:].any() and not canvas[:, 255:].any()


def test_eval_pipeline_resizes_as_torchvision_and_reports_the_size(make_config):
    config = make_config(
        eval_split="validation[:2]", image_size=64, resize="torchvision", min_size=40, max_size=60
    )
    batch = next(data_lib.create_eval_iterator(config, instances=True))
    # The built-in images are 128 x 128: the shorter side binds, 128 * (40 / 128) = 40.
    np.testing.assert_array_equal(batch["resized_size"][:2], [[40, 40], [40, 40]])
    assert batch["image"][:2, :40, :40].any() and not batch["image"][:2, 40:].any()
    assert not batch["instance_masks"][:2, :, 40:].any()
    train = next(data_lib.create_train_iterator(config, instances=True))
    assert train["image"].shape == (8, 64, 64, 3)


def test_bad_torchvision_resize_configs_name_the_fix(make_config):
    config = make_config(image_size=64, resize="torchvision", min_size=40, max_size=100)
    with pytest.raises(
        ConfigError,
        match=r"data.image_size` is 64, smaller than.*Set "
        r"data.image_size to 128",
    ):
        data_lib.create_eval_iterator(config)
    with pytest.raises(ConfigError, match="data.resize` is 'torchvison'; choose 'fit'"):
        data_lib.create_eval_iterator(make_config(resize="torchvison"))
