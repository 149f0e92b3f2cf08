"""Tests for jfcnn.ops.detection against slow loop references and hand-computed values."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ops_reference import nms_loop

from jfcnn.ops import detection

# ---------------------------------------------------------------------------
# Loop references (float64 NumPy, one element at a time).


def match_loop(iou, high, low, allow_low, gt_valid, candidate_valid):
    """torchvision's Matcher, candidate by candidate."""
    n, m = iou.shape
    matched = np.zeros(n, int)
    labels = np.zeros(n, int)
    for i in range(n):
        best, arg = -1.0, 0
        for j in range(m):
            if gt_valid[j] and candidate_valid[i] and iou[i, j] > best:
                best, arg = iou[i, j], j
        matched[i] = arg
        labels[i] = 1 if best >= high else (0 if best < low else -1)
    if allow_low:
        for j in range(m):
            if not gt_valid[j]:
                continue
            column = [iou[i, j] for i in range(n) if candidate_valid[i]]
            highest = max(column, default=0.0)
            for i in range(n):
                if candidate_valid[i] and highest > 0 and iou[i, j] == highest:
                    labels[i] = 1
    labels[~candidate_valid] = -1
    return matched, labels


def decode_loop(delta, box, weights):
    wx, wy, ww, wh = weights
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
    dw = min(delta[2] / ww, np.log(1000.0 / 16))
    dh = min(delta[3] / wh, np.log(1000.0 / 16))
    pcx, pcy = delta[0] / wx * w + cx, delta[1] / wy * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    return np.array([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2])


def clip_loop(box, height, width):
    return np.array(
        [min(max(box[0], 0), width), min(max(box[1], 0), height)]
        + [min(max(box[2], 0), width), min(max(box[3], 0), height)]
    )


def paste_loop(mask, box, height, width):
    """Bilinear sampling with zero padding, pixel by pixel."""
    ph, pw = mask.shape
    x1, y1, x2, y2 = box
    out = np.zeros((height, width))
    for y in range(height):
        my = (y + 0.5 - y1) / (y2 - y1) * ph - 0.5
        y0 = int(np.floor(my))
        for x in range(width):
            mx = (x + 0.5 - x1) / (x2 - x1) * pw - 0.5
            x0 = int(np.floor(mx))
            value = 0.0
            for yy, wy in ((y0, 1 - (my - y0)), (y0 + 1, my - y0)):
                for xx, wx in ((x0, 1 - (mx - x0)), (x0 + 1, mx - x0)):
                    if 0 <= yy < ph and 0 <= xx < pw:
                        value += wy * wx * mask[yy, xx]
            out[y, x] = value
    return out


