"""The NaN guard checks every leaf of the new state, and its message tells the truth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jfcnn import checkpoint as ckpt
from jfcnn import train
from jfcnn.train_state import TrainState


class _Task:
    """A one-parameter model whose batch statistic overflows while the loss stays finite."""

    def loss_fn(self, params, model_state, batch, example_keys):
        del example_keys
        loss = jnp.mean((params["w"] * batch["image"]) ** 2)
        # A running variance that overflows float32 (as batch norm's did at lr 1e6).
        var = model_state["batch_stats"]["var"] * 1e30 * batch["scale"][0]
        return loss, ({"batch_stats": {"var": var}}, {})


def _state() -> TrainState:
    params = {"w": jnp.ones(3)}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state={"batch_stats": {"var": jnp.full(3, 1e10)}},
        opt_state=optax.sgd(0.1).init(params),
        rng=jax.random.PRNGKey(0),
    )


def test_inf_in_model_state_is_never_applied():
    tx = optax.sgd(0.1)
    step = jax.jit(train.make_train_step(_Task(), tx, optax.constant_schedule(0.1)))
    state = _state()
    batch = {"image": jnp.ones((2, 3)), "scale": jnp.ones(2)}
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))  # The loss alone would not have caught it.
    assert not bool(metrics["finite"])
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    # A step whose statistics stay finite is applied.
    new_state, metrics = step(state, {"image": jnp.ones((2, 3)), "scale": jnp.full(2, 1e-30)})
    assert bool(metrics["finite"]) and int(new_state.step) == 1


def _config(grad_clip_norm: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"grad_clip_norm": grad_clip_norm})


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_message_without_a_checkpoint_and_with_clipping(tmp_path, clip):
    manager = ckpt.create_manager(str(tmp_path))
    message = train._non_finite_message(_config(clip), manager, 3, float("nan"))
    assert "no checkpoint had been written yet" in message and "None" not in message
    assert ("grad_clip_norm" in message) == (clip == 0.0)
    ckpt.save(manager, 2, {"x": jnp.ones(2)})
    message = train._non_finite_message(_config(clip), manager, 3, float("inf"))
    assert "(step 2) is intact" in message
    manager.close()


def test_all_finite_ignores_integer_leaves():
    assert bool(train._all_finite({"count": jnp.array(7, jnp.int32), "x": jnp.ones(2)}))
    assert not bool(train._all_finite({"x": jnp.array([1.0, jnp.inf])}))
