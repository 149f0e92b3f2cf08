"""Tests for jfcnn.ops.roi_align against a slow loop reference written from the definition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jfcnn.ops import multilevel_roi_align, multilevel_roi_align_dense, roi_align
from jfcnn.ops.roi_align import fpn_levels

# One jitted entry point, so tests that use the same configuration share a compilation.
STATIC = ("output_size", "spatial_scale", "sampling_ratio", "aligned", "max_sampling_ratio")
roi_align_jit = jax.jit(roi_align, static_argnames=STATIC)


# ----------------------------------------------------------------------------
# Reference: torchvision's CPU kernel, one sample at a time, in float64.


def bilinear_taps(height, width, y, x):
    """[(row, col, weight)] of one sample, with the kernel's border rules."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def box_samples(box, height, width, output_size, scale, ratio, aligned, max_grid=None):
    """[(p, q, [(row, col, weight / count)])] for every sample of one box."""
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * scale - offset for v in box)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    grid_h = ratio if ratio > 0 else math.ceil(roi_h / ph)
    grid_w = ratio if ratio > 0 else math.ceil(roi_w / pw)
    if max_grid is not None:
        grid_h, grid_w = min(grid_h, max_grid), min(grid_w, max_grid)
    count = max(grid_h * grid_w, 1)
    out = []
    for p in range(ph):
        for q in range(pw):
            for iy in range(grid_h):
                y = y1 + p * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = x1 + q * bin_w + (ix + 0.5) * bin_w / grid_w
                    taps = bilinear_taps(height, width, y, x)
                    out.append((p, q, [(r, c, w / count) for r, c, w in taps]))
    return out


def roi_align_loop(features, boxes, image, output_size, scale, ratio, aligned, max_grid=None):
    """`features (B, H, W, C)`, flat `boxes (K, 4)`, `image (K,)` -> `(K, PH, PW, C)`."""
    features = np.asarray(features, np.float64)
    _, height, width, channels = features.shape
    out = np.zeros((len(boxes), *output_size, channels))
    for k, (box, b) in enumerate(zip(np.asarray(boxes, np.float64), image, strict=True)):
        for p, q, taps in box_samples(
            box, height, width, output_size, scale, ratio, aligned, max_grid
        ):
            for r, c, w in taps:
                out[k, p, q] += w * features[b, r, c]
    return out


def roi_align_loop_vjp(
    shape, boxes, image, output_size, scale, ratio, aligned, cotangent, max_grid=None
):
    """Gradient of `sum(roi_align * cotangent)` w.r.t. the features."""
    grad = np.zeros(shape)
    cotangent = np.asarray(cotangent, np.float64)
    for k, (box, b) in enumerate(zip(np.asarray(boxes, np.float64), image, strict=True)):
        for p, q, taps in box_samples(
            box, *shape[1:3], output_size, scale, ratio, aligned, max_grid
        ):
            for r, c, w in taps:
                grad[b, r, c] += w * cotangent[k, p, q]
    return grad


def random_boxes(rng, n, height, width, scale=1.0):
    """Boxes in image coordinates: inside, crossing the borders and outside."""
    extent = np.array([width, height]) / scale
    xy = rng.uniform(-0.3, 1.1, (n, 2)) * extent
    wh = rng.uniform(0.05, 0.7, (n, 2)) * extent
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[0] = [2.2 / scale, 1.3 / scale, 2.2 / scale, 1.3 / scale]  # empty
    boxes[1] = [-9.0 / scale, -8.0 / scale, -4.0 / scale, -3.0 / scale]  # fully outside
    boxes[2] = [0.0, 0.0, extent[0], extent[1]]  # the whole map
    return boxes.astype(np.float32)


# ----------------------------------------------------------------------------
# Values against the loop reference.

H, W, C = 7, 9, 3

CASES = [
    # aligned, sampling_ratio, spatial_scale, output_size
    (True, 2, 1.0, (2, 2)),
    (False, 2, 0.5, (3, 2)),
    (True, 0, 1.0, (3, 3)),
    (False, -1, 0.25, (2, 3)),
    (True, 1, 0.5, (4, 4)),
    (False, 3, 1.0, (2, 2)),
    (True, 3, 0.25, (1, 3)),
]


@pytest.mark.parametrize("aligned,ratio,scale,output_size", CASES)
def test_matches_loop_reference(aligned, ratio, scale, output_size):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, H, W, C)).astype(np.float32)
    boxes = np.stack([random_boxes(rng, 9, H, W, scale) for _ in range(2)])
    out = roi_align_jit(
        features,
        boxes,
        output_size,
        spatial_scale=scale,
        sampling_ratio=ratio,
        aligned=aligned,
        max_sampling_ratio=4,
    )
    image = np.repeat(np.arange(2), 9)
    expected = roi_align_loop(
        features, boxes.reshape(-1, 4), image, output_size, scale, ratio, aligned
    )
    assert out.shape == (2, 9, *output_size, C)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out.reshape(expected.shape), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("ratio", [2, 0])
