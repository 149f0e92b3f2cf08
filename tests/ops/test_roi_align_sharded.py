"""ROI Align in a ``jit`` data-parallel step: each device pools its own images.

XLA's partitioner cannot see that the gather kernels' reads (by computed image
index) stay within an image, so on a batch-sharded map it put all-gathers
inside the kernels' loops: a tiny Mask R-CNN step on 2 CPU devices took 100x
as long as on one. Under ``jax.set_mesh`` (as ``train.py``, evaluation and
prediction run their ``jit`` steps) the batched forms run in ``shard_map``
instead. These tests run in a subprocess with 4 CPU devices and check the
values and gradients against one device, and the compiled step for collectives.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import MANY_DEVICES, ROOT

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jfcnn.ops import multilevel_roi_align, roi_align
    from jfcnn.ops.detection import crop_mask_targets

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))  # As train.py makes it.
    rng = np.random.default_rng(0)
    b, n = 8, 6
    maps = [jnp.asarray(rng.normal(size=(b, 32 // s, 32 // s, 3)), jnp.float32) for s in (1, 2)]
    corner = rng.uniform(0, 20, (b, n, 2))
    boxes = jnp.asarray(np.concatenate([corner, corner + rng.uniform(2, 12, (b, n, 2))], -1),
                        jnp.float32)
    valid_hw = jnp.asarray(rng.integers(20, 33, (b, 2)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(b, n, 4, 4, 3)), jnp.float32)

    def pool(maps, boxes, valid_hw):
        single = roi_align(maps[0], boxes, 4, spatial_scale=1.0, sampling_ratio=2,
                           valid_hw=valid_hw)
        multi = multilevel_roi_align(maps, boxes * 3.0, 4, strides=(4, 8), valid_hw=valid_hw)
        return single, multi

    def loss(maps, boxes, valid_hw):
        single, multi = pool(maps, boxes, valid_hw)
        return jnp.sum(single * weights) + jnp.sum(multi * weights), (single, multi)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    reference = jax.device_get(step(maps, boxes, valid_hw))  # One device, no mesh.
    reference_pooled = reference[0][1]

    sharded = NamedSharding(mesh, P("data"))
    args = jax.device_put((maps, boxes, valid_hw), sharded)
    with jax.set_mesh(mesh):
        hlo = step.lower(*args).compile().as_text()
        got = jax.device_get(step(*args))
    hlo_no_mesh = step.lower(*args).compile().as_text()
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
    print("all-gathers with the mesh:", hlo.count("all-gather"))
    print("all-gathers without it:", hlo_no_mesh.count("all-gather"))

    # Mask targets: ROI Align of each box's own instance mask (flat, by image index).
    masks = jnp.asarray(rng.random((b, 3, 32, 32)) > 0.5, jnp.float32)
    gt_index = jnp.asarray(rng.integers(0, 3, (b, n)), jnp.int32)
    targets = jax.jit(lambda m, x, g: crop_mask_targets(m, x, g, 8))
    reference = targets(masks, boxes, gt_index)
    args = jax.device_put((masks, boxes, gt_index), sharded)
    with jax.set_mesh(mesh):
        hlo = targets.lower(*args).compile().as_text()
        np.testing.assert_array_equal(targets(*args), reference)
    print("mask-target all-gathers with the mesh:", hlo.count("all-gather"))

    # Under pmap each device already holds its own images: 4 a device on 2 devices
    # (a pmap axis of 2, which the 4 images would divide).
    per_device = lambda x: x.reshape(2, b // 2, *x.shape[1:])
    pooled = jax.pmap(pool, devices=jax.devices()[:2])(
        jax.tree.map(per_device, maps), per_device(boxes), per_device(valid_hw)
    )
    for a, r in zip(pooled, reference_pooled):
        np.testing.assert_allclose(a.reshape(r.shape), r, rtol=1e-5, atol=1e-5)
    print("pmap: ok")
    """
)


def test_batched_roi_align_runs_per_device_under_a_mesh():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**MANY_DEVICES, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    # Values and gradients equal one device's (checked in the script), and the maps
    # stay on their devices: no all-gather in the compiled step (the loss's sum over
    # the batch is the only collective).
    assert int(lines["all-gathers with the mesh"]) == 0, result.stdout
    # The premise: without the mesh, XLA gathers the maps across devices.
    assert int(lines["all-gathers without it"]) > 0, result.stdout
    assert int(lines["mask-target all-gathers with the mesh"]) == 0, result.stdout
    assert "pmap: ok" in result.stdout
