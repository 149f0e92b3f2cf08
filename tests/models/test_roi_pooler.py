"""MaskRCNN(roi_pooler="pool"): both ROI heads designs pool with jfcnn.ops.roi_pool.

The pooled features the heads actually receive in a forward pass are captured
(`nn.intercept_methods`) and compared with `roi_pool` called directly on the
same feature maps and boxes; an unknown `roi_pooler` is rejected by the model
and by config validation.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs

from jfcnn import tasks
from jfcnn.errors import ConfigError
from jfcnn.models.fpn import FPN
from jfcnn.models.maskrcnn import RPN, FPNBoxHead, MaskHead, MaskRCNN, Res5ROIHeads
from jfcnn.models.resnet import ResNet, ResNetStage
from jfcnn.ops import fpn_levels, roi_pool

TINY = dict(tiny_configs.MASKRCNN, norm="group")
TINY_C4 = dict(TINY, **tiny_configs.MASKRCNN_C4)
KEY = jax.random.key(0)
IMAGE_SIZE = 128  # Boxes of up to 128 pixels reach the second FPN level.
# Everything runs once: unoptimized compilation is much faster (see jfcnn.train).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
TINY_POOL = {"box": 7, "mask": 14}  # MaskRCNN's default box_pool_size and mask_pool_size.


def _images():
    return jax.random.uniform(jax.random.key(1), (2, IMAGE_SIZE, IMAGE_SIZE, 3))


def _record(seen, next_fun, args, kwargs, context):
    """Interceptor keeping the maps, the proposals and the heads' pooled inputs in `seen`."""
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__":
        return out
    if isinstance(module, (FPN, ResNet)) and not isinstance(module.parent, ResNet):
        seen[type(module).__name__] = out
    elif isinstance(module, RPN):
        seen["proposals"] = out[0]
    elif isinstance(module, (FPNBoxHead, MaskHead)) or (
        isinstance(module, ResNetStage) and isinstance(module.parent, Res5ROIHeads)
    ):
        seen.setdefault(type(module).__name__, []).append(args[0])
    return out


def _run_once(fun, *args):
    return jax.jit(fun).lower(*args).compile(FAST_COMPILE)(*args)


def _forward_capturing(model, variables, images):
    """The model's outputs, and what `_record` saw during the forward pass."""

    def run(variables, images):
        seen = {}
        with nn.intercept_methods(functools.partial(_record, seen)):
            outputs = model.apply(variables, images)
        return outputs, seen

    return _run_once(run, variables, images)


def _init(model, images):
    return _run_once(lambda key: model.init(key, images[:1], method=MaskRCNN.initialize), KEY)


def _pool_by_level(maps, strides, boxes, size):
    """`roi_pool` of `(B, N, 4)` boxes from each box's FPN level, assembled per box."""
    k_min = int(np.log2(strides[0]))
    levels = np.asarray(fpn_levels(boxes, k_min=k_min, k_max=k_min + len(strides) - 1))
    per_level = [
        np.asarray(roi_pool(m, boxes, size, spatial_scale=1.0 / s))
        for m, s in zip(maps, strides, strict=True)
    ]
    out = np.zeros_like(per_level[0])
    for b, n in np.ndindex(*levels.shape):
        out[b, n] = per_level[levels[b, n]][b, n]
    return out, levels


