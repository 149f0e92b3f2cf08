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

from torchvision_maskrcnn import (  # noqa: E402  (after the importorskip)
    MAX_SIZE,
    MIN_SIZE,
    TORCHVISION_FIELDS,
    build_torchvision_model,
    photo,
    v1_state_dict,
)


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
    # Detections in score order; two whose scores tie to float precision may trade
    # places (as the proposals above), so each of torchvision's is paired with the
    # nearest of jfcnn's in that order, of the same class, score and box.
    got_scores, got_classes = np.asarray(out["scores"][0, :n]), np.asarray(out["classes"][0, :n])
    got_boxes = np.asarray(out["boxes"][0, :n])
    want_scores = detections["scores"].numpy()
    want_classes, want_boxes = detections["labels"].numpy(), detections["boxes"].numpy()
    same = (
        (np.abs(want_scores[:, None] - got_scores[None, :]) <= 1e-4 + 1e-4 * want_scores[:, None])
        & (want_classes[:, None] == got_classes[None, :])
        & (np.abs(want_boxes[:, None, :] - got_boxes[None, :, :]).max(-1) <= tolerance)
    )
    pairs = _one_to_one(same)
    assert sorted(pairs) == list(range(n)), f"no jfcnn detection for {np.flatnonzero(pairs < 0)}"
    assert (pairs != np.arange(n)).sum() <= 4, pairs  # Only neighbours trade places.
    # Mask probabilities pool on the detected boxes, whose float differences
    # (well under a pixel) the steep random mask head amplifies here and there.
    got_masks = np.asarray(out["mask_probs"][0, :n])[pairs]
    want_masks = detections["masks"][:, 0].numpy()
    assert np.abs(got_masks - want_masks).mean() < 2e-3
    assert ((got_masks >= 0.5) == (want_masks >= 0.5)).mean() > 0.995


def _one_to_one(same: np.ndarray) -> np.ndarray:
    """For each row of a boolean ``(N, N)`` match table, a distinct matching column
    (-1 where none is left): the diagonal where it matches, else the nearest free one."""
    pairs = np.full(len(same), -1)
    free = np.ones(same.shape[1], bool)
    order = sorted(range(len(same)), key=lambda i: not same[i, i])  # The diagonal first.
    for i in order:
        columns = np.flatnonzero(same[i] & free)
        if len(columns):
            pairs[i] = columns[np.argmin(np.abs(columns - i))]
            free[pairs[i]] = False
    return pairs


def _box_iou(a, b):
    """``(N, M)`` IoU of two sets of ``(x1, y1, x2, y2)`` boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _matched_fraction(boxes_a, scores_a, labels_a, boxes_b, scores_b, labels_b):
    """Share of detections of A with a detection of B of the same class, IoU >= 0.99,
    score within 1e-3; and for each of them the index of that detection of B."""
    iou = _box_iou(boxes_a, boxes_b)
    ok = (
        (iou >= 0.99)
        & (labels_a[:, None] == labels_b[None, :])
        & (np.abs(scores_a[:, None] - scores_b[None, :]) <= 1e-3)
    )
    return ok.any(1).mean(), np.where(ok.any(1), np.argmax(np.where(ok, iou, -1), 1), -1)


def _canvas(resized_chw, canvas_hw):
    """The resized image top-left on a canvas of torchvision's padding: the mean color."""
    from jfcnn.models.maskrcnn import IMAGE_MEAN

    image = np.transpose(resized_chw.numpy(), (1, 2, 0))
    canvas = np.broadcast_to(np.asarray(IMAGE_MEAN, np.float32), (*canvas_hw, 3)).copy()
    canvas[: image.shape[0], : image.shape[1]] = image
    return jnp.asarray(canvas[None])


