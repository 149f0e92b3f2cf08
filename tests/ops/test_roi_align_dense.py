"""Tests for the dense ROI Align forms: the same values as the gather forms.

The gather forms (`roi_align`, `multilevel_roi_align`) are checked against a
loop reference and torchvision in test_roi_align.py; here the dense forms are
checked against them, values and feature gradients, plus a hand-computed value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.ops import multilevel_roi_align, multilevel_roi_align_dense, roi_align, roi_align_dense


def random_boxes(rng, n, low, high, min_wh=1.0, max_wh=40.0):
    xy = rng.uniform(low, high, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_golden_ramp():
    # F[y, x] = 4 y + x is linear, so each bin's mean is F at the bin's centre:
    # the 2x2 bins of the box [0.5, 2.5]^2 (aligned: [0, 2]^2 in pixel
    # coordinates) have their single samples at (0.5, 0.5), (0.5, 1.5), ...
    features = jnp.arange(16.0).reshape(1, 4, 4, 1)
    boxes = jnp.array([[[0.5, 0.5, 2.5, 2.5]]])
    out = roi_align_dense(features, boxes, 2, sampling_ratio=1)
    assert out.shape == (1, 1, 2, 2, 1) and out.dtype == jnp.float32
    np.testing.assert_allclose(out[0, 0, :, :, 0], [[2.5, 3.5], [6.5, 7.5]], atol=1e-6)


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, True), (0, True), (1, False), (0, False)])
def test_roi_align_dense_equals_roi_align(sampling_ratio, aligned):
    rng = np.random.default_rng(sampling_ratio)
    features = jnp.asarray(rng.normal(size=(2, 16, 12, 3)), jnp.float32)
    # Boxes partly or wholly outside the map, tiny and large ones.
    boxes = jnp.asarray(random_boxes(rng, 40, -10, 60, 0.0, 40.0).reshape(2, 20, 4))
    kwargs = dict(spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned)

    @jax.jit
    def values_and_grads(features):
        def pool_and_grad(fn):
            pool = functools.partial(fn, boxes=boxes, output_size=(5, 4), **kwargs)
            return pool(features), jax.grad(lambda f: jnp.sum(jnp.sin(pool(f))))(features)

        return pool_and_grad(roi_align_dense), pool_and_grad(roi_align)

    (got, got_grad), (want, want_grad) = values_and_grads(features)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-4)


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, True), (2, False), (0, False)])
def test_multilevel_roi_align_dense_equals_multilevel_roi_align(sampling_ratio, aligned):
    rng = np.random.default_rng(0)
    maps = [jnp.asarray(rng.normal(size=(2, 32 >> i, 32 >> i, 3)), jnp.float32) for i in range(3)]
    boxes = jnp.asarray(random_boxes(rng, 30, -5, 110, 1.0, 100.0).reshape(2, 15, 4))
    kwargs = dict(
        strides=(4, 8, 16), sampling_ratio=sampling_ratio, aligned=aligned, canonical_scale=56.0
    )
    pool = jax.jit(
        lambda maps, boxes: (
            multilevel_roi_align_dense(maps, boxes, 7, **kwargs),
            multilevel_roi_align(maps, boxes, 7, **kwargs),
        )
    )
    got, want = pool(maps, boxes)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (0, True)])
def test_roi_align_dense_with_valid_hw_equals_roi_align_and_the_unpadded_map(
    sampling_ratio, aligned
):
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.normal(size=(2, 16, 12, 3)), jnp.float32)
    valid_hw = np.array([[9, 12], [16, 7]], np.int32)  # In feature pixels.
    # Image coordinates (stride 4), many boxes crossing the bottom or right edge.
    boxes = jnp.asarray(random_boxes(rng, 40, 10, 60, 1.0, 40.0).reshape(2, 20, 4))
    kwargs = dict(spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned)

    @jax.jit
    def values_and_grads(features):
        def pool_and_grad(fn):
            pool = functools.partial(
                fn, boxes=boxes, output_size=(5, 4), valid_hw=valid_hw, **kwargs
            )
            return pool(features), jax.grad(lambda f: jnp.sum(jnp.sin(pool(f))))(features)

        return pool_and_grad(roi_align_dense), pool_and_grad(roi_align)

    (got, got_grad), (want, want_grad) = values_and_grads(features)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-4)
    for b, (h, w) in enumerate(valid_hw):
        unpadded = roi_align_dense(features[b : b + 1, :h, :w], boxes[b : b + 1], (5, 4), **kwargs)
        np.testing.assert_allclose(got[b], unpadded[0], atol=1e-5)
        assert np.abs(np.asarray(got_grad[b, h:])).sum() == np.abs(got_grad[b, :, w:]).sum() == 0
    assert not np.allclose(roi_align_dense(features, boxes, (5, 4), **kwargs), got, atol=1e-3)


def test_bad_inputs_raise():
    features, boxes = jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match=r"\(4, 4, 1\)"):
        roi_align_dense(features[0], boxes, 2)
    with pytest.raises(ValueError, match=r"\(2, 2, 4\)"):
        roi_align_dense(features, jnp.zeros((2, 2, 4)), 2)
    with pytest.raises(ValueError, match="output_size"):
        roi_align_dense(features, boxes, (2, 2, 2))
    with pytest.raises(ValueError, match="output_size must be >= 1"):
        roi_align_dense(features, boxes, 0)
    maps = [jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 4, 4, 2))]
    with pytest.raises(ValueError, match=r"\(4, 16\)"):
        multilevel_roi_align_dense(maps, boxes, 2, strides=(4, 16))
    with pytest.raises(ValueError, match=r"valid_hw must have shape \(1, 2\), got \(2,\)"):
        roi_align_dense(features, boxes, 2, valid_hw=np.array([4, 4]))
    with pytest.raises(TypeError, match="valid_hw must be integers"):
        multilevel_roi_align_dense(maps, boxes, 2, strides=(4, 8), valid_hw=np.ones((1, 2)))