def test_bfloat16_matches_reference_and_keeps_dtype(ratio):
    rng = np.random.default_rng(1)
    features = jnp.asarray(rng.standard_normal((2, H, W, C)), jnp.bfloat16)
    boxes = np.stack([random_boxes(rng, 9, H, W) for _ in range(2)])

    def pool(f):
        return roi_align_jit(f, boxes, (2, 2), sampling_ratio=ratio, max_sampling_ratio=4)

    out, vjp = jax.vjp(pool, features)
    assert out.dtype == jnp.bfloat16
    # Reference on the bfloat16 values: with float32 accumulation the only extra error
    # is the final rounding to bfloat16 (8 significant bits).
    args = (boxes.reshape(-1, 4), np.repeat(np.arange(2), 9), (2, 2), 1.0, ratio, True)
    expected = roi_align_loop(np.asarray(features, np.float32), *args, max_grid=4)
    out = np.asarray(out, np.float32).reshape(expected.shape)
    np.testing.assert_allclose(out, expected, rtol=2**-8, atol=1e-6)
    cot = jnp.asarray(rng.standard_normal((2, 9, 2, 2, C)), jnp.bfloat16)
    (grad,) = vjp(cot)
    assert grad.dtype == jnp.bfloat16
    expected = roi_align_loop_vjp(
        features.shape, *args, np.asarray(cot, np.float32).reshape(-1, 2, 2, C), max_grid=4
    )
    np.testing.assert_allclose(np.asarray(grad, np.float32), expected, rtol=2**-8, atol=1e-6)


