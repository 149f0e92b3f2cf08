"""Tests for jfcnn.ops.roi_pool: a slow loop reference written from the definition,
torchvision.ops.roi_pool (values and feature gradients), the three input forms,
jit / vmap, and the argument checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jfcnn.ops import fpn_levels, multilevel_roi_pool, roi_pool

roi_pool_jit = jax.jit(roi_pool, static_argnames=("output_size",))
FLT_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------
# Reference: torchvision's CPU kernel, one pixel at a time, float32 geometry.


def c_round(v):
    """C's round(): halves away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def reference_roi_pool(features, rois, output_size, spatial_scale):
    """`features (B, H, W, C)`, `rois (K, 5)` (image, x1, y1, x2, y2).

    Returns `(out (K, PH, PW, C), argmax (K, PH, PW, C))` with argmax the
    flat `h * W + w` index of the winning pixel, -1 where none.
    """
    features = np.asarray(features)
    _, height, width, channels = features.shape
    ph_count, pw_count = output_size
    f32 = np.float32
    out = np.zeros((len(rois), ph_count, pw_count, channels), features.dtype)
    arg = -np.ones(out.shape, np.int64)
    for k, (image, *box) in enumerate(np.asarray(rois, np.float32)):
        x1, y1, x2, y2 = (c_round(float(f32(v) * f32(spatial_scale))) for v in box)
        roi_w, roi_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        bin_h, bin_w = f32(roi_h) / f32(ph_count), f32(roi_w) / f32(pw_count)
        for ph in range(ph_count):
            for pw in range(pw_count):
                h_lo = min(max(math.floor(f32(ph) * bin_h) + y1, 0), height)
                h_hi = min(max(math.ceil(f32(ph + 1) * bin_h) + y1, 0), height)
                w_lo = min(max(math.floor(f32(pw) * bin_w) + x1, 0), width)
                w_hi = min(max(math.ceil(f32(pw + 1) * bin_w) + x1, 0), width)
                empty = h_hi <= h_lo or w_hi <= w_lo
                for c in range(channels):
                    best, where = (0.0 if empty else -FLT_MAX), -1
                    for h in range(h_lo, h_hi):
                        for w in range(w_lo, w_hi):
                            value = features[int(image), h, w, c]
                            if value > best:
                                best, where = value, h * width + w
                    out[k, ph, pw, c], arg[k, ph, pw, c] = best, where
    return out, arg