def random_boxes(rng, n, low, high, min_wh=1.0, max_wh=40.0):
    xy = rng.uniform(low, high, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# Matching


def test_match_boxes_hand_example():
    iou = jnp.array([[0.8, 0.1], [0.4, 0.2], [0.1, 0.6], [0.2, 0.25]])
    matched, labels = detection.match_boxes(iou, high_threshold=0.7, low_threshold=0.3)
    np.testing.assert_array_equal(matched, [0, 0, 1, 1])
    np.testing.assert_array_equal(labels, [1, -1, -1, 0])
    # Low-quality matches: candidate 2 is ground truth 1's best (0.6), so positive.
    _, labels = detection.match_boxes(
        iou, high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True
    )
    np.testing.assert_array_equal(labels, [1, -1, 1, 0])
    # Equal thresholds (ROI heads): nothing is ignored.
    _, labels = detection.match_boxes(iou, high_threshold=0.5, low_threshold=0.5)
    np.testing.assert_array_equal(labels, [1, 0, 1, 0])


@pytest.mark.parametrize("allow_low", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_boxes_matches_loop(allow_low, seed):
    rng = np.random.default_rng(seed)
    n, m = 40, 6
    # Quantized IoUs make ties (several best candidates per ground truth) common.
    iou = np.round(rng.uniform(0, 1, (n, m)) ** 2 * 8) / 8
    gt_valid = rng.uniform(size=m) < 0.7
    candidate_valid = rng.uniform(size=n) < 0.9
    matched, labels = detection.match_boxes(
        jnp.asarray(iou, jnp.float32),
        high_threshold=0.7,
        low_threshold=0.3,
        allow_low_quality_matches=allow_low,
        gt_valid=jnp.asarray(gt_valid),
        candidate_valid=jnp.asarray(candidate_valid),
    )
    want_matched, want_labels = match_loop(iou, 0.7, 0.3, allow_low, gt_valid, candidate_valid)
    np.testing.assert_array_equal(labels, want_labels)
    positive = want_labels == 1
    np.testing.assert_array_equal(np.asarray(matched)[positive], want_matched[positive])


def test_match_boxes_without_valid_ground_truth_gives_negatives():
    iou = jnp.full((5, 3), 0.9)
    matched, labels = detection.match_boxes(
        iou,
        high_threshold=0.5,
        low_threshold=0.5,
        allow_low_quality_matches=True,
        gt_valid=jnp.zeros(3, bool),
    )
    np.testing.assert_array_equal(labels, [0] * 5)
    _, labels = detection.match_boxes(jnp.zeros((4, 0)), high_threshold=0.5, low_threshold=0.5)
    np.testing.assert_array_equal(labels, [0] * 4)


def test_match_boxes_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="low_threshold"):
        detection.match_boxes(jnp.zeros((2, 2)), high_threshold=0.3, low_threshold=0.7)
    with pytest.raises(ValueError, match=r"\(N, M\)"):
        detection.match_boxes(jnp.zeros((2,)), high_threshold=0.5, low_threshold=0.5)


# ---------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize(
    "num_pos, num_neg, num_samples, fraction, want_pos, want_neg",
    [
        (50, 500, 256, 0.5, 50, 206),  # few positives: negatives fill up
        (300, 500, 256, 0.5, 128, 128),  # many positives: capped at the fraction
        (300, 40, 256, 0.5, 128, 40),  # few negatives: fewer samples in all
        (3, 100, 16, 0.25, 3, 13),
        (0, 100, 16, 0.25, 0, 16),
    ],
)
def test_sample_balanced_counts(num_pos, num_neg, num_samples, fraction, want_pos, want_neg):
    rng = np.random.default_rng(0)
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * 30)
    rng.shuffle(labels)
    sample = jax.jit(detection.sample_balanced, static_argnums=(2, 3))
    pos, neg = sample(jax.random.key(3), jnp.asarray(labels), num_samples, fraction)
    pos, neg = np.asarray(pos), np.asarray(neg)
    assert pos.sum() == want_pos and neg.sum() == want_neg
    assert np.all(labels[pos] == 1) and np.all(labels[neg] == 0)
    assert not np.any(pos & neg)


def test_sample_balanced_is_random_and_reproducible():
    labels = jnp.asarray([1] * 20 + [0] * 20)
    sample = jax.jit(detection.sample_balanced, static_argnums=(2, 3))
    draws = [np.asarray(sample(jax.random.key(k), labels, 8, 0.5)[0]) for k in range(200)]
    np.testing.assert_array_equal(
        draws[0], np.asarray(sample(jax.random.key(0), labels, 8, 0.5)[0])
    )
    frequency = np.mean(draws, axis=0)[:20]
    # Each positive is picked with probability 4 / 20.
    assert np.all(frequency > 0.08) and np.all(frequency < 0.35)


