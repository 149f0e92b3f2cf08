"""Tests for jfcnn.models.maskrcnn: head shapes at ResNet-50 widths, losses, inference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfcnn.models.maskrcnn import MaskRCNN, smooth_l1

# A model small enough to compile and train a few steps in seconds.
TINY = dict(
    depth=18,
    stage_sizes=(1, 1, 1, 1),
    width=8,
    norm="group",
    fpn_channels=16,
    fpn_in_features=("res2", "res3", "res4"),
    anchor_sizes=((16,), (32,), (64,), (128,)),
    rpn_pre_nms_top_n_train=64,
    rpn_post_nms_top_n_train=64,
    rpn_pre_nms_top_n_test=32,
    rpn_post_nms_top_n_test=32,
    rpn_batch_size_per_image=64,
    roi_batch_size_per_image=32,
    mask_rois_per_image=8,
    box_head_dim=32,
    mask_head_channels=8,
    mask_head_convs=2,
    detections_per_image=10,
    roi_align="dense",
)
TINY_C4 = dict(TINY, mask_head="c4", anchor_sizes=((16, 32, 64),))
KEY = jax.random.key(0)
# Initialization runs once: unoptimized compilation is much faster (see jfcnn.train).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _init(model, images):
    init = jax.jit(lambda key: model.init(key, images[:1], method=MaskRCNN.initialize))
    return init.lower(KEY).compile(FAST_COMPILE)(KEY)


def _abstract_variables(model, image_size=64):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(KEY, x, method=MaskRCNN.initialize), images)


def _submodule_shapes(model, variables, name, inputs):
    """Output shape of submodule ``name`` and of every layer inside it."""

    def run(v, x):
        return model.apply(
            v,
            x,
            method=lambda m, x: getattr(m, name)(x),
            capture_intermediates=True,
            mutable=["intermediates"],
        )

    out, state = jax.eval_shape(run, variables, inputs)
    layers = jax.tree.map(lambda s: s.shape, state["intermediates"][name])
    return out, layers


def test_c4_heads_at_resnet50_widths():
    model = MaskRCNN(num_classes=81, mask_head="c4", depth=50, anchor_sizes=((32, 64, 128),))
    variables = _abstract_variables(model)
    # ROI Align 14x14 from res4 (1024 channels) -> res5 -> 7x7x2048.
    rois = jax.ShapeDtypeStruct((6, 14, 14, 1024), jnp.float32)
    res5 = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=lambda m, x: m.res5(x, train=False)),
        variables,
        rois,
    )
    assert res5.shape == (6, 7, 7, 2048)
    # -> transposed conv (k2, s2) -> 14x14x256 -> 1x1 conv -> 14x14 x num_classes.
    masks, layers = _submodule_shapes(model, variables, "mask_branch", res5)
    assert layers["deconv"]["__call__"] == ((6, 14, 14, 256),)
    assert masks.shape == (6, 14, 14, 81)
    params = variables["params"]["mask_branch"]
    assert params["deconv"]["kernel"].shape == (2, 2, 2048, 256)
    assert params["predictor"]["kernel"].shape == (1, 1, 256, 81)
    (logits, deltas), _ = _submodule_shapes(
        model, variables, "box_predictor", jax.ShapeDtypeStruct((6, 2048), jnp.float32)
    )
    assert logits.shape == (6, 81) and deltas.shape == (6, 81, 4)
    assert model.mask_size == 14


def test_fpn_heads_at_resnet50_widths():
    model = MaskRCNN(num_classes=81, mask_head="fpn", depth=50)
    variables = _abstract_variables(model)
    pooled = jax.ShapeDtypeStruct((6, 14, 14, 256), jnp.float32)
    masks, layers = _submodule_shapes(model, variables, "mask_branch", pooled)
    for i in range(1, 5):
        assert layers[f"conv{i}"]["__call__"] == ((6, 14, 14, 256),)
    assert layers["deconv"]["__call__"] == ((6, 28, 28, 256),)
    assert masks.shape == (6, 28, 28, 81)
    (logits, deltas), layers = _submodule_shapes(
        model, variables, "box_branch", jax.ShapeDtypeStruct((6, 7, 7, 256), jnp.float32)
    )
    assert layers["fc6"]["__call__"] == ((6, 1024),)
    assert logits.shape == (6, 81) and deltas.shape == (6, 81, 4)
    assert model.mask_size == 28


@pytest.mark.parametrize("mask_head, mask_size", [("fpn", 28), ("c4", 14)])
def test_full_model_output_shapes_at_resnet50_widths(mask_head, mask_size):
    anchors = {"c4": ((32, 64, 128, 256, 512),)}.get(mask_head, MaskRCNN.anchor_sizes)
    model = MaskRCNN(num_classes=81, mask_head=mask_head, depth=50, anchor_sizes=anchors)
    variables = _abstract_variables(model, 128)
    images = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
    want = {
        "boxes": ((2, 100, 4), jnp.float32),
        "scores": ((2, 100), jnp.float32),
        "classes": ((2, 100), jnp.int32),
        "detection_valid": ((2, 100), jnp.bool_),
        "masks": ((2, 100, 128, 128), jnp.uint8),
        "mask_probs": ((2, 100, mask_size, mask_size), jnp.float32),
    }
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == want


def test_smooth_l1_values():
    x = jnp.array([-1.0, -0.1, 0.0, 0.05, 2.0])
    beta = 1.0 / 9.0
    want = [1.0 - beta / 2, 0.1**2 / 2 / beta, 0.0, 0.05**2 / 2 / beta, 2.0 - beta / 2]
    np.testing.assert_allclose(smooth_l1(x), want, rtol=1e-6)


def _toy_batch(num_images=2, size=64):
    """Bright rectangles on a dark background, with their boxes and masks."""
    rng = np.random.default_rng(0)
    max_instances = 4
    images = rng.uniform(0.0, 0.2, (num_images, size, size, 3)).astype(np.float32)
    boxes = np.zeros((num_images, max_instances, 4), np.float32)
    labels = np.zeros((num_images, max_instances), np.int32)
    masks = np.zeros((num_images, max_instances, size, size), np.uint8)
    valid = np.zeros((num_images, max_instances), bool)
    for b in range(num_images):
        for k, (x, y, w, h, c) in enumerate([(4, 6, 20, 14, 1), (30, 28, 24, 30, 2)][: b + 1]):
            images[b, y : y + h, x : x + w, c] = 0.9
            masks[b, k, y : y + h, x : x + w] = 1
            boxes[b, k] = [x, y, x + w, y + h]
            labels[b, k] = c
            valid[b, k] = True
    targets = {
        "boxes": jnp.asarray(boxes),
        "labels": jnp.asarray(labels),
        "instance_masks": jnp.asarray(masks),
        "instance_valid": jnp.asarray(valid),
    }
    return jnp.asarray(images), targets


@pytest.mark.parametrize("config", [TINY, TINY_C4], ids=["fpn", "c4"])
def test_training_lowers_the_loss_and_inference_is_consistent(config):
    model = MaskRCNN(num_classes=3, **config)
    images, targets = _toy_batch()
    variables = _init(model, images)
    params = variables["params"]
    keys = jax.random.split(jax.random.key(1), images.shape[0])

    def loss_fn(params):
        losses, stats = model.apply(
            {"params": params}, images, targets, keys, method=MaskRCNN.losses
        )
        return sum(v.mean() for v in losses.values()), (losses, stats)

    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        (loss, (losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, losses, stats

    opt_state = tx.init(params)
    history = []
    for _ in range(10):
        params, opt_state, loss, losses, stats = step(params, opt_state)
        history.append(float(loss))
        assert all(np.all(np.isfinite(v)) for v in losses.values())
    assert set(losses) == {"rpn_objectness", "rpn_box", "classification", "box_regression", "mask"}
    assert all(v.shape == (2,) for v in losses.values())
    # The ground-truth boxes are always among the candidates, so every image
    # has positive ROIs (at least one per instance) for the mask loss.
    assert np.all(stats["positive_rois"] >= np.array([1, 2]))
    assert np.mean(history[-3:]) < 0.7 * np.mean(history[:2]), history

    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    valid = np.asarray(out["detection_valid"])
    scores, classes, boxes = map(np.asarray, (out["scores"], out["classes"], out["boxes"]))
    masks = np.asarray(out["masks"])
    assert masks.shape == (2, 10, 64, 64) and masks.dtype == np.uint8
    for b in range(2):
        n = valid[b].sum()
        assert np.all(valid[b, :n]) and not np.any(valid[b, n:])  # valid slots first
        assert np.all(np.diff(scores[b, :n]) <= 0)  # best first
        assert np.all((classes[b, :n] >= 1) & (classes[b, :n] <= 2))
        assert np.all(masks[b, n:] == 0) and np.all(scores[b, n:] == 0)
        assert np.all(boxes[b, :n, 2:] >= boxes[b, :n, :2]) and np.all(boxes[b, :n] <= 64)
        for d in range(n):
            # A pasted mask never leaves its box (pixel centres inside).
            ys, xs = np.nonzero(masks[b, d])
            x1, y1, x2, y2 = boxes[b, d]
            assert np.all((xs + 0.5 >= x1) & (xs + 0.5 <= x2) & (ys + 0.5 >= y1) & (ys + 0.5 <= y2))


def test_losses_of_a_batch_are_the_per_image_losses():
    # Per-image normalization: splitting the batch (over devices) changes nothing.
    model = MaskRCNN(num_classes=3, **TINY)
    images, targets = _toy_batch()
    variables = _init(model, images)
    keys = jax.random.split(jax.random.key(1), 2)
    losses_fn = jax.jit(lambda v, x, t, k: model.apply(v, x, t, k, method=MaskRCNN.losses)[0])
    together = losses_fn(variables, images, targets, keys)
    for b in range(2):
        alone = losses_fn(
            variables,
            images[b : b + 1],
            {k: t[b : b + 1] for k, t in targets.items()},
            keys[b : b + 1],
        )
        for name, value in alone.items():
            np.testing.assert_allclose(value[0], together[name][b], rtol=2e-4, atol=1e-6)


def test_rejects_bad_configs():
    images = jnp.zeros((1, 64, 64, 3))
    with pytest.raises(ValueError, match="mask_head"):
        MaskRCNN(num_classes=3, mask_head="c5").init(KEY, images, method=MaskRCNN.initialize)
    model = MaskRCNN(num_classes=3, **dict(TINY, anchor_sizes=((16,),)))
    with pytest.raises(ValueError, match="anchor_sizes has 1 levels"):
        jax.eval_shape(lambda: model.init(KEY, images))
    model = MaskRCNN(num_classes=3, **dict(TINY, roi_batch_size_per_image=80))
    images, targets = _toy_batch()
    keys = jax.random.split(KEY, 2)
    with pytest.raises(ValueError, match="roi_batch_size_per_image=80"):
        jax.eval_shape(lambda: model.init(KEY, images, targets, keys, method=MaskRCNN.losses))