def test_fpn_heads_pool_with_roi_pool():
    images = _images()
    model = MaskRCNN(num_classes=3, roi_pooler="pool", **TINY)
    variables = _init(model, images)
    outputs, seen = _forward_capturing(model, variables, images)
    pyramid = seen["FPN"]
    names = sorted(pyramid, key=lambda name: int(name[1:]))[: len(TINY["fpn_in_features"])]
    maps = [pyramid[name] for name in names]
    strides = (4, 8, 16)
    assert [IMAGE_SIZE // m.shape[1] for m in maps] == list(strides)

    (box_input,) = seen["FPNBoxHead"]
    proposals = seen["proposals"]
    expected, levels = _pool_by_level(maps, strides, proposals, TINY_POOL["box"])
    np.testing.assert_array_equal(box_input, expected.reshape(box_input.shape))
    assert np.std(expected) > 0  # Real features, not zeros.

    (mask_input,) = seen["MaskHead"]
    expected, _ = _pool_by_level(maps, strides, outputs["boxes"], TINY_POOL["mask"])
    np.testing.assert_array_equal(mask_input, expected.reshape(mask_input.shape))
    for value in jax.tree.leaves(outputs):
        assert np.all(np.isfinite(np.asarray(value, np.float32)))

    # Boxes for every level (the random proposals are all small), through the box head.
    boxes = jnp.array(
        [
            [[4.0, 8.0, 40.0, 30.0], [0.0, 0.0, 127.0, 127.0], [-30.0, 10.0, 200.0, 300.0]],
            [[60.0, 60.0, 61.0, 61.0], [10.0, 5.0, 125.0, 120.0], [0.0, 0.0, 500.0, 500.0]],
        ]
    )
    box_input = _box_head_input(model, variables, maps, boxes)
    expected, levels = _pool_by_level(maps, strides, boxes, TINY_POOL["box"])
    assert set(levels.ravel()) == {0, 1, 2}
    np.testing.assert_array_equal(box_input, expected.reshape(box_input.shape))
    # The same weights with ROI Align see other features: the field switches the op.
    align = MaskRCNN(num_classes=3, roi_pooler="align", **TINY)
    assert not np.allclose(_box_head_input(align, variables, maps, boxes), box_input)


def _box_head_input(model, variables, maps, boxes):
    """What the FPN box head receives for `boxes`."""

    def run(variables, maps, boxes):
        seen = {}
        with nn.intercept_methods(functools.partial(_record, seen)):
            model.apply(
                variables,
                maps,
                boxes,
                method=lambda m, maps, b: m.heads.box_predictions(maps, b, False),
            )
        return seen["FPNBoxHead"][0]

    return _run_once(run, variables, maps, boxes)


def test_c4_heads_pool_with_roi_pool():
    images = _images()
    model = MaskRCNN(num_classes=3, roi_pooler="pool", **TINY_C4)
    variables = _init(model, images)
    outputs, seen = _forward_capturing(model, variables, images)
    res4 = seen["ResNet"]["res4"]
    size = model.mask_pool_size
    box_input, mask_input = seen["ResNetStage"]  # res5 runs on proposals, then on detections.
    expected = roi_pool(res4, seen["proposals"], size, spatial_scale=1.0 / 16)
    np.testing.assert_array_equal(box_input, np.asarray(expected).reshape(box_input.shape))
    assert np.std(expected) > 0
    expected = roi_pool(res4, outputs["boxes"], size, spatial_scale=1.0 / 16)
    np.testing.assert_array_equal(mask_input, np.asarray(expected).reshape(mask_input.shape))


def test_training_losses_with_roi_pool_are_finite_and_differentiable():
    images = _images()[:1, :64, :64]  # Small: the gradient's compilation dominates.
    model = MaskRCNN(num_classes=3, roi_pooler="pool", **TINY)
    variables = _init(model, images)
    masks = jnp.zeros((1, 2, 64, 64), jnp.uint8).at[0, 0, 10:50, 20:60].set(1)
    targets = {
        "boxes": jnp.array([[[20.0, 10.0, 60.0, 50.0], [0.0, 0.0, 0.0, 0.0]]]),
        "labels": jnp.array([[1, 0]]),
        "instance_valid": jnp.array([[True, False]]),
        "instance_masks": masks,
    }

    def loss(params):
        losses, _ = model.apply(
            {**variables, "params": params},
            images,
            targets,
            jax.random.split(KEY, 1),
            method=MaskRCNN.losses,
        )
        return sum(jnp.sum(v) for v in losses.values())

    value, grads = _run_once(jax.value_and_grad(loss), variables["params"])
    assert np.isfinite(float(value))
    # ROI pooling passes gradients to the features: the FPN and the backbone learn.
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["fpn"]))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("design", [TINY, TINY_C4])
def test_unknown_roi_pooler_is_rejected(design):
    model = MaskRCNN(num_classes=3, roi_pooler="roipool", **design)
    with pytest.raises(
        ValueError, match=r"roi_pooler must be one of \('align', 'pool'\), got 'roipool'"
    ):
        model.init(KEY, _images()[:1, :64, :64], method=MaskRCNN.initialize)


def test_config_validation_names_the_roi_pooler_choices():
    config = tiny_configs.shipped_config("maskrcnn.py")
    config.unlock()
    config.model.roi_pooler = "pool"
    tasks.validate_config(config)
    config.model.roi_pooler = "max"
    with pytest.raises(ConfigError, match=r"model.roi_pooler.*'max'.*\['align', 'pool'\]"):
        tasks.validate_config(config)