@pytest.mark.parametrize(
    "num_pos, num_neg, want_pos, want_valid",
    [(10, 200, 10, 128), (100, 200, 32, 128), (100, 20, 32, 52), (0, 200, 0, 128)],
)
def test_sample_rois_layout(num_pos, num_neg, want_pos, want_valid):
    rng = np.random.default_rng(1)
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * 30)
    rng.shuffle(labels)
    sample = jax.jit(detection.sample_rois, static_argnums=(2, 3))
    index, positive, valid = map(
        np.asarray, sample(jax.random.key(0), jnp.asarray(labels), 128, 0.25)
    )
    assert index.shape == positive.shape == valid.shape == (128,)
    # Positives first, then negatives, then padding.
    np.testing.assert_array_equal(positive, np.arange(128) < want_pos)
    np.testing.assert_array_equal(valid, np.arange(128) < want_valid)
    np.testing.assert_array_equal(labels[index[:want_pos]], 1)
    np.testing.assert_array_equal(labels[index[want_pos:want_valid]], 0)
    assert len(set(index[:want_valid].tolist())) == want_valid


def test_sample_rois_per_example_keys_under_vmap():
    labels = jnp.asarray(np.array([1] * 30 + [0] * 100))
    keys = jax.random.split(jax.random.key(0), 3)
    sample = jax.jit(lambda k: detection.sample_rois(k, labels, 64, 0.25))
    batched = jax.jit(jax.vmap(sample))(keys)
    for i in range(3):
        single = sample(keys[i])
        for a, b in zip(batched, single, strict=True):
            np.testing.assert_array_equal(a[i], b)
    assert not np.array_equal(batched[0][0], batched[0][1])


def test_sample_rois_needs_enough_candidates():
    with pytest.raises(ValueError, match="at least num_samples"):
        detection.sample_rois(jax.random.key(0), jnp.zeros(10, jnp.int32), 16, 0.25)


# ---------------------------------------------------------------------------
# Proposals and detections


def test_select_proposals_matches_loop():
    rng = np.random.default_rng(0)
    level_sizes = [60, 30]
    n = sum(level_sizes)
    anchors = random_boxes(rng, n, 0, 50, 4, 30)
    objectness = rng.normal(size=n).astype(np.float32)
    deltas = (rng.normal(size=(n, 4)) * 0.3).astype(np.float32)
    height, width = 60, 50
    pre, post, threshold = 20, 25, 0.5
    select = jax.jit(
        functools.partial(
            detection.select_proposals,
            level_sizes=level_sizes,
            image_size=(height, width),
            pre_nms_top_n=pre,
            post_nms_top_n=post,
            nms_threshold=threshold,
        )
    )
    boxes, scores, valid = map(np.asarray, select(anchors, objectness, deltas))

    candidates, levels, start = [], [], 0
    for level, size in enumerate(level_sizes):
        order = np.argsort(-objectness[start : start + size], kind="stable")[:pre]
        candidates += [start + i for i in order]
        levels += [level] * len(order)
        start += size
    decoded = [
        clip_loop(decode_loop(deltas[i], anchors[i], (1, 1, 1, 1)), height, width)
        for i in candidates
    ]
    big = [i for i, b in enumerate(decoded) if b[2] - b[0] >= 1e-3 and b[3] - b[1] >= 1e-3]
    probs = 1 / (1 + np.exp(-objectness[candidates].astype(np.float64)))
    keep = nms_loop(
        [decoded[i] for i in big], probs[big], threshold, class_ids=[levels[i] for i in big]
    )
    keep = [big[k] for k in keep][:post]
    assert valid.sum() == len(keep) and np.all(valid[: len(keep)])
    np.testing.assert_allclose(boxes[: len(keep)], [decoded[i] for i in keep], atol=1e-3)
    np.testing.assert_allclose(scores[: len(keep)], probs[keep], rtol=1e-5)
    assert np.all(boxes[len(keep) :] == 0) and np.all(scores[len(keep) :] == 0)