def reference_grad(features, rois, argmax, cotangent):
    """Scatter-add of `cotangent` to each bin's argmax pixel."""
    grad = np.zeros_like(np.asarray(features, np.float64))
    b, h, w, c = grad.shape
    for k, image in enumerate(np.asarray(rois)[:, 0].astype(int)):
        for index in np.ndindex(*argmax.shape[1:]):
            flat = argmax[(k, *index)]
            if flat >= 0:
                grad[image, flat // w, flat % w, index[-1]] += cotangent[(k, *index)]
    return grad


def flat_rois(boxes, box_indices):
    return np.concatenate([np.asarray(box_indices, np.float32)[:, None], boxes], axis=1)


# Boxes (image coordinates) that cover the corner cases: inside, partly and
# wholly outside, tiny (a point, one pixel), reversed, huge, and coordinates
# that scale to exact halves (round away from zero).
EDGE_BOXES = np.array(
    [
        [0.0, 0.0, 7.0, 5.0],
        [2.3, 1.7, 9.9, 11.2],
        [-6.0, -4.0, 3.0, 2.0],  # partly outside, top-left
        [8.0, 6.0, 40.0, 30.0],  # partly outside, bottom-right
        [-30.0, -20.0, -8.0, -3.0],  # wholly outside, top-left
        [30.0, 25.0, 60.0, 40.0],  # wholly outside, bottom-right
        [4.0, 3.0, 4.0, 3.0],  # a point
        [4.5, 2.5, 5.5, 3.5],  # halves
        [-2.5, -0.5, 0.5, 1.5],  # negative halves
        [6.0, 5.0, 2.0, 1.0],  # reversed
        [-1e5, -1e5, 1e5, 1e5],  # huge
        [0.0, 0.0, 1e4, 3.0],  # huge in one direction
    ],
    np.float32,
)


def edge_case(spatial_scale, height=9, width=11, channels=3, batch=2, seed=0):
    """Features, boxes scaled so the corner cases land on the map, image indices."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    boxes = EDGE_BOXES / spatial_scale
    indices = np.arange(len(boxes)) % batch
    return features, boxes.astype(np.float32), indices


# ----------------------------------------------------------------------------
# Golden values by hand.


def test_hand_computed_values():
    features = jnp.arange(16.0).reshape(4, 4, 1)  # F[y, x] = 4 y + x
    # x 0..3 (round(2.6) = 3), y 0..1 (round(1.4) = 1): bins rows {0}, {1}, columns {0,1}, {2,3}.
    out = roi_pool(features, jnp.array([[0.0, 0.0, 2.6, 1.4]]), 2)
    np.testing.assert_array_equal(out[0, :, :, 0], [[1.0, 3.0], [5.0, 7.0]])
    # A 3x3 box in 2x2 bins: bin size 1.5, rows {0,1}, {1,2}: the middle row is shared.
    out = roi_pool(features, jnp.array([[1.0, 1.0, 3.0, 3.0]]), 2)
    np.testing.assert_array_equal(out[0, :, :, 0], [[10.0, 11.0], [14.0, 15.0]])
    # 0.5 rounds to 1, -0.5 to -1 (not to even 0): box pixels x -1..1 clipped to 0..1.
    out = roi_pool(features, jnp.array([[-0.5, 0.5, 0.5, 0.5]]), 1)
    assert float(out[0, 0, 0, 0]) == 5.0
    # Wholly outside the map: every bin is empty and gives 0.
    out = roi_pool(features - 100.0, jnp.array([[5.0, 5.0, 9.0, 9.0]]), 2)
    np.testing.assert_array_equal(out, np.zeros((1, 2, 2, 1)))


def test_gradient_goes_to_the_first_maximum():
    features = jnp.zeros((3, 3, 1)).at[2, 0, 0].set(1.0).at[2, 2, 0].set(1.0)
    grad = jax.grad(lambda f: roi_pool(f, jnp.array([[0.0, 0.0, 2.0, 2.0]]), 1).sum())(features)
    expected = np.zeros((3, 3, 1))
    expected[2, 0, 0] = 1.0  # Row-major first of the two maxima.
    np.testing.assert_array_equal(grad, expected)
    # All zeros (a ReLU map): the top-left pixel of each bin takes the whole gradient;
    # overlapping bins that share it add up.
    grad = jax.grad(lambda f: roi_pool(f, jnp.array([[0.0, 0.0, 2.0, 2.0]]), 2).sum())(
        jnp.zeros((3, 3, 1))
    )
    np.testing.assert_array_equal(grad[:, :, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


# ----------------------------------------------------------------------------
# Against the loop reference, all three forms.


@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 1.0 / 16])
@pytest.mark.parametrize("output_size", [(2, 2), (3, 4), (7, 7)])
def test_matches_loop_reference_all_forms(spatial_scale, output_size):
    features, boxes, indices = edge_case(spatial_scale)
    expected, _ = reference_roi_pool(
        features, flat_rois(boxes, indices), output_size, spatial_scale
    )

    flat = roi_pool_jit(
        features, boxes, output_size, spatial_scale=spatial_scale, box_indices=indices
    )
    np.testing.assert_array_equal(flat, expected)

    single = roi_pool_jit(features[1], boxes, output_size, spatial_scale=spatial_scale)
    ones = np.ones(len(boxes))
    expected_single, _ = reference_roi_pool(
        features, flat_rois(boxes, ones), output_size, spatial_scale
    )
    np.testing.assert_array_equal(single, expected_single)

    per_image = np.stack([boxes, boxes[::-1]])
    batched = roi_pool_jit(features, per_image, output_size, spatial_scale=spatial_scale)
    expected_batched, _ = reference_roi_pool(
        features,
        flat_rois(per_image.reshape(-1, 4), np.repeat([0, 1], len(boxes))),
        output_size,
        spatial_scale,
    )
    np.testing.assert_array_equal(batched, expected_batched.reshape(2, len(boxes), *output_size, 3))


def test_gradient_matches_loop_reference_with_ties():
    # Few distinct values: many ties, so the argmax rule decides the gradient.
    rng = np.random.default_rng(1)
    features = rng.integers(0, 3, size=(2, 9, 11, 2)).astype(np.float32)
    _, boxes, indices = edge_case(0.5)
    rois = flat_rois(boxes, indices)
    _, argmax = reference_roi_pool(features, rois, (3, 3), 0.5)
    cotangent = rng.normal(size=(len(boxes), 3, 3, 2)).astype(np.float32)
    grad = jax.grad(
        lambda f: jnp.sum(roi_pool(f, boxes, 3, spatial_scale=0.5, box_indices=indices) * cotangent)
    )(features)
    np.testing.assert_allclose(
        grad, reference_grad(features, rois, argmax, cotangent), rtol=1e-6, atol=1e-6
    )


def test_numerical_gradient_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        features = jnp.asarray(rng.normal(size=(1, 8, 8, 2)))  # Distinct values: no ties.
        boxes = jnp.asarray([[[0.0, 0.0, 5.0, 6.0], [-2.0, 3.0, 9.0, 9.0]]])

        def pool(f):
            return roi_pool(f, boxes, 3)

        assert pool(features).dtype == jnp.float64
        check_grads(pool, (features,), order=1, modes=["rev"], eps=1e-6)


def test_nan_and_minus_inf_features():
    features = np.zeros((2, 2, 1), np.float32)
    features[0, 0, 0] = np.nan
    features[1, 1, 0] = -1.0
    out = roi_pool(jnp.asarray(features), jnp.array([[0.0, 0.0, 1.0, 1.0]]), 1)
    assert float(out[0, 0, 0, 0]) == 0.0  # NaN is skipped.
    features = np.full((2, 2, 1), -np.inf, np.float32)
    out = roi_pool(jnp.asarray(features), jnp.array([[0.0, 0.0, 1.0, 1.0]]), 1)
    assert float(out[0, 0, 0, 0]) == -FLT_MAX  # torchvision's start value survives.


def test_bfloat16_keeps_dtype_and_values():
    features, boxes, _ = edge_case(1.0)
    features = features[0].astype(jnp.bfloat16)
    out = roi_pool(features, boxes, 3)
    assert out.dtype == jnp.bfloat16
    expected = roi_pool(features.astype(np.float32), boxes, 3)
    np.testing.assert_array_equal(np.asarray(out, np.float32), expected)


# ----------------------------------------------------------------------------
# Against torchvision.ops.roi_pool (NCHW): values and feature gradients.


def _torchvision_pool(features, rois, output_size, spatial_scale, cotangent):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    x = torch.tensor(np.transpose(features, (0, 3, 1, 2)), requires_grad=True)
    out = torchvision.ops.roi_pool(x, torch.tensor(rois), output_size, spatial_scale)
    out.backward(torch.tensor(np.transpose(cotangent, (0, 3, 1, 2))))
    return (
        np.transpose(out.detach().numpy(), (0, 2, 3, 1)),
        np.transpose(x.grad.numpy(), (0, 2, 3, 1)),
    )


@pytest.mark.parametrize("spatial_scale", [1.0, 0.25, 1.0 / 16])
@pytest.mark.parametrize("integer_features", [False, True])
def test_matches_torchvision_all_forms(spatial_scale, integer_features):
    features, boxes, indices = edge_case(spatial_scale, seed=3)
    if integer_features:  # Ties everywhere: the argmax rules must agree.
        features = np.round(features).astype(np.float32)
    output_size = (3, 4)
    rng = np.random.default_rng(4)
    cotangent = rng.normal(size=(len(boxes), *output_size, 3)).astype(np.float32)
    rois = flat_rois(boxes, indices)
    expected, expected_grad = _torchvision_pool(
        features, rois, output_size, spatial_scale, cotangent
    )

    def flat(f):
        return roi_pool(f, boxes, output_size, spatial_scale=spatial_scale, box_indices=indices)

    out, vjp = jax.vjp(flat, jnp.asarray(features))
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], expected_grad, atol=1e-6)

    # Single image: torchvision with every box on image 0.
    expected, expected_grad = _torchvision_pool(
        features[:1], flat_rois(boxes, 0 * indices), output_size, spatial_scale, cotangent
    )
    out, vjp = jax.vjp(
        lambda f: roi_pool(f, boxes, output_size, spatial_scale=spatial_scale),
        jnp.asarray(features[0]),
    )
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], expected_grad[0], atol=1e-6)

    # Per-image boxes (B, N, 4): image 0 gets the even boxes, image 1 the odd ones.
    per_image = np.stack([boxes[0::2], boxes[1::2]])
    order = np.concatenate([np.arange(0, len(boxes), 2), np.arange(1, len(boxes), 2)])
    expected, expected_grad = _torchvision_pool(
        features, rois[order], output_size, spatial_scale, cotangent[order]
    )
    out, vjp = jax.vjp(
        lambda f: roi_pool(f, per_image, output_size, spatial_scale=spatial_scale),
        jnp.asarray(features),
    )
    np.testing.assert_array_equal(out.reshape(expected.shape), expected)
    grad = vjp(jnp.asarray(cotangent[order]).reshape(out.shape))[0]
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_matches_torchvision_random_boxes():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(3, 20, 25, 4)).astype(np.float32)
    xy = rng.uniform(-100, 500, size=(40, 2, 2)).astype(np.float32)
    boxes = np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1)
    indices = rng.integers(0, 3, size=40)
    cotangent = rng.normal(size=(40, 7, 7, 4)).astype(np.float32)
    expected, expected_grad = _torchvision_pool(
        features, flat_rois(boxes, indices), (7, 7), 1.0 / 16, cotangent
    )
    out, vjp = jax.vjp(
        lambda f: roi_pool(f, boxes, 7, spatial_scale=1.0 / 16, box_indices=indices),
        jnp.asarray(features),
    )
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], expected_grad, atol=1e-5)


# ----------------------------------------------------------------------------
# jit, vmap, traced arguments.


def test_jit_with_traced_scale_and_vmap_over_images():
    features, boxes, indices = edge_case(0.5)
    expected = roi_pool(features, boxes, 3, spatial_scale=0.5, box_indices=indices)
    traced = jax.jit(lambda f, b, s, i: roi_pool(f, b, 3, spatial_scale=s, box_indices=i))
    np.testing.assert_array_equal(traced(features, boxes, 0.5, indices), expected)

    per_image = np.stack([boxes, boxes[::-1]])
    batched = roi_pool(features, per_image, 3, spatial_scale=0.5)
    mapped = jax.vmap(lambda f, b: roi_pool(f, b, 3, spatial_scale=0.5))(features, per_image)
    np.testing.assert_array_equal(mapped, batched)
    np.testing.assert_array_equal(batched[0], roi_pool(features[0], boxes, 3, spatial_scale=0.5))
    single = roi_pool(features[1], boxes[::-1], 3, spatial_scale=0.5)
    np.testing.assert_array_equal(batched[1], single)
    # vmap over the flat form's boxes gives the same as one call.
    mapped_flat = jax.vmap(
        lambda b, i: roi_pool(features, b[None], 3, spatial_scale=0.5, box_indices=i[None])[0]
    )(boxes, indices)
    np.testing.assert_array_equal(mapped_flat, expected)


def test_flat_form_clamps_image_indices():
    features, boxes, _ = edge_case(1.0)
    out = roi_pool(features, boxes[:2], 2, box_indices=np.array([5, -3]))
    expected = roi_pool(features, boxes[:2], 2, box_indices=np.array([1, 0]))
    np.testing.assert_array_equal(out, expected)


# ----------------------------------------------------------------------------
# multilevel_roi_pool: each box from its FPN level.


def test_multilevel_pools_each_box_from_its_level():
    rng = np.random.default_rng(6)
    strides = (4, 8, 16)
    maps = [rng.normal(size=(2, 64 // s, 64 // s, 3)).astype(np.float32) for s in strides]
    boxes = np.array(
        [
            [[0, 0, 10, 10], [0, 0, 60, 60], [3, 5, 200, 190]],
            [[10, 20, 30, 50], [-8, -8, 500, 500], [1, 1, 2, 2]],
        ],
        np.float32,
    )
    out = multilevel_roi_pool(maps, boxes, 2, strides=strides)
    levels = np.asarray(fpn_levels(jnp.asarray(boxes), k_min=2, k_max=4))
    assert set(levels.ravel()) == {0, 1, 2}  # The case covers every level.
    for b in range(2):
        for n in range(3):
            level = levels[b, n]
            rois = flat_rois(boxes[b, n][None], [b])
            expected, _ = reference_roi_pool(maps[level], rois, (2, 2), 1.0 / strides[level])
            np.testing.assert_array_equal(out[b, n], expected[0])


# ----------------------------------------------------------------------------
# Argument checks.


@pytest.mark.parametrize(
    "features_shape, boxes_shape, indices_shape, match",
    [
        ((4, 4, 1), (2, 5), None, r"end in a dimension of 4.*\(2, 5\)"),
        ((4, 4, 1), (1, 2, 4), None, r"features \(H, W, C\) need boxes \(N, 4\).*\(1, 2, 4\)"),
        ((2, 4, 4, 1), (3, 1, 4), None, r"same B.*\(3, 1, 4\)"),
        ((2, 4, 4, 1), (3, 4), (2,), r"boxes \(K, 4\) and box_indices \(K,\).*\(3, 4\).*\(2,\)"),
        ((4, 4, 1), (3, 4), (3,), r"box_indices is only for batched features.*\(4, 4, 1\)"),
        ((4, 4), (3, 4), None, r"\(H, W, C\) or \(B, H, W, C\).*\(4, 4\)"),
        ((0, 4, 1), (3, 4), None, r"non-empty spatial extent.*\(0, 4, 1\)"),
    ],
)
def test_bad_shapes_raise(features_shape, boxes_shape, indices_shape, match):
    indices = None if indices_shape is None else np.zeros(indices_shape, np.int32)
    with pytest.raises(ValueError, match=match):
        roi_pool(
            np.zeros(features_shape, np.float32),
            np.zeros(boxes_shape, np.float32),
            2,
            box_indices=indices,
        )


def test_bad_arguments_raise():
    features, boxes = np.zeros((4, 4, 1), np.float32), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="output_size must be >= 1, got 0"):
        roi_pool(features, boxes, 0)
    with pytest.raises(ValueError, match="output_size must be an int or a pair"):
        roi_pool(features, boxes, (1, 2, 3))
    with pytest.raises(TypeError, match="features must be floating point"):
        roi_pool(features.astype(np.int32), boxes, 2)
    with pytest.raises(TypeError, match="boxes must be floating point"):
        roi_pool(features, boxes.astype(np.int32), 2)
    with pytest.raises(TypeError, match="box_indices must be integers"):
        roi_pool(features[None], boxes, 2, box_indices=np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="strides must double"):
        multilevel_roi_pool([features[None], features[None]], boxes[None], 2, strides=(4, 4))
