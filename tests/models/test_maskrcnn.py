"""Tests for jfcnn.models.maskrcnn: heads against torchvision, hand-computed losses,
ResNet-50 shapes of both ROI heads designs, training and inference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_configs

from jfcnn.models.maskrcnn import (
    RENAMED_FIELDS,
    RPN,
    FPNBoxHead,
    MaskHead,
    MaskRCNN,
    fast_rcnn_losses,
    mask_rcnn_inference,
    mask_rcnn_loss,
    rpn_losses,
    smooth_l1,
)

# Group norm: an image's losses must not depend on the other images of the
# batch (see test_losses_of_a_batch_are_the_per_image_losses). The dense ROI
# Align here, the gather one in the end-to-end training tests.
TINY = dict(tiny_configs.MASKRCNN, norm="group", roi_align="dense")
TINY_C4 = dict(TINY, **tiny_configs.MASKRCNN_C4)
KEY = jax.random.key(0)
# Initialization runs once: unoptimized compilation is much faster (see jfcnn.train).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _init(model, images):
    init = jax.jit(lambda key: model.init(key, images[:1], method=MaskRCNN.initialize))
    return init.lower(KEY).compile(FAST_COMPILE)(KEY)


def _abstract_variables(model, image_size=64):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(KEY, x, method=MaskRCNN.initialize), images)


def _heads_submodule_shapes(model, variables, name, inputs):
    """Output shape of ROI heads submodule ``name`` and of every layer inside it."""

    def run(v, x):
        return model.apply(
            v,
            x,
            method=lambda m, x: getattr(m.heads, name)(x),
            capture_intermediates=True,
            mutable=["intermediates"],
        )

    out, state = jax.eval_shape(run, variables, inputs)
    # The heads share the model's scope: their layers sit at the top level.
    layers = jax.tree.map(lambda s: s.shape, state["intermediates"][name])
    return out, layers


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def _t(torch, x):
    return torch.from_numpy(np.asarray(x, np.float32).copy())


def _conv_to_torch(torch, conv, params):
    """Copies a flax ``(KH, KW, Cin, Cout)`` conv into a torch Conv2d."""
    conv.weight.data = _t(torch, np.transpose(params["kernel"], (3, 2, 0, 1)))
    conv.bias.data = _t(torch, params["bias"])


def _linear_to_torch(torch, linear, params):
    linear.weight.data = _t(torch, np.asarray(params["kernel"]).T)
    linear.bias.data = _t(torch, params["bias"])


def _random_params(variables, seed=0):
    """Random values in the tree of ``variables`` (init's tiny weights hide mistakes)."""
    leaves, tree = jax.tree.flatten(variables)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32) for x in leaves]
    )


def _nhwc_to_torch(torch, x):
    return _t(torch, np.transpose(np.asarray(x), (0, 3, 1, 2)))


# -- layers against torchvision, with copied weights ---------------------------------


def test_rpn_head_matches_torchvision_rpn_head():
    torch = _torch()
    from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers

    rpn = RPN(anchor_sizes=((16, 32),) * 2, aspect_ratios=(0.5, 1.0, 2.0))
    rng = np.random.default_rng(0)
    maps = [jnp.asarray(rng.normal(size=(2, s, s, 8)), jnp.float32) for s in (8, 4)]
    variables = _random_params(rpn.init(KEY, maps, method=RPN.head))
    objectness, deltas = rpn.apply(variables, maps, method=RPN.head)
    assert objectness.shape == (2, 6 * (64 + 16)) and deltas.shape == (2, 6 * (64 + 16), 4)

    head = RPNHead(8, 6)
    params = variables["params"]
    _conv_to_torch(torch, head.conv[0][0], params["conv"])
    _conv_to_torch(torch, head.cls_logits, params["cls"])
    _conv_to_torch(torch, head.bbox_pred, params["bbox"])
    with torch.no_grad():
        logits, boxes = head([_nhwc_to_torch(torch, m) for m in maps])
        # torchvision's own flattening: location-major, anchor-minor, level after level.
        want_objectness, want_deltas = concat_box_prediction_layers(logits, boxes)
    np.testing.assert_allclose(objectness.reshape(-1), want_objectness.numpy()[:, 0], atol=1e-5)
    np.testing.assert_allclose(deltas.reshape(-1, 4), want_deltas.numpy(), atol=1e-5)


