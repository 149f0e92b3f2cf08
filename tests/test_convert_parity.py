"""Parity of a converted ``maskrcnn_resnet50_fpn`` with torchvision's own model.

torchvision's model is built without any download (random weights), its
batch-norm statistics calibrated on a few images so every layer has outputs
of order one, and its heads scaled so that scores are confident and
distinct (random heads would score every class about 1/91, under the 0.05
threshold, and detect nothing). Its ``state_dict`` is converted in both key
namings (current torchvision's and the published v1 file's) and the two
models run on the same non-square photo-like image, torchvision at a small
size (short side 320) to keep the test short.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn import weights
from jfcnn.models.maskrcnn import MaskRCNN

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

MIN_SIZE, MAX_SIZE = 320, 512
# jfcnn's settings of torchvision's inference (besides the architecture defaults).
TORCHVISION_FIELDS = dict(
    num_classes=91,
    frozen_batch_norm=True,
    roi_align_aligned=False,
    rpn_pre_nms_top_n_test=1000,
    rpn_post_nms_top_n_test=1000,
)


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB image in [0, 1] with a few bright blobs: structure at several scales."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = 0.4 + 0.1 * np.sin(6 * x[..., None] + rng.uniform(0, 6, 3)) * np.cos(4 * y[..., None])
    for _ in range(6):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        blob = np.exp(-((y - cy * height / max(height, width)) ** 2 + (x - cx) ** 2) / r**2)
        image = image + blob[..., None] * rng.uniform(-0.4, 0.5, 3)
    return np.clip(image, 0, 1).astype(np.float32)


def build_torchvision_model(seed: int = 0):
    """``maskrcnn_resnet50_fpn`` with calibrated batch norm and confident, distinct heads."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE
    )
    backbone = model.backbone.body
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        backbone.train()
        for i in range(2):
            images = [torch.from_numpy(photo(200, 240, 100 + i)).permute(2, 0, 1)]
            backbone(model.transform(images)[0].tensors)
        model.eval()
        heads = model.roi_heads
        # The random box head's features are large, so its default classifier is
        # already confident (top scores 0.4-0.8, all distinct); random biases
        # make the classes differ.
        heads.box_predictor.cls_score.bias.uniform_(-2.0, 2.0)
        heads.box_predictor.bbox_pred.weight.mul_(3.0)
        heads.mask_predictor.mask_fcn_logits.weight.mul_(30.0)
        # Objectness logits of a few units: distinct, not saturated sigmoids (ties).
        model.rpn.head.cls_logits.weight.mul_(2.0)
    return model


def v1_state_dict(state_dict: dict) -> dict:
    """The published v1 file's key names (before torchvision 0.13)."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                key = key.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        for i in range(4):
            key = key.replace(
                f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}."
            )
        renamed[key] = value
    return renamed


@pytest.fixture(scope="module")
def torch_model():
    return build_torchvision_model()


@pytest.fixture(scope="module")
def converted(torch_model):
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    model = MaskRCNN(**TORCHVISION_FIELDS)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), method=MaskRCNN.initialize)
    )
    return model, weights.maskrcnn_variables(state, expected), state, expected


def test_v1_and_current_key_names_give_the_same_variables(converted):
    model, variables, state, expected = converted
    v1 = v1_state_dict(state)
    assert "roi_heads.mask_head.mask_fcn1.weight" in v1 and "rpn.head.conv.weight" in v1
    assert "backbone.fpn.inner_blocks.0.weight" in v1
    jax.tree.map(np.testing.assert_array_equal, weights.maskrcnn_variables(v1, expected), variables)


def test_mismatched_detector_names_the_key(converted):
    _, _, state, expected = converted
    bad = dict(state)
    bad["roi_heads.box_predictor.cls_score.weight"] = bad[
        "roi_heads.box_predictor.cls_score.weight"
    ][:81]
    with pytest.raises(
        weights.WeightsError,
        match=r"'roi_heads.box_predictor.cls_score.weight' has shape \(81, 1024\), "
        r"expected \(91, 1024\)",
    ):
        weights.maskrcnn_variables(bad, expected)


def _torch_run(torch_model, image_hwc):
    tensor = torch.from_numpy(image_hwc).permute(2, 0, 1)
    with torch.no_grad():
        resized = torch_model.transform.resize(tensor, None)[0]
        images, _ = torch_model.transform([tensor])
        features = torch_model.backbone(images.tensors)
        proposals, _ = torch_model.rpn(images, features)
        detections, _ = torch_model.roi_heads(features, proposals, images.image_sizes)
    return resized, images, features, proposals[0], detections[0]


def _nhwc(x):
    return np.transpose(x.numpy(), (0, 2, 3, 1))


def test_features_proposals_and_detections_equal_torchvision(torch_model, converted):
    model, variables, _, _ = converted
    # 200 x 240 -> 320 x 384: the resized image fills torchvision's padded batch exactly.
    resized, images, features, proposals, detections = _torch_run(torch_model, photo(200, 240, 7))
    assert tuple(images.tensors.shape[2:]) == tuple(resized.shape[1:]) == (320, 384)
    x = jnp.asarray(np.transpose(resized.numpy(), (1, 2, 0))[None])

    rpn_maps, _ = model.apply(variables, x, method=lambda m, x: m._features(x, False))
    for level, (name, want) in enumerate(features.items()):
        want = _nhwc(want)
        scale = np.abs(want).max()
        np.testing.assert_allclose(
            rpn_maps[level], want, rtol=1e-4, atol=1e-4 * scale, err_msg=name
        )

    boxes, valid = model.apply(
        variables, x, method=lambda m, x: m.rpn(m._features(x, False)[0], x.shape[1:3])
    )
    boxes, valid = np.asarray(boxes[0]), np.asarray(valid[0])
    want = proposals.numpy()
    assert valid.sum() == len(want) > 100
    # Scores equal to float precision may trade places: compare the sets, box
    # coordinates within 1e-4 of the image size.
    tolerance = 1e-4 * max(x.shape[1:3])
    close = np.abs(want[:, None, :] - boxes[None, : len(want), :]).max(-1) <= tolerance
    assert close.any(1).mean() == 1.0, close.any(1).mean()
    assert close.any(0).mean() == 1.0, close.any(0).mean()

    out = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    n = int(out["detection_valid"][0].sum())
    assert n == len(detections["scores"]) > 10, (n, len(detections["scores"]))
    np.testing.assert_allclose(
        out["scores"][0, :n], detections["scores"].numpy(), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(out["classes"][0, :n], detections["labels"].numpy())
    np.testing.assert_allclose(out["boxes"][0, :n], detections["boxes"].numpy(), atol=tolerance)
    # Mask probabilities pool on the detected boxes, whose float differences
    # (well under a pixel) the steep random mask head amplifies here and there.
    got_masks, want_masks = np.asarray(out["mask_probs"][0, :n]), detections["masks"][:, 0].numpy()
    assert np.abs(got_masks - want_masks).mean() < 2e-3
    assert ((got_masks >= 0.5) == (want_masks >= 0.5)).mean() > 0.995
