"""Tests for jfcnn.ops.nms against a plain greedy loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ops_reference import nms_loop

from jfcnn.ops.nms import batched_nms as batched_nms_op
from jfcnn.ops.nms import nms as nms_op

# Jitted once per static configuration; eager calls would compile op by op.
nms = jax.jit(nms_op, static_argnames=("max_output", "tile_size"))
batched_nms = jax.jit(batched_nms_op, static_argnames=("max_output", "tile_size"))


def padded(keep, max_output):
    keep = list(keep[:max_output])
    pad = max_output - len(keep)
    return np.array(keep + [-1] * pad), np.array([True] * len(keep) + [False] * pad)


def make_case(rng, kind, n):
    """Boxes, scores and a validity mask of one of several flavours."""
    if kind == "grid":
        # Small integer boxes: many duplicates, IoUs exactly at 0.5, tied scores.
        xy = rng.integers(0, 6, (n, 2))
        wh = rng.integers(1, 4, (n, 2))
        scores = rng.integers(0, 5, n) / 4.0
    elif kind == "uniform":
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(5, 80, (n, 2))
        scores = rng.uniform(size=n)
    elif kind == "clustered":
        # Jittered copies of a few objects, like RPN proposals.
        centers = rng.uniform(50, 150, (4, 2))
        xy = centers[rng.integers(0, 4, n)] + rng.normal(0, 6, (n, 2))
        wh = rng.uniform(30, 50, (n, 2))
        scores = rng.uniform(size=n)
    else:
        raise ValueError(kind)
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = scores.astype(np.float32)
    valid = rng.uniform(size=n) > 0.2
    scores[rng.uniform(size=n) < 0.1] = -np.inf
    return boxes, scores, valid


@functools.cache
def jitted_nms(max_output, tile_size):
    return jax.jit(lambda b, s, t, v: nms(b, s, t, max_output, valid=v, tile_size=tile_size))


@functools.cache
def jitted_batched_nms(max_output, tile_size):
    return jax.jit(
        lambda b, s, c, t, v: batched_nms(b, s, c, t, max_output, v, tile_size=tile_size)
    )


def test_hand_computed():
    boxes = jnp.array(
        [
            [0.0, 0.0, 10.0, 10.0],  # 0: score 0.9, kept
            [0.0, 0.0, 10.0, 5.0],  # 1: IoU 0.5 with box 0 (not > 0.5), kept
            [1.0, 1.0, 10.0, 10.0],  # 2: IoU 0.81 with box 0, dropped
            [20.0, 20.0, 30.0, 30.0],  # 3: disjoint, kept
            [20.0, 20.0, 30.0, 30.0],  # 4: duplicate of 3 with the same score, dropped
        ]
    )
    scores = jnp.array([0.9, 0.5, 0.8, 0.7, 0.7])
    indices, valid = nms(boxes, scores, 0.5, max_output=6)
    np.testing.assert_array_equal(indices, [0, 3, 1, -1, -1, -1])
    np.testing.assert_array_equal(valid, [True, True, True, False, False, False])
    # A lower threshold drops box 1 too; max_output truncates in score order.
    indices, valid = nms(boxes, scores, 0.49, max_output=1)
    np.testing.assert_array_equal(indices, [0])
    np.testing.assert_array_equal(valid, [True])
    # Reversed input: of the tied duplicates (now 0 and 1) the lower index wins.
    indices, _ = nms(boxes[::-1], scores[::-1], 0.5, 3)
    np.testing.assert_array_equal(indices, [4, 0, 3])


@pytest.mark.parametrize(
    "n, max_output, tile_size",
    [(1, 3, 256), (7, 10, 256), (60, 60, 8), (60, 5, 16), (300, 100, 64), (300, 400, 256)],
)
@pytest.mark.parametrize("kind", ["grid", "uniform", "clustered"])
def test_matches_loop(kind, n, max_output, tile_size):
    fn = jitted_nms(max_output, tile_size)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        boxes, scores, valid = make_case(rng, kind, n)
        for iou_threshold in (0.3, 0.5, 0.7):
            indices, ok = fn(boxes, scores, iou_threshold, valid)
            expected = padded(nms_loop(boxes, scores, iou_threshold, valid), max_output)
            np.testing.assert_array_equal(indices, expected[0], err_msg=f"seed {seed}")
            np.testing.assert_array_equal(ok, expected[1], err_msg=f"seed {seed}")


def test_long_suppression_chain_within_one_tile():
    # Each box overlaps only its neighbours, scores descend along the chain:
    # greedy keeps every other box, which takes the in-tile fixed point the
    # most sweeps to find.
    n = 200
    x = np.arange(n, dtype=np.float32) * 4.0
    boxes = np.stack([x, np.zeros(n), x + 10.0, np.full(n, 10.0)], axis=1).astype(np.float32)
    scores = np.linspace(1.0, 0.0, n, dtype=np.float32)
    indices, ok = nms(boxes, scores, 0.4, max_output=n, tile_size=256)
    # Neighbours have IoU 6/14 > 0.4, boxes two apart 2/18 < 0.4.
    expected = padded(list(range(0, n, 2)), n)
    np.testing.assert_array_equal(indices, expected[0])
    np.testing.assert_array_equal(ok, expected[1])


def test_invalid_entries_never_selected():
    boxes = jnp.array([[0.0, 0.0, 10.0, 10.0]] * 4 + [[50.0, 50.0, 60.0, 60.0]])
    scores = jnp.array([1.0, -jnp.inf, jnp.nan, 0.5, 0.1])
    valid = jnp.array([False, True, True, True, True])
    indices, ok = nms(boxes, scores, 0.5, 5, valid=valid)
    # Box 0 is invalid, so it does not suppress box 3 either.
    np.testing.assert_array_equal(indices, [3, 4, -1, -1, -1])
    np.testing.assert_array_equal(ok, [True, True, False, False, False])
    indices, ok = nms(boxes, jnp.full(5, -jnp.inf), 0.5, 3)
    np.testing.assert_array_equal(indices, [-1, -1, -1])
    assert not ok.any()
    indices, ok = nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 2)
    np.testing.assert_array_equal(indices, [-1, -1])
    assert not ok.any()


def test_vmap_over_batch():
    rng = np.random.default_rng(10)
    cases = [make_case(rng, kind, 40) for kind in ("grid", "uniform", "clustered", "uniform")]
    boxes, scores, valid = (np.stack(x) for x in zip(*cases, strict=True))
    fn = jax.jit(jax.vmap(lambda b, s, v: nms(b, s, 0.5, 16, valid=v, tile_size=16)))
    indices, ok = fn(boxes, scores, valid)
    for i in range(len(cases)):
        expected = padded(nms_loop(boxes[i], scores[i], 0.5, valid[i]), 16)
        np.testing.assert_array_equal(indices[i], expected[0])
        np.testing.assert_array_equal(ok[i], expected[1])


@pytest.mark.parametrize("n, max_output, tile_size", [(60, 20, 16), (300, 300, 64)])
@pytest.mark.parametrize("kind", ["grid", "clustered"])
def test_batched_matches_per_class_loop(kind, n, max_output, tile_size):
    fn = jitted_batched_nms(max_output, tile_size)
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        boxes, scores, valid = make_case(rng, kind, n)
        class_ids = rng.integers(0, 3, n).astype(np.int32)
        for iou_threshold in (0.3, 0.6):
            indices, ok = fn(boxes, scores, class_ids, iou_threshold, valid)
            # Reference: NMS per class separately, survivors merged by score.
            keep = []
            for c in range(3):
                keep += nms_loop(boxes, scores, iou_threshold, valid & (class_ids == c))
            keep.sort(key=lambda i: (-scores[i], i))
            expected = padded(keep, max_output)
            np.testing.assert_array_equal(indices, expected[0], err_msg=f"seed {seed}")
            np.testing.assert_array_equal(ok, expected[1], err_msg=f"seed {seed}")


def test_batched_separates_classes_with_negative_coordinates():
    # The max_coordinate + 1 shift of torchvision's trick assumes x, y >= 0;
    # masking by class does not.
    boxes = jnp.array([[-50.0, -50.0, -40.0, -40.0]] * 3)
    indices, ok = batched_nms(boxes, jnp.array([0.9, 0.8, 0.7]), jnp.array([0, 1, 0]), 0.5, 3)
    np.testing.assert_array_equal(indices, [0, 1, -1])
    np.testing.assert_array_equal(ok, [True, True, False])


def test_batched_vmap():
    rng = np.random.default_rng(11)
    cases = [make_case(rng, "clustered", 30) for _ in range(3)]
    boxes, scores, valid = (np.stack(x) for x in zip(*cases, strict=True))
    class_ids = rng.integers(0, 2, (3, 30))
    fn = jax.vmap(lambda b, s, c, v: batched_nms(b, s, c, 0.5, 12, v, tile_size=8))
    indices, ok = fn(boxes, scores, class_ids, valid)
    for i in range(3):
        keep = nms_loop(boxes[i], scores[i], 0.5, valid[i], class_ids[i])
        expected = padded(keep, 12)
        np.testing.assert_array_equal(indices[i], expected[0])
        np.testing.assert_array_equal(ok[i], expected[1])


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((jnp.zeros((5, 3)), jnp.zeros(5), 0.5, 4), {}, r"boxes .*\(5, 3\)"),
        ((jnp.zeros((5, 4)), jnp.zeros((5, 1)), 0.5, 4), {}, r"scores .*\(5, 1\)"),
        ((jnp.zeros((5, 4)), jnp.zeros(5), 0.5, 4), {"valid": jnp.ones(4, bool)}, r"\(4,\)"),
        ((jnp.zeros((5, 4)), jnp.zeros(5), 0.5, 0), {}, r"max_output"),
        ((jnp.zeros((5, 4)), jnp.zeros(5), 0.5, 4), {"tile_size": 0}, r"tile_size"),
    ],
)
def test_shape_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nms(*args, **kwargs)


def test_batched_shape_error():
    with pytest.raises(ValueError, match=r"class_ids .*\(4,\)"):
        batched_nms(jnp.zeros((5, 4)), jnp.zeros(5), jnp.zeros(4, jnp.int32), 0.5, 3)


@pytest.mark.parametrize("kind", ["grid", "uniform", "clustered"])
def test_matches_torchvision(kind):
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    fn = jitted_nms(1000, 256)
    batched_fn = jitted_batched_nms(1000, 256)
    for seed in range(3):
        rng = np.random.default_rng(200 + seed)
        boxes, scores, valid = make_case(rng, kind, 700)
        valid &= np.isfinite(scores)
        class_ids = rng.integers(0, 4, 700)
        tb, ts = torch.from_numpy(boxes[valid]), torch.from_numpy(scores[valid])
        index_map = np.nonzero(valid)[0]
        for iou_threshold in (0.5, 0.7):
            expected = index_map[tv_ops.nms(tb, ts, iou_threshold).numpy()]
            indices, ok = fn(boxes, scores, iou_threshold, valid)
            np.testing.assert_array_equal(np.asarray(indices)[np.asarray(ok)], expected)
            tc = torch.from_numpy(class_ids[valid])
            expected = index_map[tv_ops.batched_nms(tb, ts, tc, iou_threshold).numpy()]
            indices, ok = batched_fn(boxes, scores, class_ids, iou_threshold, valid)
            np.testing.assert_array_equal(np.asarray(indices)[np.asarray(ok)], expected)