def test_any_image_size_gives_torchvision_detections_and_masks(torch_model, converted):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    model, variables, _, _ = converted
    # 200 x 250 -> 320 x 400 (not a multiple of 32), padded by torchvision to 320 x 416,
    # whose pooled P6 grid (5 x 7) steps anchors by 416 // 7 = 59 pixels, not 64.
    resized, images, _, _, detections = _torch_run(torch_model, photo(200, 250, 11))
    assert tuple(resized.shape[1:]) == (320, 400)
    assert tuple(images.tensors.shape[2:]) == (320, 416)
    want_boxes = detections["boxes"].numpy()
    want_scores = detections["scores"].numpy()
    want_labels = detections["labels"].numpy()
    want_masks = paste_masks_in_image(detections["masks"], detections["boxes"], (320, 400))
    want_masks = want_masks[:, 0].numpy() >= 0.5
    assert len(want_scores) > 10
    out = jax.jit(lambda v, x, s: model.apply(v, x, image_sizes=s))(
        variables, _canvas(resized, (320, 416)), jnp.asarray([[320, 400]])
    )
    n = int(out["detection_valid"][0].sum())
    boxes, scores = np.asarray(out["boxes"][0, :n]), np.asarray(out["scores"][0, :n])
    labels = np.asarray(out["classes"][0, :n])
    # Clipped to the resized image, not to the padded canvas.
    assert boxes[:, 2].max() <= 400 and boxes[:, 3].max() <= 320
    forward, match = _matched_fraction(want_boxes, want_scores, want_labels, boxes, scores, labels)
    backward, _ = _matched_fraction(boxes, scores, labels, want_boxes, want_scores, want_labels)
    assert forward >= 0.97 and backward >= 0.97, (forward, backward)
    masks = np.asarray(out["masks"][0, :n, :320, :400]).astype(bool)
    ious = [
        (want_masks[i] & masks[j]).sum() / max((want_masks[i] | masks[j]).sum(), 1)
        for i, j in enumerate(match)
        if j >= 0
    ]
    assert np.mean(ious) >= 0.95, np.mean(ious)