def test_fpn_box_head_matches_torchvision_two_mlp_head_and_predictor():
    torch = _torch()
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    num_classes, channels, pool, hidden = 5, 6, 7, 16
    head = FPNBoxHead(num_classes, hidden)
    pooled = jnp.asarray(np.random.default_rng(1).normal(size=(3, pool, pool, channels)))
    variables = _random_params(head.init(KEY, pooled), seed=1)
    logits, deltas = head.apply(variables, pooled)

    params = variables["params"]
    mlp = TwoMLPHead(channels * pool * pool, hidden)
    predictor = FastRCNNPredictor(hidden, num_classes)
    # torch flattens (C, H, W), flax (H, W, C): fc6's input rows are permuted.
    fc6 = np.asarray(params["fc6"]["kernel"]).reshape(pool, pool, channels, hidden)
    fc6 = np.transpose(fc6, (2, 0, 1, 3)).reshape(-1, hidden)
    _linear_to_torch(torch, mlp.fc6, {"kernel": fc6, "bias": params["fc6"]["bias"]})
    _linear_to_torch(torch, mlp.fc7, params["fc7"])
    _linear_to_torch(torch, predictor.cls_score, params["predictor"]["cls_score"])
    _linear_to_torch(torch, predictor.bbox_pred, params["predictor"]["bbox_pred"])
    with torch.no_grad():
        want_logits, want_deltas = predictor(mlp(_nhwc_to_torch(torch, pooled)))
    np.testing.assert_allclose(logits, want_logits.numpy(), rtol=1e-5, atol=1e-5)
    # torchvision's box coder reads bbox_pred as (N, K, 4), class-major.
    np.testing.assert_allclose(
        deltas, want_deltas.numpy().reshape(3, num_classes, 4), rtol=1e-5, atol=1e-5
    )


def test_fpn_mask_head_matches_torchvision_mask_rcnn_heads_and_predictor():
    torch = _torch()
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    num_classes, channels, width = 4, 6, 8
    head = MaskHead(num_classes, width, num_convs=2)
    pooled = jnp.asarray(np.random.default_rng(2).normal(size=(2, 14, 14, channels)))
    variables = _random_params(head.init(KEY, pooled), seed=2)
    logits = head.apply(variables, pooled)
    assert logits.shape == (2, 28, 28, num_classes)

    params = variables["params"]
    convs = MaskRCNNHeads(channels, [width, width], dilation=1)
    predictor = MaskRCNNPredictor(width, width, num_classes)
    _conv_to_torch(torch, convs[0][0], params["conv1"])
    _conv_to_torch(torch, convs[1][0], params["conv2"])
    # ConvTranspose2d weights are (Cin, Cout, KH, KW).
    kernel = np.transpose(params["deconv"]["kernel"], (2, 3, 0, 1))
    predictor.conv5_mask.weight.data = _t(torch, kernel)
    predictor.conv5_mask.bias.data = _t(torch, params["deconv"]["bias"])
    _conv_to_torch(torch, predictor.mask_fcn_logits, params["predictor"])
    with torch.no_grad():
        want = predictor(convs(_nhwc_to_torch(torch, pooled))).numpy()
    np.testing.assert_allclose(logits, np.transpose(want, (0, 2, 3, 1)), rtol=1e-4, atol=1e-4)


def test_c4_mask_decoder_matches_torch_conv_transpose_and_conv_at_resnet50_widths():
    # res5's 7x7x2048 ROI features -> ConvTranspose2d(2048, 256, 2, 2) -> ReLU ->
    # 14x14 -> Conv2d(256, 80 + 1, 1): the C4 mask head of COCO.
    torch = _torch()
    num_classes = 81
    model = MaskRCNN(num_classes=num_classes, roi_heads="c4", depth=50, anchor_sizes=((32,),))
    features = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 7, 2048)), jnp.float32)
    variables = _random_params(_abstract_variables(model), seed=3)
    logits = model.apply(variables, features, method=lambda m, x: m.heads.mask_branch(x))
    assert logits.shape == (2, 14, 14, num_classes)

    params = variables["params"]["mask_branch"]
    deconv = torch.nn.ConvTranspose2d(2048, 256, 2, stride=2)
    deconv.weight.data = _t(torch, np.transpose(params["deconv"]["kernel"], (2, 3, 0, 1)))
    deconv.bias.data = _t(torch, params["deconv"]["bias"])
    predictor = torch.nn.Conv2d(256, num_classes, 1)
    _conv_to_torch(torch, predictor, params["predictor"])
    with torch.no_grad():
        want = predictor(torch.relu(deconv(_nhwc_to_torch(torch, features)))).numpy()
    np.testing.assert_allclose(logits, np.transpose(want, (0, 2, 3, 1)), rtol=1e-3, atol=1e-3)