def test_feature_gradient_matches_loop_adjoint():
    # (The adaptive mode's patch layouts are checked in test_adaptive_exact_*.)
    rng = np.random.default_rng(2)
    features = rng.standard_normal((2, H, W, C)).astype(np.float32)
    boxes = np.stack([random_boxes(rng, 9, H, W) for _ in range(2)])
    cot = rng.standard_normal((2, 9, 3, 2, C)).astype(np.float32)
    grad = jax.grad(lambda f: jnp.vdot(roi_align_jit(f, boxes, (3, 2), sampling_ratio=2), cot))(
        features
    )
    expected = roi_align_loop_vjp(
        features.shape,
        boxes.reshape(-1, 4),
        np.repeat(np.arange(2), 9),
        (3, 2),
        1.0,
        2,
        True,
        cot.reshape(-1, 3, 2, C),
    )
    np.testing.assert_allclose(grad, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Hand-computed goldens on a 4x4 ramp F[y, x] = 4 y + x, where a bilinear
# sample inside the map is exactly 4 y + x.

RAMP = jnp.arange(16.0).reshape(4, 4, 1)


def test_golden_ramp_interior():
    # aligned: box (0.5, 0.5, 2.5, 2.5) covers pixels [0, 2] x [0, 2]; 2x2 bins of
    # one sample each at (y, x) in {0.5, 1.5}^2.
    out = roi_align_jit(RAMP, jnp.array([[0.5, 0.5, 2.5, 2.5]]), 2, sampling_ratio=1)
    np.testing.assert_allclose(out[0, :, :, 0], [[2.5, 3.5], [6.5, 7.5]], rtol=1e-6)
    # Two samples per axis average to the bin centre; a 1x3 output along x.
    out = roi_align_jit(
        RAMP, jnp.array([[0.0, 1.0, 3.0, 2.0]]), (1, 3), sampling_ratio=2, aligned=False
    )
    # bins x in [0,1], [1,2], [2,3] at y in [1, 2]: centres x = 0.5, 1.5, 2.5, y = 1.5.
    np.testing.assert_allclose(out[0, 0, :, 0], [6.5, 7.5, 8.5], rtol=1e-6)


def test_golden_ramp_borders():
    boxes = jnp.array(
        [
            # Samples at y, x = 2.75 and 4.25: only (2.75, 2.75) is inside [-1, 4]; the
            # three others count as 0, so (4 * 2.75 + 2.75) / 4.
            [2.0, 2.0, 5.0, 5.0],
            # One sample at (3.5, 3.5), beyond the last pixel centre: clamped to F[3, 3].
            [3.0, 3.0, 4.0, 4.0],
            # One sample at (1.5, -0.5): x clamped to 0, so F[1.5, 0] = 6.
            [-1.0, 1.0, 0.0, 2.0],
            # One sample at (-1.5, 1.5): outside, 0.
            [1.0, -2.0, 2.0, -1.0],
            # aligned=False grows this 0.2-pixel box to 1x1: sample at (1.5, 2.5).
            [2.0, 1.0, 2.2, 1.2],
        ]
    )
    out = roi_align_jit(RAMP, boxes[:1], 1, sampling_ratio=2, aligned=False)
    np.testing.assert_allclose(out[0, 0, 0, 0], 13.75 / 4, rtol=1e-6)
    out = roi_align_jit(RAMP, boxes[1:], 1, sampling_ratio=1, aligned=False)
    np.testing.assert_allclose(out[:, 0, 0, 0], [15.0, 6.0, 0.0, 4 * 1.5 + 2.5], rtol=1e-6)


def test_golden_adaptive_counts():
    # aligned=False box of height 5 and width 2 with a 2x1 output: bins are 2.5 x 2, so
    # the adaptive grid is ceil(2.5) x ceil(2) = 3 x 2 samples; the mean is the bin centre.
    out = roi_align_jit(
        RAMP,
        jnp.array([[0.5, -1.0, 2.5, 4.0]]),
        (2, 1),
        sampling_ratio=0,
        aligned=False,
        max_sampling_ratio=3,
    )
    # Bin 0 has y samples at -1 + 2.5 * (1/6, 3/6, 5/6) = -0.583, 0.25, 1.083: the first
    # clamps to row 0, so its value is x + 4 * mean(0, 0.25, 1.083); x samples 1.0, 2.0.
    y0 = np.mean([0.0, 0.25, 1.0 + 1.0 / 12.0])
    y1 = np.mean([1.5 + 2.5 / 6, 1.5 + 2.5 / 2, 1.5 + 2.5 * 5 / 6])  # 1.917, 2.75, 3.583
    y1_clamped = np.mean([1.5 + 2.5 / 6, 1.5 + 2.5 / 2, 3.0])  # the last clamps to row 3
    assert y1 != y1_clamped
    np.testing.assert_allclose(out[0, :, 0, 0], [4 * y0 + 1.5, 4 * y1_clamped + 1.5], rtol=1e-6)


def test_constant_map_gives_constant_inside():
    features = jnp.full((6, 6, 2), 3.0)
    boxes = jnp.array([[0.7, 1.2, 5.1, 4.9], [1.0, 1.0, 1.5, 5.5]])
    for ratio in (0, 2):
        out = roi_align_jit(features, boxes, 3, sampling_ratio=ratio, max_sampling_ratio=2)
        np.testing.assert_allclose(out, 3.0, rtol=1e-6)


@pytest.mark.parametrize("ratio", [2, 0])
def test_maps_smaller_than_a_patch(ratio):
    # One row and three columns: every patch is clipped to the map.
    rng = np.random.default_rng(12)
    features = rng.standard_normal((1, 1, 3, 2)).astype(np.float32)
    boxes = np.array(
        [[-0.3, 0.2, 2.7, 0.9], [0.1, -0.6, 0.4, 1.6], [1.2, 0.3, 3.9, 2.2]], np.float32
    )
    out = roi_align_jit(features, boxes, 2, sampling_ratio=ratio, box_indices=np.zeros(3, np.int32))
    expected = roi_align_loop(features, boxes, [0] * 3, (2, 2), 1.0, ratio, True)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------
# Special boxes.


def test_empty_and_outside_boxes():
    features = jnp.asarray(np.random.default_rng(3).standard_normal((H, W, C)), jnp.float32)
    boxes = jnp.array(
        [
            [3.0, 2.0, 3.0, 2.0],  # empty
            [4.0, 3.0, 2.0, 1.0],  # inverted
            [-20.0, -20.0, -10.0, -12.0],  # fully outside, above-left
            [30.0, 2.0, 40.0, 5.0],  # fully outside, right
        ]
    )

    cot = jnp.asarray(np.random.default_rng(4).standard_normal((4, 2, 2, C)), jnp.float32)

    def loss(f, b):
        return jnp.vdot(roi_align_jit(f, b, 2, sampling_ratio=0, max_sampling_ratio=2), cot)

    out = roi_align_jit(features, boxes, 2, sampling_ratio=0, max_sampling_ratio=2)
    np.testing.assert_array_equal(out, 0.0)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(features, boxes)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g, 0.0)
    # A fixed sampling ratio samples an empty box at one point (torchvision does the same).
    out = roi_align_jit(features, boxes[:1], 2, sampling_ratio=2)
    expected = roi_align_loop(features[None], boxes[:1], [0], (2, 2), 1.0, 2, True)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    point = 0.25 * (features[1, 2] + features[1, 3] + features[2, 2] + features[2, 3])
    np.testing.assert_allclose(out, np.broadcast_to(point, (1, 2, 2, C)), atol=1e-6)
    np.testing.assert_array_equal(roi_align_jit(features, boxes[2:], 2, sampling_ratio=2), 0.0)


