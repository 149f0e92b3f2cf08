"""Training from torchvision backbone weights: loaded at step 0 only, frozen layers frozen.

A tiny Mask R-CNN whose backbone is torchvision's ``ResNet(BasicBlock,
[1, 1, 1, 1])`` (64 channels, one block per stage) trains a few steps from a
saved torchvision state dict; the checkpoint is then compared with the
converted weights: the frozen layers and the frozen batch norm bit for bit,
the trained layers moved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs

from jfcnn import evaluate, weights
from jfcnn import train as train_lib
from jfcnn.models.maskrcnn import MaskRCNN

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

TINY = {
    "data.image_size": 64,
    "data.train_split": "train[:16]",
    "data.eval_split": "validation[:4]",
    "data.shuffle_buffer": 16,
    **tiny_configs.config_overrides({**tiny_configs.MASKRCNN, "width": 64}),
    "model.frozen_batch_norm": True,
    "batch_size": 4,
    "num_train_steps": 3,
    "learning_rate": 1e-2,
    "warmup_steps": 1,
    "log_every_steps": 1,
    "eval_every_steps": 100,
    "checkpoint_every_steps": 3,
    "num_eval_images": 1,
}


def _torch_backbone(seed: int):
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return net


def _backbone(variables, collection):
    return variables[collection]["backbone"]


@pytest.mark.slow
def test_backbone_weights_load_at_step_0_freeze_and_are_not_reloaded(runner, tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(_torch_backbone(0).state_dict(), path)
    state = {k: v.numpy() for k, v in _torch_backbone(0).state_dict().items()}
    workdir = tmp_path / "run"
    run = runner.with_config("maskrcnn.py", TINY)
    run.run(workdir, **{"model.backbone_weights": str(path)})

    _, task, variables, step = evaluate.load_trained(str(workdir))
    assert step == 3
    expected = {
        "params": _backbone(variables, "params"),
        "batch_stats": _backbone(variables, "batch_stats"),
    }
    loaded = weights.resnet_variables(state, expected)
    # Default trainable_backbone_layers with weights: 3, so the stem and res2 are frozen.
    assert task.model.frozen_backbone_layers == ("stem_conv", "stem_norm", "res2")
    for name in ("stem_conv", "res2"):
        jax.tree.map(
            np.testing.assert_array_equal, expected["params"][name], loaded["params"][name]
        )
    for name in ("res3", "res4"):
        moved = jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a) - b).max()),
            expected["params"][name],
            loaded["params"][name],
        )
        assert min(jax.tree.leaves(moved)) > 0, (name, moved)
    # Frozen batch norm: statistics and affine as loaded, in every layer.
    jax.tree.map(np.testing.assert_array_equal, expected["batch_stats"], loaded["batch_stats"])
    # res5 is not built (the FPN stops at res4): its keys were skipped.
    assert "res5" not in expected["params"]

    # Resuming does not read the weights again: another file at the same path
    # leaves the frozen layers as they were.
    torch.save(_torch_backbone(1).state_dict(), path)
    run.run(workdir, num_train_steps=5, **{"model.backbone_weights": str(path)})
    _, _, resumed, step = evaluate.load_trained(str(workdir))
    assert step == 5
    jax.tree.map(
        np.testing.assert_array_equal,
        _backbone(resumed, "params")["stem_conv"],
        loaded["params"]["stem_conv"],
    )


def _tiny_model(**fields) -> MaskRCNN:
    return MaskRCNN(num_classes=3, **{**tiny_configs.MASKRCNN, "width": 64}, **fields)


def _params(model: MaskRCNN):
    images = jnp.zeros((1, 64, 64, 3))
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), images, method=MaskRCNN.initialize)
    )["params"]


@pytest.mark.parametrize(
    ("trainable", "frozen"),
    [
        (None, ()),
        (5, ()),
        (3, ("stem_conv", "stem_norm", "res2")),
        (0, ("stem_conv", "stem_norm", "res2", "res3", "res4", "res5")),
    ],
)
def test_frozen_layers_follow_torchvision(trainable, frozen):
    assert _tiny_model(trainable_backbone_layers=trainable).frozen_backbone_layers == frozen


def test_frozen_params_get_no_optimizer_state_and_no_update():
    from ml_collections import ConfigDict

    model = _tiny_model(trainable_backbone_layers=2, norm="batch")
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _params(model))
    config = ConfigDict(
        {
            "learning_rate": 0.1,
            "num_train_steps": 10,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "optimizer": "adamw",
            "weight_decay": 0.1,
            "momentum": 0.9,
            "grad_clip_norm": 1.0,
        }
    )
    frozen = train_lib.frozen_param_paths(model)
    assert frozen == (
        ("backbone", "stem_conv"),
        ("backbone", "stem_norm"),
        ("backbone", "res2"),
        ("backbone", "res3"),
    )
    tx, _ = train_lib.create_optimizer(config, frozen=frozen)
    opt_state = tx.init(params)
    # Adam's two moments exist for the trained params only.
    trained = [
        x
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if str(path[1].key) not in ("stem_conv", "stem_norm", "res2", "res3")
        or str(path[0].key) != "backbone"
    ]
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in trained)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    for name in ("stem_conv", "stem_norm", "res2", "res3"):
        jax.tree.map(np.testing.assert_array_equal, new["backbone"][name], params["backbone"][name])
    assert float(jnp.abs(new["backbone"]["res4"]["block0"]["conv1"]["kernel"] - 1).min()) > 0
    assert float(jnp.abs(new["fpn"]["lateral_p2"]["kernel"] - 1).min()) > 0


def test_bad_trainable_backbone_layers_is_rejected():
    with pytest.raises(ValueError, match="trainable_backbone_layers must be in 0..5, got 6"):
        _ = _tiny_model(trainable_backbone_layers=6).frozen_backbone_layers