# -- shapes at ResNet-50 widths --------------------------------------------------------


def test_c4_heads_at_resnet50_widths():
    model = MaskRCNN(num_classes=81, roi_heads="c4", depth=50, anchor_sizes=((32, 64, 128),))
    variables = _abstract_variables(model)
    # ROI Align 14x14 from res4 (1024 channels) -> res5 -> 7x7x2048.
    rois = jax.ShapeDtypeStruct((6, 14, 14, 1024), jnp.float32)
    res5 = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=lambda m, x: m.heads.res5(x, train=False)),
        variables,
        rois,
    )
    assert res5.shape == (6, 7, 7, 2048)
    # -> transposed conv (k2, s2) -> 14x14x256 -> 1x1 conv -> 14x14 x num_classes.
    masks, layers = _heads_submodule_shapes(model, variables, "mask_branch", res5)
    assert layers["deconv"]["__call__"] == ((6, 14, 14, 256),)
    assert masks.shape == (6, 14, 14, 81)
    params = variables["params"]["mask_branch"]
    assert params["deconv"]["kernel"].shape == (2, 2, 2048, 256)
    assert params["predictor"]["kernel"].shape == (1, 1, 256, 81)
    (logits, deltas), _ = _heads_submodule_shapes(
        model, variables, "box_predictor", jax.ShapeDtypeStruct((6, 2048), jnp.float32)
    )
    assert logits.shape == (6, 81) and deltas.shape == (6, 81, 4)
    assert model.mask_size == 14
    assert set(variables["params"]) == {"backbone", "rpn", "res5", "box_predictor", "mask_branch"}


def test_fpn_heads_at_resnet50_widths():
    model = MaskRCNN(num_classes=81, roi_heads="fpn", depth=50)
    variables = _abstract_variables(model)
    pooled = jax.ShapeDtypeStruct((6, 14, 14, 256), jnp.float32)
    masks, layers = _heads_submodule_shapes(model, variables, "mask_branch", pooled)
    for i in range(1, 5):
        assert layers[f"conv{i}"]["__call__"] == ((6, 14, 14, 256),)
    assert layers["deconv"]["__call__"] == ((6, 28, 28, 256),)
    assert masks.shape == (6, 28, 28, 81)
    (logits, deltas), layers = _heads_submodule_shapes(
        model, variables, "box_branch", jax.ShapeDtypeStruct((6, 7, 7, 256), jnp.float32)
    )
    assert layers["fc6"]["__call__"] == ((6, 1024),)
    assert logits.shape == (6, 81) and deltas.shape == (6, 81, 4)
    assert model.mask_size == 28
    # The parameter tree keeps its names (torchvision mappings, old checkpoints).
    assert set(variables["params"]) == {"backbone", "fpn", "rpn", "box_branch", "mask_branch"}


@pytest.mark.parametrize("roi_heads, mask_size", [("fpn", 28), ("c4", 14)])
def test_full_model_output_shapes_at_resnet50_widths(roi_heads, mask_size):
    anchors = {"c4": ((32, 64, 128, 256, 512),)}.get(roi_heads, MaskRCNN.anchor_sizes)
    model = MaskRCNN(num_classes=81, roi_heads=roi_heads, depth=50, anchor_sizes=anchors)
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


# -- losses and inference, hand-computed -------------------------------------------


def test_smooth_l1_values():
    x = jnp.array([-1.0, -0.1, 0.0, 0.05, 2.0])
    beta = 1.0 / 9.0
    want = [1.0 - beta / 2, 0.1**2 / 2 / beta, 0.0, 0.05**2 / 2 / beta, 2.0 - beta / 2]
    np.testing.assert_allclose(smooth_l1(x), want, rtol=1e-6)


def _bce(logit, target):
    return np.log1p(np.exp(-abs(logit))) + max(logit, 0) - logit * target


