"""ROI Align on bad input: non-finite boxes and out-of-range `box_indices`.

A box with a NaN or infinite coordinate must pool zeros with zero gradients
(for the features and the box) in every form, and leave the other boxes'
values and gradients bit for bit as they are. `box_indices` outside `[0, B)`
are clamped by default (`index_mode="clip"`), pool zeros with
`index_mode="fill"`, and raise with `index_mode="raise"` where they are
concrete.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.ops import multilevel_roi_align, multilevel_roi_align_dense, roi_align, roi_align_dense

INF, NAN = np.inf, np.nan
B, N, H, W, C = 2, 6, 12, 10, 3
STRIDE = 4  # image pixels per pixel of the finest map

# (B, N, 4) boxes in image coordinates; `BAD` marks the non-finite ones.
BOXES = np.array(
    [
        [
            [3.1, 5.2, 30.7, 22.4],
            [0.0, 0.0, INF, 16.0],
            [-6.3, 10.9, 12.2, 44.1],
            [NAN, 0.0, 12.0, 16.0],
            [20.5, 1.7, 21.3, 3.9],
            [-INF, 0.0, 12.0, 16.0],
        ],
        [
            [0.0, 0.0, -INF, 16.0],  # aligned=False would grow this to 1x1 pixel
            [7.7, 3.3, 39.5, 47.1],
            [INF, INF, INF, INF],
            [-3.0, -2.0, 9.4, 8.8],
            [1.0, NAN, NAN, 2.0],
            [15.0, 15.0, 15.0, 15.0],  # empty, finite
        ],
    ],
    np.float32,
)
BAD = ~np.all(np.isfinite(BOXES), axis=-1)


def _single(f, b, **kw):
    return jnp.stack([roi_align(f[i], b[i], 2, **kw) for i in range(B)])


def _flat(f, b, **kw):
    indices = jnp.repeat(jnp.arange(B, dtype=jnp.int32), N)
    return roi_align(f, b.reshape(-1, 4), 2, box_indices=indices, **kw).reshape(B, N, 2, 2, C)


def _multilevel(f, b, dense=False, **kw):
    coarse = f[:, ::2, ::2] * 0.5 + 1.0
    fn = multilevel_roi_align_dense if dense else multilevel_roi_align
    return fn([f, coarse], b, 2, strides=(STRIDE, 2 * STRIDE), **kw)


# Every form as `(B, H, W, C), (B, N, 4) -> (B, N, 2, 2, C)`.
FORMS = {
    "single": _single,
    "batched": lambda f, b, **kw: roi_align(f, b, 2, **kw),
    "flat": _flat,
    "vmap": lambda f, b, **kw: jax.vmap(lambda f, b: roi_align(f, b, 2, **kw))(f, b),
    "dense": lambda f, b, **kw: roi_align_dense(f, b, 2, **kw),
    "multilevel": _multilevel,
    "multilevel_dense": functools.partial(_multilevel, dense=True),
}
SINGLE_MAP = {"single", "batched", "flat", "vmap", "dense"}


@pytest.mark.parametrize("ratio,aligned", [(2, True), (0, False), (0, True), (2, False)])
@pytest.mark.parametrize("form", list(FORMS))
def test_non_finite_boxes_pool_zeros_with_zero_gradients(form, ratio, aligned):
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.float32)
    kw = dict(sampling_ratio=ratio, aligned=aligned)
    if form in SINGLE_MAP:
        kw["spatial_scale"] = 1.0 / STRIDE
    pool = jax.jit(lambda f, b: FORMS[form](f, b, **kw))
    # The same boxes with the bad ones replaced by an empty finite box, which
    # cannot change the others' patch layout: the finite boxes must keep their
    # values and gradients bit for bit.
    clean = np.where(BAD[..., None], 0.0, BOXES).astype(np.float32)

    out, vjp = jax.vjp(pool, features, jnp.asarray(BOXES))
    clean_out, clean_vjp = jax.vjp(pool, features, jnp.asarray(clean))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[BAD], 0.0)
    np.testing.assert_array_equal(out[~BAD], clean_out[~BAD])
    assert np.abs(out[~BAD]).sum() > 0

    # A cotangent on the bad boxes only reaches nothing.
    cot = rng.standard_normal(out.shape).astype(np.float32)
    d_features, d_boxes = vjp(cot * BAD[..., None, None, None])
    np.testing.assert_array_equal(d_features, 0.0)
    np.testing.assert_array_equal(d_boxes, 0.0)
    # A cotangent on every box: the bad ones add nothing, the good ones the same.
    d_features, d_boxes = vjp(cot)
    clean_features, clean_boxes = clean_vjp(cot * ~BAD[..., None, None, None])
    assert np.all(np.isfinite(d_features)) and np.all(np.isfinite(d_boxes))
    np.testing.assert_array_equal(d_boxes[BAD], 0.0)
    np.testing.assert_array_equal(d_features, clean_features)
    np.testing.assert_array_equal(d_boxes, clean_boxes)


def test_one_inf_box_with_jax_grad():
    # The case: one box with x2 = inf on an (1, 8, 8, 2) map.
    features = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 8, 2)), jnp.float32)
    boxes = jnp.array([[0.0, 0.0, INF, 4.0]])
    indices = jnp.zeros(1, jnp.int32)

    def loss(f, b):
        return jnp.sum(roi_align(f, b, 2, box_indices=indices) ** 2)

    np.testing.assert_array_equal(roi_align(features, boxes, 2, box_indices=indices), 0.0)
    d_features, d_boxes = jax.grad(loss, argnums=(0, 1))(features, boxes)
    np.testing.assert_array_equal(d_features, 0.0)
    np.testing.assert_array_equal(d_boxes, 0.0)


# ----------------------------------------------------------------------------
# box_indices out of range.


def _indexed_inputs():
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.float32)
    boxes = jnp.asarray(BOXES[~BAD][:5])
    return features, boxes


def test_clip_is_the_default_and_reads_the_nearest_image():
    features, boxes = _indexed_inputs()
    out = roi_align(features, boxes, 2, box_indices=jnp.array([5, -3, 1, 0, 2]))
    clamped = roi_align(features, boxes, 2, box_indices=jnp.array([1, 0, 1, 0, 1]))
    np.testing.assert_array_equal(out, clamped)
    explicit = roi_align(
        features, boxes, 2, box_indices=jnp.array([5, -3, 1, 0, 2]), index_mode="clip"
    )
    np.testing.assert_array_equal(explicit, clamped)


@pytest.mark.parametrize("mode", ["fill", "raise"])
def test_fill_pools_zeros_for_out_of_range_indices(mode):
    features, boxes = _indexed_inputs()
    indices = jnp.array([0, 5, 1, -1, 2], jnp.int32)
    outside = np.array([False, True, False, True, True])

    # Traced indices (jit, vmap): "raise" cannot check them and fills.
    @jax.jit
    def pool(f, b, i):
        return roi_align(f, b, 2, box_indices=i, index_mode=mode)

    out, vjp = jax.vjp(lambda f, b: pool(f, b, indices), features, boxes)
    clip_out, clip_vjp = jax.vjp(
        lambda f, b: roi_align(f, b, 2, box_indices=indices), features, boxes
    )
    np.testing.assert_array_equal(out[outside], 0.0)
    np.testing.assert_array_equal(out[~outside], clip_out[~outside])
    assert np.abs(out[~outside]).sum() > 0
    cot = np.random.default_rng(3).standard_normal(out.shape).astype(np.float32)
    d_features, d_boxes = vjp(cot * outside[:, None, None, None])
    np.testing.assert_array_equal(d_features, 0.0)
    np.testing.assert_array_equal(d_boxes, 0.0)
    d_features, d_boxes = vjp(cot)
    clip_features, clip_boxes = clip_vjp(cot * ~outside[:, None, None, None])
    np.testing.assert_array_equal(d_features, clip_features)
    np.testing.assert_array_equal(d_boxes, clip_boxes)

    batched = jax.vmap(pool, in_axes=(None, None, 0))(features, boxes, jnp.stack([indices] * 2))
    np.testing.assert_array_equal(batched, jnp.stack([out] * 2))


def test_fill_without_jit_and_with_grad():
    features, boxes = _indexed_inputs()
    indices = jnp.array([0, 5, 1, -1, 2], jnp.int32)

    def loss(f, b):
        return jnp.sum(roi_align(f, b, 2, box_indices=indices, index_mode="fill")[1])

    out = roi_align(features, boxes, 2, box_indices=indices, index_mode="fill")
    np.testing.assert_array_equal(out[np.array([1, 3, 4])], 0.0)
    assert np.abs(out[np.array([0, 2])]).sum() > 0
    for g in jax.grad(loss, argnums=(0, 1))(features, boxes):
        np.testing.assert_array_equal(g, 0.0)


def test_raise_names_the_bad_index_and_the_batch_size():
    features, boxes = _indexed_inputs()
    with pytest.raises(ValueError, match=r"box_indices\[1\] = 5 .*batch of 2 images"):
        roi_align(features, boxes, 2, box_indices=np.array([0, 5, 1, -1, 2]), index_mode="raise")
    with pytest.raises(ValueError, match=r"box_indices\[0\] = -1 "):
        roi_align(features, boxes[:1], 2, box_indices=[-1], index_mode="raise")
    good = jnp.array([0, 1, 1, 0, 1])
    np.testing.assert_array_equal(
        roi_align(features, boxes, 2, box_indices=good, index_mode="raise"),
        roi_align(features, boxes, 2, box_indices=good),
    )


def test_bad_index_mode_raises():
    features, boxes = _indexed_inputs()
    with pytest.raises(ValueError, match=r"index_mode must be one of .*'wrap'"):
        roi_align(features, boxes, 2, box_indices=jnp.zeros(5, jnp.int32), index_mode="wrap")