def test_adaptive_exact_up_to_max_sampling_ratio():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((1, 20, 20, 2)).astype(np.float32)
    cot = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    image = np.zeros(3, np.int32)

    @jax.jit
    def pool_and_grad(boxes):
        out, vjp = jax.vjp(
            lambda f: roi_align(f, boxes, 2, sampling_ratio=0, box_indices=image), features
        )
        return out, vjp(cot)[0]

    def check(boxes, max_grid=None):
        out, grad = pool_and_grad(boxes)
        args = (boxes, image, (2, 2), 1.0, 0, True)
        np.testing.assert_allclose(
            out, roi_align_loop(features, *args, max_grid=max_grid), atol=2e-6, rtol=1e-5
        )
        expected_grad = roi_align_loop_vjp(features.shape, *args, cot, max_grid=max_grid)
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)
        return out

    # With a 2x2 output a box of s pixels takes ceil(s / 2) samples per bin axis. The
    # sets need patches of 3, 5 and 9 rows (up to 8 samples, the default cap), so the
    # run-time switch picks a different layout for each.
    for boxes in [
        [[1.3, 0.6, 4.9, 4.2], [6.2, 2.1, 8.7, 5.0], [5.0, 5.0, 7.2, 6.1]],
        [[1.3, 0.6, 8.9, 7.2], [6.2, 2.1, 12.7, 9.0], [5.0, 5.0, 7.2, 6.1]],
        [[1.3, 0.6, 16.9, 15.2], [2.2, 2.1, 17.7, 9.0], [5.0, 5.0, 7.2, 6.1]],
    ]:
        check(np.array(boxes, np.float32))
    # 19.4 pixels need ceil(9.7) = 10 samples per bin axis: capped at 8.
    boxes = np.array(
        [[0.5, 0.4, 19.9, 19.8], [6.2, 2.1, 8.7, 5.0], [5.0, 5.0, 7.2, 6.1]], np.float32
    )
    out = check(boxes, max_grid=8)
    exact = roi_align_loop(features, boxes, image, (2, 2), 1.0, 0, True)
    assert not np.allclose(out[0], exact[0], atol=1e-3)


# ----------------------------------------------------------------------------
# Input forms and transformations.


def test_three_forms_agree():
    rng = np.random.default_rng(5)
    features = rng.standard_normal((2, H, W, C)).astype(np.float32)
    boxes = np.stack([random_boxes(rng, 9, H, W) for _ in range(2)])
    batched = roi_align_jit(features, boxes, 2)
    single = [roi_align_jit(features[b], boxes[b], 2) for b in range(2)]
    # Flat form, boxes in a shuffled order.
    order = rng.permutation(18)
    image = np.repeat(np.arange(2), 9)[order].astype(np.int32)
    flat = roi_align_jit(features, boxes.reshape(-1, 4)[order], 2, box_indices=image)
    expected = roi_align_loop(
        features, boxes.reshape(-1, 4), np.repeat(np.arange(2), 9), (2, 2), 1.0, 2, True
    )
    np.testing.assert_allclose(batched.reshape(expected.shape), expected, atol=2e-6)
    np.testing.assert_allclose(np.concatenate(single), expected, atol=2e-6)
    np.testing.assert_allclose(flat, expected[order], atol=2e-6)


def test_vmap_and_jit_match_batched():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((2, H, W, C)).astype(np.float32)
    boxes = np.stack([random_boxes(rng, 5, H, W) for _ in range(2)])

    def pool(f, b):
        return roi_align(f, b, 2, sampling_ratio=2)

    out_vmap, vjp_vmap = jax.vjp(jax.jit(jax.vmap(pool)), features, boxes)
    out, vjp = jax.vjp(jax.jit(pool), features, boxes)  # batched form
    expected = roi_align_loop(
        features, boxes.reshape(-1, 4), np.repeat(np.arange(2), 5), (2, 2), 1.0, 2, True
    )
    np.testing.assert_allclose(out.reshape(expected.shape), expected, atol=2e-6)
    np.testing.assert_allclose(out_vmap, out, atol=1e-6)
    np.testing.assert_allclose(pool(features[0], boxes[0]), out[0], atol=1e-6)  # no jit
    cot = rng.standard_normal(out.shape).astype(np.float32)
    for a, b in zip(vjp_vmap(cot), vjp(cot), strict=True):
        assert np.abs(b).sum() > 0
        np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------
# Float64 gradient checks against finite differences.


@pytest.mark.parametrize("aligned,ratio", [(True, 2), (False, 0)])
def test_gradients_float64(aligned, ratio):
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        features = jnp.asarray(rng.standard_normal((6, 8, 2)))
        # Coordinates with random fractions keep every sample away from integer rows and
        # columns (where bilinear interpolation has kinks) by far more than eps.
        dense = jnp.asarray(
            [[0.31, 0.77, 5.13, 4.42], [1.13, 1.71, 4.27, 5.06], [4.18, -0.63, 9.47, 3.28]]
        )
        sparse = dense.at[1].set(jnp.array([-1.37, 2.21, 3.66, 7.19]))

        def pool(f, b):
            return roi_align(
                f, b, (2, 3), sampling_ratio=ratio, aligned=aligned, max_sampling_ratio=2
            )

        pool = jax.jit(pool)
        # In the adaptive mode these boxes take at most 2 samples per bin axis (one
        # contiguous 3x3 patch per bin); swapping in a box that needs 3, capped at 2,
        # switches every bin to per-sample 2x2 blocks.
        for boxes in (dense, sparse):
            # Reverse mode only: the op is a custom VJP.
            check_grads(pool, (features, boxes), order=1, modes=["rev"], eps=1e-6)
            out, vjp = jax.vjp(pool, features, boxes)
            _, box_grad = vjp(2 * out)  # of sum(out ** 2)
            assert box_grad.dtype == jnp.float64
            assert np.all(np.abs(box_grad) > 0)


