"""Mask R-CNN refuses sizes, dtypes and ranges it was not built for, saying which."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs

from jfcnn import tasks
from jfcnn.errors import ConfigError
from jfcnn.models.maskrcnn import MaskRCNN
from jfcnn.tasks import instance


@pytest.fixture(scope="module")
def model_and_variables():
    model = MaskRCNN(num_classes=3, norm="group", **tiny_configs.MASKRCNN)
    images = jnp.zeros((1, 64, 64, 3))
    variables = model.init(jax.random.PRNGKey(0), images, method=MaskRCNN.initialize)
    return model, variables


@pytest.mark.parametrize(
    "side, suggestion", [(130, "128 or 160"), (150, "128 or 160"), (100, "96 or 128")]
)
def test_sizes_that_are_not_multiples_of_32_are_rejected(model_and_variables, side, suggestion):
    model, variables = model_and_variables
    with pytest.raises(ValueError, match=f"{side}x{side}.*multiples of 32 \\(e.g. {suggestion}\\)"):
        model.apply(variables, jnp.zeros((1, side, side, 3)), train=False)


def test_uint8_images_are_rejected(model_and_variables):
    model, variables = model_and_variables
    with pytest.raises(TypeError, match="floats in \\[0, 1\\], got dtype uint8.*/ 255"):
        model.apply(variables, jnp.zeros((1, 64, 64, 3), jnp.uint8), train=False)


def test_predict_rejects_pixels_in_0_255():
    images = np.full((1, 64, 64, 3), 200.0, np.float32)
    with pytest.raises(ValueError, match="\\[0, 1\\], got values in \\[200, 200\\]: divide"):
        instance.check_image_values(images)
    with pytest.raises(TypeError, match="uint8"):
        instance.check_image_values(images.astype(np.uint8))
    ok = np.linspace(0, 1, 64 * 64 * 3, dtype=np.float64).reshape(1, 64, 64, 3)
    checked = instance.check_image_values(ok)
    assert checked.dtype == np.float32
    np.testing.assert_array_equal(checked, ok.astype(np.float32))


@pytest.mark.parametrize("size, ok", [(100, False), (130, False), (96, True), (128, True)])
def test_config_image_size_must_fit_the_model(size, ok):
    config = tiny_configs.shipped_config("maskrcnn.py")
    config.data.image_size = size
    if ok:
        tasks.validate_config(config)
    else:
        with pytest.raises(ConfigError, match=f"`data.image_size` is {size}.*multiple of 32"):
            tasks.validate_config(config)