def test_select_detections_matches_loop():
    rng = np.random.default_rng(1)
    n, k = 30, 4
    proposals = random_boxes(rng, n, 0, 40, 5, 30)
    logits = (rng.normal(size=(n, k)) * 2).astype(np.float32)
    deltas = (rng.normal(size=(n, k, 4)) * 0.5).astype(np.float32)
    proposal_valid = rng.uniform(size=n) < 0.85
    height, width = 64, 48
    select = jax.jit(
        detection.select_detections,
        static_argnames=("image_size", "score_threshold", "nms_threshold", "max_detections"),
    )
    out = select(
        jnp.asarray(logits),
        jnp.asarray(deltas),
        jnp.asarray(proposals),
        jnp.asarray(proposal_valid),
        image_size=(height, width),
        score_threshold=0.2,
        nms_threshold=0.4,
        max_detections=12,
    )
    boxes, scores, classes, valid = map(np.asarray, out)

    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    cands = []
    for i in range(n):
        for c in range(1, k):
            box = clip_loop(decode_loop(deltas[i, c], proposals[i], (10, 10, 5, 5)), height, width)
            big = box[2] - box[0] >= 1e-2 and box[3] - box[1] >= 1e-2
            if proposal_valid[i] and probs[i, c] > 0.2 and big:
                cands.append((box, probs[i, c], c))
    keep = nms_loop(
        [c[0] for c in cands], [c[1] for c in cands], 0.4, class_ids=[c[2] for c in cands]
    )
    keep = keep[:12]
    assert valid.sum() == len(keep) and np.all(valid[: len(keep)])
    np.testing.assert_allclose(boxes[: len(keep)], [cands[i][0] for i in keep], atol=1e-3)
    np.testing.assert_allclose(scores[: len(keep)], [cands[i][1] for i in keep], rtol=1e-5)
    np.testing.assert_array_equal(classes[: len(keep)], [cands[i][2] for i in keep])
    assert np.all(classes[len(keep) :] == 0) and np.all(scores[len(keep) :] == 0)


# ---------------------------------------------------------------------------
# Mask targets


@pytest.mark.parametrize("size, sampling_ratio", [(7, 2), (14, 0), (28, 1), (28, 2)])
def test_crop_mask_targets_square_by_its_own_box_is_all_ones(size, sampling_ratio):
    masks = np.zeros((2, 3, 40, 40), np.uint8)
    masks[1, 2, 9:30, 5:17] = 1  # rows 9..29, columns 5..16
    boxes = jnp.array([[[0.0, 0.0, 4.0, 4.0]], [[5.0, 9.0, 17.0, 30.0]]])
    crop = jax.jit(detection.crop_mask_targets, static_argnums=3, static_argnames="sampling_ratio")
    targets = crop(
        jnp.asarray(masks), boxes, jnp.array([[0], [2]]), size, sampling_ratio=sampling_ratio
    )
    assert targets.shape == (2, 1, size, size)
    np.testing.assert_array_equal(targets[1, 0], np.ones((size, size)))
    np.testing.assert_array_equal(targets[0, 0], np.zeros((size, size)))


def test_crop_mask_targets_partial_overlap_hand_computed():
    masks = np.zeros((1, 2, 16, 16), np.uint8)
    masks[0, 0, 0:8, 0:8] = 1
    masks[0, 1, 8:16, 8:16] = 1
    boxes = jnp.array(
        [
            [
                [4.0, 0.0, 12.0, 8.0],  # left half over instance 0
                [4.0, 0.0, 12.0, 8.0],  # same box, instance 1: nothing
                [7.0, 0.0, 9.0, 2.0],  # one bin centred on the edge column 7|8
                [7.25, 0.0, 9.25, 2.0],  # a quarter pixel further right
            ]
        ]
    )
    gt_index = jnp.array([[0, 1, 0, 0]])
    soft = detection.crop_mask_targets(
        jnp.asarray(masks), boxes[:, :2], gt_index[:, :2], 4, threshold=None
    )
    # Samples at x = 4.5, 5.5 | 6.5, 7.5 | 8.5, 9.5 | 10.5, 11.5: pixel centres.
    np.testing.assert_array_equal(soft[0, 0], np.tile([1.0, 1.0, 0.0, 0.0], (4, 1)))
    np.testing.assert_array_equal(soft[0, 1], np.zeros((4, 4)))
    # One sample per bin at x = 8 (7.5 in pixel centres): half of pixel 7.
    soft = detection.crop_mask_targets(
        jnp.asarray(masks), boxes[:, 2:], gt_index[:, 2:], 1, threshold=None, sampling_ratio=1
    )
    np.testing.assert_allclose(soft[0, :, 0, 0], [0.5, 0.25])
    hard = detection.crop_mask_targets(
        jnp.asarray(masks), boxes[:, 2:], gt_index[:, 2:], 1, sampling_ratio=1
    )
    np.testing.assert_array_equal(hard[0, :, 0, 0], [1.0, 0.0])