# ----------------------------------------------------------------------------
# Multi-level (FPN) pooling.


def level_mapper_loop(boxes, k_min, k_max, canonical_scale=224, canonical_level=4, eps=1e-6):
    """torchvision's LevelMapper, one box at a time (float32 like torch)."""
    levels = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float32):
        s = np.sqrt(np.float32((x2 - x1) * (y2 - y1)))
        k = math.floor(canonical_level + np.log2(s / np.float32(canonical_scale)) + eps)
        levels.append(min(max(k, k_min), k_max) - k_min)
    return np.array(levels)


def test_fpn_levels_match_level_mapper():
    rng = np.random.default_rng(8)
    sides = np.exp(rng.uniform(np.log(4), np.log(1200), (200, 2)))
    corner = rng.uniform(0, 100, (200, 2))
    boxes = np.concatenate([corner, corner + sides], 1).astype(np.float32)
    # Exact powers of two around the canonical scale: 224 -> level 4, 112 -> 3, 448 -> 5.
    boxes[:3] = [[0, 0, 224, 224], [10, 10, 122, 122], [0, 0, 448, 448]]
    levels = fpn_levels(jnp.asarray(boxes), k_min=2, k_max=5)
    np.testing.assert_array_equal(levels, level_mapper_loop(boxes, 2, 5))
    np.testing.assert_array_equal(levels[:3], [2, 1, 3])
    assert set(np.asarray(levels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("ratio", [2, 0])
def test_multilevel_matches_per_level_reference(ratio):
    rng = np.random.default_rng(9)
    strides = (2, 4, 8)
    image_size = 64
    features = [
        rng.standard_normal((2, image_size // s, image_size // s + 1, 2)).astype(np.float32)
        for s in strides
    ]
    corner = rng.uniform(-4, 50, (2, 6, 2))
    side = np.exp(rng.uniform(np.log(2), np.log(60), (2, 6, 1)))
    boxes = np.concatenate([corner, corner + side], -1).astype(np.float32)
    out = multilevel_roi_align(
        features,
        boxes,
        2,
        strides=strides,
        sampling_ratio=ratio,
        canonical_scale=16,
        canonical_level=2,
    )
    assert out.shape == (2, 6, 2, 2, 2)
    levels = level_mapper_loop(
        boxes.reshape(-1, 4), 1, 3, canonical_scale=16, canonical_level=2
    ).reshape(2, 6)
    assert len(set(levels.ravel())) == 3  # every level is used
    cot = rng.standard_normal(out.shape).astype(np.float32)
    expected_grads = [np.zeros(f.shape) for f in features]
    for b in range(2):
        for n in range(6):
            lvl = levels[b, n]
            args = (boxes[b, n : n + 1], [b], (2, 2), 1.0 / strides[lvl], ratio, False)
            expected = roi_align_loop(features[lvl], *args)
            np.testing.assert_allclose(out[b, n], expected[0], atol=2e-6, rtol=1e-5)
            expected_grads[lvl] += roi_align_loop_vjp(features[lvl].shape, *args, cot[b, n : n + 1])

    # Feature gradients flow back to each level through the shared canvas.
    grads = jax.jit(
        jax.grad(
            lambda fs: jnp.vdot(
                multilevel_roi_align(
                    fs,
                    boxes,
                    2,
                    strides=strides,
                    sampling_ratio=ratio,
                    canonical_scale=16,
                    canonical_level=2,
                ),
                cot,
            )
        )
    )(features)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert np.abs(expected).sum() > 0
        np.testing.assert_allclose(grad, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "features_shape,boxes_shape,indices,error,match",
    [
        ((4, 4), (2, 4), None, ValueError, r"\(4, 4\)"),
        ((1, 1, 4, 4, 1), (2, 4), None, ValueError, r"\(1, 1, 4, 4, 1\)"),
        ((4, 4, 1), (2, 5), None, ValueError, r"\(2, 5\)"),
        ((4, 4, 1), (1, 2, 4), None, ValueError, r"\(1, 2, 4\)"),
        ((2, 4, 4, 1), (3, 5, 4), None, ValueError, r"\(3, 5, 4\)"),
        ((2, 4, 4, 1), (5, 4), np.zeros(4, np.int32), ValueError, r"\(4,\)"),
        ((2, 4, 4, 1), (5, 4), np.zeros(5, np.float32), TypeError, "float32"),
        ((4, 4, 1), (5, 4), np.zeros(5, np.int32), ValueError, "box_indices"),
    ],
)
def test_bad_shapes_raise(features_shape, boxes_shape, indices, error, match):
    with pytest.raises(error, match=match):
        roi_align(jnp.zeros(features_shape), jnp.zeros(boxes_shape), 2, box_indices=indices)


def test_bad_arguments_raise():
    features, boxes = jnp.zeros((4, 4, 1)), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="output_size must be >= 1, got 0"):
        roi_align(features, boxes, 0)
    with pytest.raises(ValueError, match=r"output_size must be an int or a pair of ints"):
        roi_align(features, boxes, (2, 2, 2))
    with pytest.raises(TypeError, match="int32"):
        roi_align(jnp.zeros((4, 4, 1), jnp.int32), boxes, 2)
    with pytest.raises(ValueError, match="max_sampling_ratio"):
        roi_align(features, boxes, 2, max_sampling_ratio=0)
    maps = [jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 4, 4, 2))]
    with pytest.raises(ValueError, match=r"\(4, 8, 16\)"):
        multilevel_roi_align(maps, jnp.zeros((1, 3, 4)), 2, strides=(4, 8, 16))
    with pytest.raises(ValueError, match=r"\(4, 16\)"):
        multilevel_roi_align(maps, jnp.zeros((1, 3, 4)), 2, strides=(4, 16))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        multilevel_roi_align(maps, jnp.zeros((2, 3, 4)), 2, strides=(4, 8))


# ----------------------------------------------------------------------------
# Optional cross-checks against torchvision itself.


def test_matches_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    rng = np.random.default_rng(10)
    features = rng.standard_normal((2, H, W, C)).astype(np.float32)
    boxes = np.stack([random_boxes(rng, 9, H, W) for _ in range(2)])
    rois = torch.cat(
        [torch.arange(2.0).repeat_interleave(9)[:, None], torch.from_numpy(boxes.reshape(-1, 4))],
        dim=1,
    )
    features_t = torch.from_numpy(features).permute(0, 3, 1, 2).requires_grad_(True)
    for aligned, ratio, scale, output_size in CASES[:4]:
        options = dict(spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
        out = roi_align_jit(features, boxes, output_size, max_sampling_ratio=4, **options)
        ref = torchvision.ops.roi_align(features_t, rois, output_size, scale, ratio, aligned)
        ref_np = ref.detach().permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(out.reshape(ref_np.shape), ref_np, atol=2e-6)
        if (aligned, ratio) != (False, 2):
            continue
        # Feature gradients (torchvision has none for boxes).
        cot = rng.standard_normal(ref_np.shape).astype(np.float32)
        (grad_t,) = torch.autograd.grad(ref, features_t, torch.from_numpy(cot).permute(0, 3, 1, 2))
        grad = jax.grad(
            lambda f, size=output_size, options=options, cot=cot: jnp.vdot(
                roi_align_jit(f, boxes, size, max_sampling_ratio=4, **options).reshape(cot.shape),
                cot,
            )
        )(features)
        np.testing.assert_allclose(grad, grad_t.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_multilevel_matches_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from collections import OrderedDict

    rng = np.random.default_rng(11)
    strides = (4, 8, 16, 32)
    image_size = 256
    features = [
        rng.standard_normal((2, image_size // s, image_size // s, 2)).astype(np.float32)
        for s in strides
    ]
    corner = rng.uniform(0, 150, (2, 8, 2))
    side = np.exp(rng.uniform(np.log(8), np.log(250), (2, 8, 1)))
    boxes = np.concatenate([corner, corner + side], -1).astype(np.float32)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 3, sampling_ratio=2)
    maps = OrderedDict(
        (str(i), torch.from_numpy(f).permute(0, 3, 1, 2)) for i, f in enumerate(features)
    )
    ref = pooler(maps, [torch.from_numpy(b) for b in boxes], [(image_size, image_size)] * 2)
    out = multilevel_roi_align(features, boxes, 3, strides=strides, sampling_ratio=2)
    np.testing.assert_allclose(
        out.reshape(-1, 3, 3, 2), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5
    )


# ----------------------------------------------------------------------------
# valid_hw: a map padded past each image's extent pools as the unpadded map.

# Each image's extent (h, w) on a (PAD_H, PAD_W) map; the padding holds noise, not
# zeros, so that reading it (or interpolating toward it) would show.
PAD_H, PAD_W = 11, 13
EXTENTS = np.array([[H, W], [5, 6]], np.int32)


def padded_maps(rng):
    """`(2, PAD_H, PAD_W, C)` noise and the unpadded `[H x W, 5 x 6]` top-left crops."""
    padded = rng.standard_normal((2, PAD_H, PAD_W, C)).astype(np.float32)
    return padded, [padded[b, :h, :w] for b, (h, w) in enumerate(EXTENTS)]


def edge_boxes(rng, n, height, width, scale):
    """Boxes crossing, touching or ending at the bottom and right edges of an extent."""
    boxes = random_boxes(rng, n, height, width, scale)
    extent = np.array([width, height, width, height]) / scale
    boxes[3] = [0.3, 0.2, 1.0, 1.0] * extent  # to the corner exactly
    boxes[4] = [0.5, 0.6, 1.2, 1.3] * extent  # past it
    boxes[5] = [0.1, 0.9, 0.6, 1.0] * extent  # a thin strip along the bottom row
    boxes[6] = [0.95, 0.1, 1.04, 0.7] * extent  # straddling the right edge
    return boxes.astype(np.float32)


@pytest.mark.parametrize("aligned,ratio,scale", [(False, 2, 0.5), (True, 0, 1.0), (False, 0, 1.0)])
def test_valid_hw_pools_as_the_unpadded_map(aligned, ratio, scale):
    rng = np.random.default_rng(12)
    padded, crops = padded_maps(rng)
    boxes = np.stack([edge_boxes(rng, 9, h, w, scale) for h, w in EXTENTS])
    options = dict(spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)

    def pool(f, b, valid_hw):
        return roi_align(f, b, (3, 2), valid_hw=valid_hw, **options)

    out, vjp = jax.vjp(jax.jit(pool), padded, boxes, EXTENTS)
    cot = rng.standard_normal(out.shape).astype(np.float32)
    feature_grad, box_grad, _ = vjp(cot)
    assert np.abs(np.asarray(feature_grad)[:, H:]).max() == 0  # The padding is never read.
    for b, crop in enumerate(crops):
        args = (boxes[b], [0] * 9, (3, 2), scale, ratio, aligned)
        expected = roi_align_loop(crop[None], *args)
        np.testing.assert_allclose(out[b], expected, atol=2e-6)
        # The same values and gradients as roi_align on the unpadded map.
        want, want_vjp = jax.vjp(lambda f, bx: roi_align(f, bx, (3, 2), **options), crop, boxes[b])
        np.testing.assert_allclose(out[b], want, atol=1e-6)
        want_feature_grad, want_box_grad = want_vjp(cot[b])
        h, w = EXTENTS[b]
        grad = np.asarray(feature_grad[b])
        np.testing.assert_allclose(grad[:h, :w], want_feature_grad, atol=1e-5)
        assert np.abs(grad[h:]).max(initial=0) == 0 and np.abs(grad[:, w:]).max(initial=0) == 0
        np.testing.assert_allclose(
            grad[:h, :w], roi_align_loop_vjp((1, h, w, C), *args, cot[b])[0], atol=1e-5
        )
        np.testing.assert_allclose(box_grad[b], want_box_grad, atol=1e-4, rtol=1e-4)
    # Without valid_hw the edge boxes read the padding.
    assert not np.allclose(roi_align(padded, boxes, (3, 2), **options), out, atol=1e-3)


def test_valid_hw_in_every_form_under_vmap_and_jit():
    rng = np.random.default_rng(13)
    padded, _ = padded_maps(rng)
    boxes = np.stack([edge_boxes(rng, 9, h, w, 1.0) for h, w in EXTENTS])
    batched = roi_align_jit(padded, boxes, 2, valid_hw=EXTENTS)
    single = [roi_align(padded[b], boxes[b], 2, valid_hw=EXTENTS[b]) for b in range(2)]
    vmapped = jax.jit(jax.vmap(lambda f, b, v: roi_align(f, b, 2, valid_hw=v)))(
        padded, boxes, EXTENTS
    )
    order = rng.permutation(18)
    image = np.repeat(np.arange(2), 9)[order].astype(np.int32)
    flat = roi_align_jit(
        padded, boxes.reshape(-1, 4)[order], 2, box_indices=image, valid_hw=EXTENTS
    )
    expected = np.concatenate(
        [roi_align_jit(padded[b, :h, :w], boxes[b], 2) for b, (h, w) in enumerate(EXTENTS)]
    )
    np.testing.assert_allclose(batched.reshape(expected.shape), expected, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(single), expected, atol=1e-6)
    np.testing.assert_allclose(vmapped.reshape(expected.shape), expected, atol=1e-6)
    np.testing.assert_allclose(flat, expected[order], atol=1e-6)
    # The whole map, or more (clamped to it), is no valid_hw at all.
    whole = roi_align_jit(padded, boxes, 2)
    for valid_hw in ([[PAD_H, PAD_W]] * 2, [[PAD_H + 5, 99]] * 2):
        np.testing.assert_array_equal(roi_align_jit(padded, boxes, 2, valid_hw=valid_hw), whole)


def test_valid_hw_gradients_float64():
    rng = np.random.default_rng(14)
    with jax.enable_x64(True):
        features = jnp.asarray(rng.standard_normal((9, 10, 2)))
        # Crossing the bottom-right corner of a 6 x 8 extent, samples off integer rows.
        boxes = jnp.asarray([[4.13, 3.27, 9.41, 7.38], [0.31, 4.42, 5.13, 6.77]])

        def pool(f, b):
            return roi_align(f, b, (2, 3), sampling_ratio=2, aligned=False, valid_hw=(6, 8))

        check_grads(jax.jit(pool), (features, boxes), order=1, modes=["rev"], eps=1e-6)


def test_valid_hw_bad_shapes_raise():
    features, boxes = jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"valid_hw must have shape \(2, 2\), got \(2,\)"):
        roi_align(features, boxes, 2, valid_hw=np.array([4, 4]))
    with pytest.raises(TypeError, match="valid_hw must be integers"):
        roi_align(features, boxes, 2, valid_hw=np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(2,\), got \(1, 2\)"):
        roi_align(features[0], boxes[0], 2, valid_hw=np.array([[4, 4]]))
    maps = [jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 4, 4, 1))]
    with pytest.raises(ValueError, match=r"\(2, 2\), got \(1, 2\)"):
        multilevel_roi_align(maps, boxes, 2, strides=(4, 8), valid_hw=np.array([[32, 32]]))


def test_valid_hw_matches_torchvision_on_the_unpadded_map():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    rng = np.random.default_rng(15)
    padded, crops = padded_maps(rng)
    for aligned, ratio, scale, output_size in CASES[:4]:
        boxes = np.stack([edge_boxes(rng, 9, h, w, scale) for h, w in EXTENTS])
        options = dict(spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
        out = roi_align_jit(padded, boxes, output_size, valid_hw=EXTENTS, **options)
        for b, crop in enumerate(crops):
            crop_t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
            crop_t.requires_grad_(True)
            rois = torch.cat([torch.zeros(9, 1), torch.from_numpy(boxes[b])], dim=1)
            ref = torchvision.ops.roi_align(crop_t, rois, output_size, scale, ratio, aligned)
            np.testing.assert_allclose(out[b], ref.detach().permute(0, 2, 3, 1).numpy(), atol=2e-6)
            if (aligned, ratio) != (False, 2):
                continue
            # torchvision's MultiScaleRoIAlign setting: feature gradients too.
            cot = rng.standard_normal(out[b].shape).astype(np.float32)
            (grad_t,) = torch.autograd.grad(ref, crop_t, torch.from_numpy(cot).permute(0, 3, 1, 2))
            grad = jax.grad(
                lambda f, b=b, bx=boxes, cot=cot, size=output_size, options=options: jnp.vdot(
                    roi_align_jit(f, bx, size, valid_hw=EXTENTS, **options)[b], cot
                )
            )(padded)
            h, w = EXTENTS[b]
            want = grad_t[0].permute(1, 2, 0).numpy()
            np.testing.assert_allclose(grad[b, :h, :w], want, atol=1e-5)
            assert np.abs(np.asarray(grad[b])).sum() == pytest.approx(np.abs(want).sum(), 1e-5)


def test_multilevel_valid_hw_matches_torchvision_on_the_unpadded_maps():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from collections import OrderedDict

    rng = np.random.default_rng(16)
    strides = (4, 8, 16, 32)
    canvas = 192
    # torchvision's padded batches of the two images (multiples of 32), on one canvas.
    image_hw = np.array([[128, 96], [96, 160]], np.int32)
    features = [
        rng.standard_normal((2, canvas // s, canvas // s, 2)).astype(np.float32) for s in strides
    ]
    boxes = []
    for h, w in image_hw:
        corner = rng.uniform(0, 0.9, (10, 2)) * [w, h]
        side = np.exp(rng.uniform(np.log(8), np.log(180), (10, 2)))
        # Half of them reach the bottom or right edge of the image.
        far = np.minimum(corner + side, [w, h])
        far[::2] = [w, h]
        boxes.append(np.concatenate([corner, far], -1))
    boxes = np.stack(boxes).astype(np.float32)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 3, sampling_ratio=2)
    kwargs = dict(strides=strides, sampling_ratio=2)
    out = multilevel_roi_align(features, boxes, 3, valid_hw=image_hw, **kwargs)
    dense = multilevel_roi_align_dense(features, boxes, 3, valid_hw=image_hw, **kwargs)
    np.testing.assert_allclose(dense, out, atol=1e-5)
    for b, (h, w) in enumerate(image_hw):
        crops = [f[b : b + 1, : h // s, : w // s] for f, s in zip(features, strides, strict=True)]
        maps = OrderedDict(
            (str(i), torch.from_numpy(np.ascontiguousarray(f)).permute(0, 3, 1, 2))
            for i, f in enumerate(crops)
        )
        ref = pooler(maps, [torch.from_numpy(boxes[b])], [(int(h), int(w))])
        np.testing.assert_allclose(out[b], ref.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)
        # ... which is multilevel_roi_align on those maps.
        unpadded = multilevel_roi_align(crops, boxes[b : b + 1], 3, **kwargs)
        np.testing.assert_allclose(out[b], unpadded[0], atol=1e-6)
    # On the padded maps without valid_hw, boxes at the image edge read the padding.
    assert not np.allclose(multilevel_roi_align(features, boxes, 3, **kwargs), out, atol=1e-3)