def test_rpn_losses_hand_computed():
    # Anchor 0 is the ground-truth box (positive), anchor 1 overlaps it with
    # IoU 0.5 (ignored: between 0.3 and 0.7), anchors 2 and 3 are far (negative).
    anchors = jnp.array(
        [[0, 0, 10, 10], [0, 0, 10, 20], [40, 40, 50, 50], [60, 0, 70, 10]], jnp.float32
    )
    gt_boxes = jnp.array([[0, 0, 10, 10], [0, 0, 0, 0]], jnp.float32)
    gt_valid = jnp.array([True, False])
    objectness = jnp.array([2.0, -1.0, 0.5, -3.0])
    deltas = jnp.array([[0.1, -0.05, 0.0, 0.3]] + [[0.7, 0.7, 0.7, 0.7]] * 3)
    obj_loss, box_loss, positives = rpn_losses(
        KEY,
        anchors,
        objectness,
        deltas,
        gt_boxes,
        gt_valid,
        fg_iou_threshold=0.7,
        bg_iou_threshold=0.3,
        batch_size_per_image=256,  # Every labelled anchor is sampled.
        positive_fraction=0.5,
    )
    want_objectness = (_bce(2.0, 1) + _bce(0.5, 0) + _bce(-3.0, 0)) / 3
    # The positive anchor equals its box, so its targets are zero.
    beta = 1 / 9
    want_box = (0.5 * 0.1**2 / beta + 0.5 * 0.05**2 / beta + 0.0 + (0.3 - beta / 2)) / 3
    np.testing.assert_allclose(obj_loss, want_objectness, rtol=1e-6)
    np.testing.assert_allclose(box_loss, want_box, rtol=1e-6)
    assert float(positives) == 1.0


def test_fast_rcnn_losses_hand_computed():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]]])
    deltas = jnp.zeros((1, 3, 3, 4)).at[0, 1, 1].set(jnp.array([0.05, 0.0, -1.0, 2.0]))
    deltas = deltas.at[0, 1, 2].set(9.0)  # Another class's deltas never count.
    classes = jnp.array([[0, 1, 2]])
    targets = jnp.zeros((1, 3, 4)).at[0, 1].set(jnp.array([0.0, 0.0, 0.0, 1.0]))
    positive = jnp.array([[False, True, False]])  # ROI 2 is positive but not valid.
    valid = jnp.array([[True, True, False]])
    classification, regression, accuracy = fast_rcnn_losses(
        logits, deltas, classes, targets, positive, valid
    )
    log_softmax = np.asarray(jax.nn.log_softmax(logits[0]))
    np.testing.assert_allclose(classification, [-(log_softmax[0, 0] + log_softmax[1, 1]) / 2])
    beta = 1 / 9
    want = (0.5 * 0.05**2 / beta + 0 + (1.0 - beta / 2) + (1.0 - beta / 2)) / 2
    np.testing.assert_allclose(regression, [want], rtol=1e-6)
    np.testing.assert_allclose(accuracy, [1.0])  # Both valid ROIs have the argmax class.


def test_mask_loss_and_inference_hand_computed():
    # One image, two ROIs, S = 4, K = 3. ROI 0 covers its instance exactly
    # (targets all 1), ROI 1 is a negative (ignored whatever its logits).
    s = 4
    masks = np.zeros((1, 1, 16, 16), np.uint8)
    masks[0, 0, 4:12, 4:12] = 1
    rois = jnp.array([[[4.0, 4.0, 12.0, 12.0], [0.0, 0.0, 4.0, 4.0]]])
    logits = np.zeros((1, 2, s, s, 3), np.float32)
    logits[0, 0, ..., 2] = 1.5  # The ground-truth class channel of ROI 0.
    logits[0, 0, ..., 1] = -7.0
    logits[0, 1] = 5.0
    loss, num_positive = mask_rcnn_loss(
        jnp.asarray(logits),
        jnp.array([[2, 0]]),
        jnp.array([[True, False]]),
        rois,
        jnp.array([[0, 0]]),
        jnp.asarray(masks),
        sampling_ratio=2,
    )
    np.testing.assert_allclose(loss, [_bce(1.5, 1)], rtol=1e-6)
    np.testing.assert_allclose(num_positive, [1.0])

    classes, valid = jnp.array([[2, 1]]), jnp.array([[True, False]])
    probs = mask_rcnn_inference(jnp.asarray(logits), classes, valid)
    np.testing.assert_allclose(probs[0, 0], np.full((s, s), 1 / (1 + np.exp(-1.5))), rtol=1e-6)
    np.testing.assert_array_equal(probs[0, 1], 0.0)  # Not a valid detection.