def test_an_image_ending_at_torchvisions_padded_edge_on_a_larger_canvas(torch_model, converted):
    """ROI Align samples each map as if it ended at torchvision's padded size: torchvision
    clamps samples past its last row and column to them, where jfcnn's canvas goes on."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    model, variables, _, _ = converted
    transform = torch_model.transform
    try:
        # 150 x 150 -> 160 x 160, torchvision's whole padded batch; jfcnn's canvas is
        # 256 x 256 (max_size), as `convert --min_size=160 --max_size=256` makes it.
        transform.min_size, transform.max_size = (160,), 256
        resized, images, _, _, detections = _torch_run(torch_model, photo(150, 150, 3))
    finally:
        transform.min_size, transform.max_size = (MIN_SIZE,), MAX_SIZE
    assert tuple(images.tensors.shape[2:]) == tuple(resized.shape[1:]) == (160, 160)
    want_boxes = detections["boxes"].numpy()
    want_scores = detections["scores"].numpy()
    want_labels = detections["labels"].numpy()
    # Many detections reach the bottom or right edge, where the two canvases differ.
    assert len(want_scores) > 10 and (want_boxes[:, 2:] >= 159.5).any(1).mean() > 0.2
    out = jax.jit(lambda v, x, s: model.apply(v, x, image_sizes=s))(
        variables, _canvas(resized, (256, 256)), jnp.asarray([[160, 160]])
    )
    n = int(out["detection_valid"][0].sum())
    boxes, scores = np.asarray(out["boxes"][0, :n]), np.asarray(out["scores"][0, :n])
    labels = np.asarray(out["classes"][0, :n])
    forward, match = _matched_fraction(want_boxes, want_scores, want_labels, boxes, scores, labels)
    backward, _ = _matched_fraction(boxes, scores, labels, want_boxes, want_scores, want_labels)
    assert forward >= 0.97 and backward >= 0.97, (forward, backward)
    want_masks = paste_masks_in_image(detections["masks"], detections["boxes"], (160, 160))
    masks = np.asarray(out["masks"][0, :n, :160, :160]).astype(bool)
    ious = _mask_ious(want_masks[:, 0].numpy() >= 0.5, masks, match)
    assert np.mean(ious) >= 0.95, np.mean(ious)


def test_a_larger_canvas_has_torchvision_anchors_only(torch_model, converted):
    model, variables, _, _ = converted
    resized, images, features, _, _ = _torch_run(torch_model, photo(200, 250, 11))
    with torch.no_grad():
        want = torch_model.rpn.anchor_generator(images, list(features.values()))[0].numpy()

    def anchors(m, x, sizes):
        rpn_maps, _ = m._features(x, False)
        return m.rpn._image_anchors(rpn_maps, x.shape[1:3], sizes)

    # A canvas of 384 x 512 has more grid cells than torchvision's 320 x 416 batch:
    # those must never become proposals, and the others must be torchvision's anchors.
    got, inside = model.apply(
        variables, _canvas(resized, (384, 512)), jnp.asarray([[320, 416]]), method=anchors
    )
    got, inside = np.asarray(got[0]), np.asarray(inside[0])
    assert inside.sum() == len(want) < len(inside)
    np.testing.assert_array_equal(got[inside], want)


def _mask_ious(want_masks, got_masks, match):
    return [
        (want_masks[i] & got_masks[j]).sum() / max((want_masks[i] | got_masks[j]).sum(), 1)
        for i, j in enumerate(match)
        if j >= 0
    ]


def test_predict_on_a_converted_workdir_gives_torchvision_results(torch_model, tmp_path):
    """`jfcnn.predict` end to end (torchvision's resize on a larger square canvas,
    mapping back, mask pasting) against torchvision's whole model on a non-square
    image; both resize to a short side of 160, a long side of at most 256, to stay cheap."""
    from jfcnn import convert, predict
    from jfcnn.data import pipeline

    path = str(tmp_path / "maskrcnn.npz")
    np.savez(path, **{k: v.numpy() for k, v in torch_model.state_dict().items()})
    workdir = str(tmp_path / "converted")
    convert.convert_maskrcnn(path, workdir, min_size=160, max_size=256)
    # 75 x 161: the longer side binds (scale 256 / 161), and 161 * (256 / 161) is just
    # under 256 in double precision, so torchvision's floor makes it 255, not 256.
    image = np.round(photo(75, 161, 1) * 255).astype(np.uint8)
    tensor = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)
    transform = torch_model.transform
    try:
        transform.min_size, transform.max_size = (160,), 256
        with torch.no_grad():
            assert tuple(transform.resize(tensor, None)[0].shape[1:]) == (119, 255)
            want = torch_model([tensor])[0]
    finally:
        transform.min_size, transform.max_size = (MIN_SIZE,), MAX_SIZE
    canvas, resized = pipeline.fit_image(image, 256, True, torchvision=(160, 256))
    assert canvas.shape == (256, 256, 3) and list(resized.numpy()) == [119, 255]

    with predict.Predictor(workdir, batch_size=1) as predictor:
        # A canvas of 256 x 256, taller than torchvision's padded 128 x 256 batch.
        assert predictor.image_size == 256
        got = predictor.predict(image)
    want_boxes, want_scores = want["boxes"].numpy(), want["scores"].numpy()
    want_labels = want["labels"].numpy()
    want_masks = want["masks"][:, 0].numpy() >= 0.5
    assert len(want_scores) > 10, len(want_scores)
    args_want = (want_boxes, want_scores, want_labels)
    args_got = (got["boxes"], got["scores"], got["classes"])
    forward, match = _matched_fraction(*args_want, *args_got)
    backward, _ = _matched_fraction(*args_got, *args_want)
    assert forward >= 0.97 and backward >= 0.97, (forward, backward)
    # A converted model's class slots are COCO's category ids.
    np.testing.assert_array_equal(got["category_ids"], got["classes"])
    ious = _mask_ious(want_masks, got["masks"].astype(bool), match)
    assert np.mean(ious) >= 0.95, np.mean(ious)
