"""Tests for jfcnn.ops.boxes against loop references and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jfcnn.ops.boxes import (
    DEFAULT_BBOX_XFORM_CLIP,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    min_size_mask,
)

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def random_boxes(rng, n, size=100.0, min_wh=1.0, max_wh=50.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def iou_loop(boxes_a, boxes_b):
    """Obviously-correct IoU, one pair at a time in float64."""
    out = np.zeros((len(boxes_a), len(boxes_b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(np.asarray(boxes_a, np.float64)):
        for j, (bx1, by1, bx2, by2) in enumerate(np.asarray(boxes_b, np.float64)):
            iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
            ih = max(0.0, min(ay2, by2) - max(ay1, by1))
            inter = iw * ih
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def test_box_area_values():
    boxes = jnp.array([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0], [-1.0, -2.0, 3.0, 0.5]])
    np.testing.assert_array_equal(box_area(boxes), [6.0, 0.0, 10.0])
    assert box_area(boxes.reshape(3, 1, 4)).shape == (3, 1)


@pytest.mark.parametrize(
    "box_a, box_b, expected",
    [
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),  # identical
        ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),  # touching along an edge
        ([0, 0, 2, 2], [2, 2, 3, 3], 0.0),  # touching at a corner
        ([0, 0, 4, 4], [1, 1, 3, 3], 4.0 / 16.0),  # contained
        ([0, 0, 2, 2], [1, 0, 3, 2], 2.0 / 6.0),  # half overlap
        ([0, 0, 2, 2], [1, 1, 3, 3], 1.0 / 7.0),  # corner overlap
        ([0, 0, 1, 1], [5, 5, 6, 6], 0.0),  # disjoint
        ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),  # two empty boxes: union 0
        ([1, 1, 1, 3], [0, 0, 2, 2], 0.0),  # zero-width box inside another
        ([3, 3, 1, 1], [0, 0, 4, 4], 0.0),  # inverted box
    ],
)
def test_box_iou_hand_computed(box_a, box_b, expected):
    iou = box_iou(jnp.array([box_a], jnp.float32), jnp.array([box_b], jnp.float32))
    assert iou.shape == (1, 1)
    np.testing.assert_allclose(iou[0, 0], expected, rtol=1e-6)
    swapped = box_iou(jnp.array([box_b], jnp.float32), jnp.array([box_a], jnp.float32))
    np.testing.assert_allclose(swapped[0, 0], expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_iou_matches_loop(seed, dtype):
    rng = np.random.default_rng(seed)
    boxes_a = np.round(random_boxes(rng, 13, size=20.0, min_wh=0.0, max_wh=10.0))
    boxes_b = np.round(random_boxes(rng, 7, size=20.0, min_wh=0.0, max_wh=10.0))
    boxes_b[0] = boxes_a[0]  # an exact match
    boxes_b[1] = [4.0, 4.0, 4.0, 4.0]  # an empty box
    # Integer coordinates < 32 are exact in bfloat16, so both dtypes are
    # compared at float32 accuracy (the op computes in float32).
    iou = jax.jit(box_iou)(jnp.asarray(boxes_a, dtype), jnp.asarray(boxes_b, dtype))
    assert iou.dtype == jnp.float32
    assert not np.any(np.isnan(iou))
    np.testing.assert_allclose(iou, iou_loop(boxes_a, boxes_b), rtol=1e-6, atol=1e-7)


def test_box_iou_float64_and_grad():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        boxes_a = jnp.asarray(random_boxes(rng, 5))
        boxes_b = jnp.asarray(random_boxes(rng, 4))
        iou = box_iou(boxes_a, boxes_b)
        assert iou.dtype == jnp.float64
        np.testing.assert_allclose(iou, iou_loop(boxes_a, boxes_b), rtol=1e-13, atol=1e-15)
        check_grads(jax.jit(box_iou), (boxes_a, boxes_b), order=1, modes=("rev",), eps=1e-4)


def test_box_iou_grad_finite_for_empty_union():
    boxes = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    grad = jax.jit(jax.grad(lambda b: box_iou(b, b).sum()))(boxes)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "fn, args, match",
    [
        (box_iou, (jnp.zeros((3, 5)), jnp.zeros((2, 4))), r"boxes_a .*\(3, 5\)"),
        (box_iou, (jnp.zeros((3, 4)), jnp.zeros((2, 2, 4))), r"boxes_b .*\(2, 2, 4\)"),
        (box_area, (jnp.zeros((3,)),), r"\(3,\)"),
        (clip_boxes, (jnp.zeros((3, 3)), (5, 5)), r"\(3, 3\)"),
        (clip_boxes, (jnp.zeros((3, 4)), (5, 5, 5)), r"image_size .*\(3,\)"),
        (min_size_mask, (jnp.zeros((2, 6)), 1.0), r"\(2, 6\)"),
        (encode_boxes, (jnp.zeros((3, 4)), jnp.zeros((2, 4))), r"\(3, 4\).*\(2, 4\)"),
        (encode_boxes, (jnp.zeros((3, 4)), jnp.zeros((3, 2))), r"proposals .*\(3, 2\)"),
        (decode_boxes, (jnp.zeros((3, 8)), jnp.zeros((3, 4))), r"deltas .*\(3, 8\)"),
        (decode_boxes, (jnp.zeros((3, 4)), jnp.zeros((2, 4))), r"\(3, 4\).*\(2, 4\)"),
        (decode_boxes, (jnp.zeros((3, 4)), jnp.zeros((3, 4)), (1.0, 1.0)), r"weights"),
    ],
)
def test_shape_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_clip_boxes_values():
    boxes = jnp.array([[-3.0, 2.0, 12.0, 30.0], [1.0, -1.0, 4.0, 5.0], [11.0, 21.0, 15.0, 25.0]])
    expected = [[0.0, 2.0, 10.0, 20.0], [1.0, 0.0, 4.0, 5.0], [10.0, 20.0, 10.0, 20.0]]
    np.testing.assert_array_equal(clip_boxes(boxes, (20, 10)), expected)
    # Traced per-image sizes under vmap, e.g. true sizes of padded images.
    batch = jnp.stack([boxes, boxes])
    sizes = jnp.array([[20, 10], [4, 3]])
    clipped = jax.jit(jax.vmap(clip_boxes))(batch, sizes)
    np.testing.assert_array_equal(clipped[0], expected)
    np.testing.assert_array_equal(
        clipped[1], [[0.0, 2.0, 3.0, 4.0], [1.0, 0.0, 3.0, 4.0], [3.0, 4.0, 3.0, 4.0]]
    )


def test_min_size_mask_values():
    boxes = jnp.array(
        [[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 1.0, 9.0]]
    )
    np.testing.assert_array_equal(min_size_mask(boxes, 2.0), [False, True, True, False])
    assert min_size_mask(boxes.reshape(2, 2, 4), 2.0).tolist() == [[False, True], [True, False]]


def test_encode_hand_computed():
    reference = jnp.array([[0.0, 0.0, 10.0, 10.0], [10.0, 20.0, 30.0, 30.0]])
    proposals = jnp.array([[0.0, 0.0, 5.0, 5.0], [12.0, 20.0, 22.0, 40.0]])
    deltas = encode_boxes(reference, proposals, WEIGHTS)
    # Row 0: proposal center 2.5, size 5; reference center 5, size 10.
    # Row 1: proposal center (17, 30) size (10, 20); reference center (20, 25) size (20, 10).
    expected = [
        [10 * 2.5 / 5, 10 * 2.5 / 5, 5 * math.log(2), 5 * math.log(2)],
        [10 * 3 / 10, 10 * -5 / 20, 5 * math.log(2), 5 * math.log(0.5)],
    ]
    np.testing.assert_allclose(deltas, expected, rtol=1e-6)
    np.testing.assert_allclose(
        encode_boxes(reference, proposals, (1, 2, 3, 4))[1],
        [3 / 10, 2 * -5 / 20, 3 * math.log(2), 4 * math.log(0.5)],
        rtol=1e-6,
    )


def test_decode_hand_computed_and_clamp():
    boxes = jnp.array([[0.0, 0.0, 4.0, 2.0], [10.0, 10.0, 20.0, 30.0]])
    deltas = jnp.array([[5.0, 0.0, 0.0, 0.0], [-10.0, 5.0, 5 * math.log(2), 5 * math.log(0.5)]])
    # Row 0: center moves by 0.5 * width = 2. Row 1: center (15, 20) moves by
    # (-1 * 10, 0.5 * 20) to (5, 30); size doubles / halves to (20, 10).
    expected = [[2.0, 0.0, 6.0, 2.0], [-5.0, 25.0, 15.0, 35.0]]
    np.testing.assert_allclose(decode_boxes(deltas, boxes, WEIGHTS), expected, rtol=1e-6)

    # dw / ww above the clip is clamped: exp(log(1000 / 16)) * 16 = 1000.
    anchor = jnp.array([[0.0, 0.0, 16.0, 16.0]])
    huge = jnp.array([[0.0, 0.0, 1e4, 5 * math.log(2)]])
    decoded = decode_boxes(huge, anchor, WEIGHTS)
    np.testing.assert_allclose(decoded, [[8 - 500, -8.0, 8 + 500, 24.0]], rtol=1e-5)
    assert DEFAULT_BBOX_XFORM_CLIP == pytest.approx(math.log(1000 / 16))
    # A custom clip; negative deltas are not clamped from below.
    decoded = decode_boxes(jnp.array([[0.0, 0.0, 3.0, -3.0]]), anchor, (1, 1, 1, 1), clip=1.0)
    half_w, half_h = 8 * math.e, 8 * math.exp(-3)
    np.testing.assert_allclose(decoded, [[8 - half_w, 8 - half_h, 8 + half_w, 8 + half_h]], 1e-5)


@pytest.mark.parametrize("weights", [WEIGHTS, (1.0, 1.0, 1.0, 1.0), (1.0, 2.0, 3.0, 4.0)])
def test_round_trip(weights):
    rng = np.random.default_rng(4)
    proposals = jnp.asarray(random_boxes(rng, 64, size=800, min_wh=4, max_wh=300), jnp.float32)
    targets = jnp.asarray(random_boxes(rng, 64, size=800, min_wh=4, max_wh=300), jnp.float32)
    deltas = jax.jit(encode_boxes, static_argnums=2)(targets, proposals, weights)
    decoded = jax.jit(decode_boxes, static_argnums=2)(deltas, proposals, weights)
    np.testing.assert_allclose(decoded, targets, rtol=1e-5, atol=1e-3)
    with jax.enable_x64(True):
        p64, t64 = jnp.asarray(proposals, jnp.float64), jnp.asarray(targets, jnp.float64)
        decoded64 = decode_boxes(encode_boxes(t64, p64, weights), p64, weights)
        assert decoded64.dtype == jnp.float64
        np.testing.assert_allclose(decoded64, t64, rtol=1e-12, atol=1e-10)


def test_coder_broadcasts_leading_dims():
    rng = np.random.default_rng(5)
    proposals = jnp.asarray(random_boxes(rng, 6), jnp.float32)
    targets = jnp.asarray(random_boxes(rng, 2 * 6 * 3).reshape(2, 6, 3, 4), jnp.float32)
    # Class-specific layout: (B, N, K, 4) deltas against (N, 1, 4) boxes.
    deltas = encode_boxes(targets, proposals[:, None])
    assert deltas.shape == (2, 6, 3, 4)
    for b in range(2):
        for k in range(3):
            np.testing.assert_allclose(
                deltas[b, :, k], encode_boxes(targets[b, :, k], proposals), rtol=1e-6
            )
    decoded = decode_boxes(deltas, proposals[:, None])
    for b in range(2):
        for k in range(3):
            np.testing.assert_allclose(
                decoded[b, :, k], decode_boxes(deltas[b, :, k], proposals), rtol=1e-6, atol=1e-4
            )


def test_coder_grads_float64():
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        proposals = jnp.asarray(random_boxes(rng, 5, min_wh=5))
        targets = jnp.asarray(random_boxes(rng, 5, min_wh=5))
        deltas = jnp.asarray(rng.normal(size=(5, 4)))
        check_grads(jax.jit(encode_boxes), (targets, proposals), order=1, modes=("rev",), eps=1e-5)
        check_grads(jax.jit(decode_boxes), (deltas, proposals), order=1, modes=("rev",), eps=1e-5)


def test_matches_torchvision():
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    det_utils = pytest.importorskip("torchvision.models.detection._utils")
    rng = np.random.default_rng(7)
    boxes_a = random_boxes(rng, 50, size=600, min_wh=0, max_wh=200).astype(np.float32)
    boxes_b = random_boxes(rng, 30, size=600, min_wh=1, max_wh=200).astype(np.float32)
    boxes_a[:5] = boxes_b[:5]
    expected = tv_ops.box_iou(torch.from_numpy(boxes_a), torch.from_numpy(boxes_b)).numpy()
    np.testing.assert_allclose(box_iou(boxes_a, boxes_b), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(
        box_area(boxes_a), tv_ops.box_area(torch.from_numpy(boxes_a)).numpy()
    )
    np.testing.assert_array_equal(
        clip_boxes(boxes_a, (300, 400)),
        tv_ops.clip_boxes_to_image(torch.from_numpy(boxes_a), (300, 400)).numpy(),
    )
    np.testing.assert_array_equal(
        np.nonzero(np.asarray(min_size_mask(boxes_a, 20.0)))[0],
        tv_ops.remove_small_boxes(torch.from_numpy(boxes_a), 20.0).numpy(),
    )

    coder = det_utils.BoxCoder(WEIGHTS)
    proposals, targets = boxes_b[:20], boxes_b[10:]
    tv_deltas = coder.encode_single(torch.from_numpy(targets), torch.from_numpy(proposals))
    np.testing.assert_allclose(
        encode_boxes(targets, proposals, WEIGHTS), tv_deltas.numpy(), rtol=1e-5, atol=1e-6
    )
    # Large deltas exercise the clamp.
    deltas = (rng.normal(size=(20, 4)) * [1, 1, 8, 8]).astype(np.float32)
    tv_boxes = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(proposals))
    np.testing.assert_allclose(
        decode_boxes(deltas, proposals, WEIGHTS), tv_boxes.numpy(), rtol=1e-5, atol=1e-3
    )