# -- the whole model -------------------------------------------------------------------


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
def test_training_mask_logits_are_the_inference_ones_of_the_same_boxes(config):
    # C4 reuses the box branch's res5 features for the mask head in training;
    # both designs must give the logits that inference computes from scratch.
    model = MaskRCNN(num_classes=3, **config)
    images, targets = _toy_batch()
    variables = _random_params(_init(model, images), seed=4)
    boxes = targets["boxes"]  # (2, 4, 4); the padding slots are zero boxes.

    def both(m, x):
        rpn_maps, pool_maps = m._features(x, train=False)
        _, _, train_masks = m.heads.training_predictions(pool_maps, boxes, 2, False)
        return train_masks, m.heads.mask_predictions(pool_maps, boxes[:, :2], False)

    train_masks, inference_masks = jax.jit(lambda v, x: model.apply(v, x, method=both))(
        variables, images
    )
    assert train_masks.shape == (2, 2, model.mask_size, model.mask_size, 3)
    np.testing.assert_allclose(train_masks, inference_masks, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [TINY, TINY_C4], ids=["fpn", "c4"])
def test_inference_masks_are_the_detected_class_of_all_class_logits(config):
    # Inference computes only each detection's class map, and skips groups of
    # 25 detection slots with no valid detection in any image: the result must
    # be the detected class's channel of the full K-class logits, zeros elsewhere.
    model = MaskRCNN(num_classes=3, **dict(config, detections_per_image=60))
    images, _ = _toy_batch()
    variables = _random_params(_init(model, images), seed=5)
    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 40, (2, 60, 2))
    boxes = jnp.asarray(np.concatenate([corner, corner + rng.uniform(4, 24, (2, 60, 2))], -1))
    classes = jnp.asarray(rng.integers(1, 3, (2, 60)), jnp.int32)
    valid = np.zeros((2, 60), bool)
    valid[0, :30] = True  # Slot groups 0-24 and 25-49 hold detections, 50-59 none.
    valid[1, :3] = True
    valid = jnp.asarray(valid)

    def both(m, x):
        _, pool_maps = m._features(x, train=False)
        grouped = m.heads._detection_mask_logits(pool_maps, boxes, classes, valid, None)
        return grouped, m.heads.mask_predictions(pool_maps, boxes, False)

    grouped, all_classes = jax.jit(lambda v, x: model.apply(v, x, method=both))(variables, images)
    assert grouped.shape == (2, 60, model.mask_size, model.mask_size)
    expected = np.take_along_axis(
        np.asarray(all_classes), np.asarray(classes)[..., None, None, None], -1
    )[..., 0]
    np.testing.assert_allclose(grouped[:, :50], expected[:, :50], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(grouped[:, 50:], 0.0)  # The skipped group.
    probs = mask_rcnn_inference(grouped, None, valid)
    reference = mask_rcnn_inference(all_classes, classes, valid)
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-6)


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
    assert set(stats) == {"roi_accuracy", "positive_rois", "positive_anchors"}
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
    with pytest.raises(ValueError, match="roi_heads must be one of"):
        MaskRCNN(num_classes=3, roi_heads="c5").init(KEY, images, method=MaskRCNN.initialize)
    assert RENAMED_FIELDS == {"mask_head": "roi_heads"}
    with pytest.raises(TypeError, match="mask_head"):
        MaskRCNN(num_classes=3, mask_head="c4")
    model = MaskRCNN(num_classes=3, **dict(TINY, anchor_sizes=((16,),)))
    with pytest.raises(ValueError, match="anchor_sizes has 1 levels"):
        jax.eval_shape(lambda: model.init(KEY, images))
    model = MaskRCNN(num_classes=3, **dict(TINY, anchor_sizes=((16,), (32, 64), (64,), (128,))))
    with pytest.raises(ValueError, match="same number of anchor sizes"):
        jax.eval_shape(lambda: model.init(KEY, images, method=MaskRCNN.initialize))
    model = MaskRCNN(num_classes=3, **dict(TINY, roi_batch_size_per_image=80))
    images, targets = _toy_batch()
    keys = jax.random.split(KEY, 2)
    with pytest.raises(ValueError, match="roi_batch_size_per_image=80"):
        jax.eval_shape(lambda: model.init(KEY, images, targets, keys, method=MaskRCNN.losses))
