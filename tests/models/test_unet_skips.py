"""UNet(skip_connections=False): a decoder that sees the encoder only through the bottleneck."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.models import UNet
from jfcnn.models.unet import DoubleConv

DEPTH, BASE = 3, 4


def _init(skips: bool, norm: str = "group", size: int = 16):
    model = UNet(num_classes=3, depth=DEPTH, base_width=BASE, norm=norm, skip_connections=skips)
    images = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    return model, images, model.init(jax.random.key(1), images, train=False)


def _shapes(variables):
    return jax.tree_util.tree_map(lambda a: a.shape, variables)


def test_default_is_the_skip_unet():
    model, images, variables = _init(True)
    default = UNet(num_classes=3, depth=DEPTH, base_width=BASE, norm="group")
    assert default.skip_connections is True
    np.testing.assert_array_equal(
        default.apply(variables, images, train=False), model.apply(variables, images, train=False)
    )


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_params_same_names_decoder_input_channels_without_concatenation(norm):
    _, _, with_skips = _init(True, norm)
    _, _, without = _init(False, norm)
    shapes_on, shapes_off = _shapes(with_skips), _shapes(without)
    # Same parameter names (checkpoints and converters see the same tree).
    assert jax.tree_util.tree_structure(shapes_on) == jax.tree_util.tree_structure(shapes_off)
    for level in range(DEPTH):
        width = BASE * 2**level
        # Input of dec_l: skip (width) + up-sampled (width) channels, or the up-sampled alone.
        assert shapes_on["params"][f"dec_{level}"]["conv1"]["kernel"] == (3, 3, 2 * width, width)
        assert shapes_off["params"][f"dec_{level}"]["conv1"]["kernel"] == (3, 3, width, width)
    # Everything else is identical.
    flat_on = dict(jax.tree_util.tree_leaves_with_path(shapes_on, is_leaf=_is_shape))
    flat_off = dict(jax.tree_util.tree_leaves_with_path(shapes_off, is_leaf=_is_shape))
    differing = {jax.tree_util.keystr(k) for k in flat_on if flat_on[k] != flat_off[k]}
    assert differing == {f"['params']['dec_{level}']['conv1']['kernel']" for level in range(DEPTH)}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(v, int) for v in x)


@pytest.mark.parametrize("size", [16, 20])  # 20: odd sizes after pooling, resize path.
def test_output_shape_unchanged(size):
    for skips in (True, False):
        model, images, variables = _init(skips, size=size)
        assert model.apply(variables, images, train=False).shape == (2, size, size, 3)


def _bottleneck_fixed_to(value):
    """Replaces the bottleneck DoubleConv's output with ``value``."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, DoubleConv) and context.module.name == "bottleneck":
            return jnp.broadcast_to(value, out.shape).astype(out.dtype)
        return out

    return nn.intercept_methods(interceptor)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_without_skips_output_depends_on_encoder_only_through_bottleneck(norm):
    """With the bottleneck's output held fixed, the images no longer matter."""
    model, images, variables = _init(False, norm)
    other_images = jax.random.normal(jax.random.key(7), images.shape) * 3.0
    bottleneck = jax.random.normal(jax.random.key(3), (2, 2, 2, BASE * 2**DEPTH))
    with _bottleneck_fixed_to(bottleneck):
        out_a = model.apply(variables, images, train=False)
        out_b = model.apply(variables, other_images, train=False)
        # The gradient w.r.t. the images (i.e. through the skip path, the only other
        # route) is exactly zero.
        grad = jax.grad(lambda x: model.apply(variables, x, train=False).sum())(images)
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(grad, np.zeros_like(grad))
    # Sanity: the same fixed bottleneck with skips on lets the images through.
    model_on, _, variables_on = _init(True, norm)
    with _bottleneck_fixed_to(bottleneck):
        on_a = model_on.apply(variables_on, images, train=False)
        on_b = model_on.apply(variables_on, other_images, train=False)
    assert np.abs(np.asarray(on_a) - np.asarray(on_b)).max() > 1e-3


def test_without_skips_decoder_is_a_function_of_the_bottleneck():
    """Value equivalence: the output equals the decoder run on the captured bottleneck."""
    model, images, variables = _init(False, "none")
    out, state = model.apply(
        variables,
        images,
        train=False,
        capture_intermediates=lambda m, _: isinstance(m, DoubleConv) and m.name == "bottleneck",
        mutable=["intermediates"],
    )
    (bottleneck,) = state["intermediates"]["bottleneck"]["__call__"]
    # Feed the captured bottleneck into a run on unrelated images: same output.
    with _bottleneck_fixed_to(bottleneck):
        again = model.apply(variables, jnp.zeros_like(images), train=False)
    np.testing.assert_allclose(again, out, rtol=0, atol=0)


def test_config_flag_reaches_the_model():
    """``--config.model.skip_connections=False`` passes validation and reaches the UNet."""
    from absl import flags
    from ml_collections import config_flags
    from tiny_configs import ROOT

    from jfcnn import tasks

    argv = ["prog", f"--config={ROOT}/configs/unet.py", "--config.model.skip_connections=False"]
    flag_values = flags.FlagValues()
    # sys_argv: the override flags are defined from the command line they will parse.
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.model.skip_connections is False
    tasks.validate_config(config)
    model = tasks.build_model(config, 3, {"unet": UNet})
    assert model.skip_connections is False