# ---------------------------------------------------------------------------
# Paste-back


def test_paste_masks_matches_loop():
    rng = np.random.default_rng(0)
    height, width = 20, 24
    masks = rng.uniform(size=(2, 3, 7, 7)).astype(np.float32)
    boxes = np.array(
        [
            [[2.0, 3.0, 15.5, 11.0], [-4.0, 5.0, 8.0, 30.0], [10.3, 0.7, 13.9, 4.1]],
            [[0.0, 0.0, 24.0, 20.0], [20.0, 15.0, 23.0, 19.0], [5.5, 5.5, 6.5, 6.5]],
        ],
        np.float32,
    )
    soft = detection.paste_masks(
        jnp.asarray(masks), jnp.asarray(boxes), (height, width), threshold=None
    )
    hard = detection.paste_masks(jnp.asarray(masks), jnp.asarray(boxes), (height, width))
    assert soft.shape == hard.shape == (2, 3, height, width) and hard.dtype == jnp.uint8
    for b in range(2):
        for d in range(3):
            want = paste_loop(masks[b, d], boxes[b, d], height, width)
            np.testing.assert_allclose(soft[b, d], want, atol=1e-5)
            np.testing.assert_array_equal(hard[b, d], (want >= 0.5).astype(np.uint8))


def test_paste_masks_of_ones_fills_exactly_the_box_pixels():
    boxes = jnp.array([[2.0, 3.0, 9.0, 5.0], [0.0, 0.0, 1.0, 1.0], [4.4, 1.6, 6.6, 7.4]])
    pasted = np.asarray(detection.paste_masks(jnp.ones((3, 28, 28)), boxes, (8, 10)))
    want = np.zeros((3, 8, 10), np.uint8)
    want[0, 3:5, 2:9] = 1
    want[1, 0, 0] = 1
    want[2, 2:7, 4:7] = 1  # pixels whose centres lie inside the box
    np.testing.assert_array_equal(pasted, want)


def test_paste_masks_matches_torch_grid_sample():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    mask = rng.uniform(size=(14, 14)).astype(np.float32)
    box = np.array([3.2, 5.1, 20.7, 15.3], np.float32)
    height, width = 24, 28
    ys = (np.arange(height) + 0.5 - box[1]) / (box[3] - box[1]) * 2 - 1
    xs = (np.arange(width) + 0.5 - box[0]) / (box[2] - box[0]) * 2 - 1
    grid = np.stack(np.meshgrid(xs, ys), axis=-1)[None].astype(np.float32)
    want = torch.nn.functional.grid_sample(
        torch.from_numpy(mask)[None, None], torch.from_numpy(grid), align_corners=False
    )[0, 0].numpy()
    got = detection.paste_masks(
        jnp.asarray(mask), jnp.asarray(box), (height, width), threshold=None
    )
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_paste_masks_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="leading dimensions"):
        detection.paste_masks(jnp.ones((2, 7, 7)), jnp.ones((3, 4)), (8, 8))
