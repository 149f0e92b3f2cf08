"""python -m jfcnn.convert: a torchvision Mask R-CNN state dict becomes a jfcnn work directory.

The state dict is torchvision's ``maskrcnn_resnet50_fpn`` with random,
calibrated weights (``tests/torchvision_maskrcnn.py``), saved in each file
format and key naming; the work directory must restore, through
``load_trained``, to exactly the variables the weights module converts, with
torchvision's inference settings and COCO's classes at their category ids.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn import convert, evaluate, finetune, weights
from jfcnn.models.maskrcnn import MaskRCNN

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torchvision_maskrcnn import TORCHVISION_FIELDS, build_torchvision_model, v1_state_dict  # noqa: E402


def _convert(path, workdir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jfcnn.convert",
            "--torchvision=maskrcnn_resnet50_fpn",
            f"--weights={path}",
            f"--workdir={workdir}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def torch_model():
    return build_torchvision_model()


@pytest.fixture(scope="module")
def converted(torch_model):
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    model = MaskRCNN(**TORCHVISION_FIELDS)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), method=MaskRCNN.initialize)
    )
    return weights.maskrcnn_variables(state, expected), state


@pytest.mark.parametrize(("ext", "names"), [("pth", "current"), ("safetensors", "v1")])
def test_convert_cli_writes_a_workdir_that_load_trained_uses(
    torch_model, converted, tmp_path, ext, names
):
    variables, state = converted
    path = str(tmp_path / f"maskrcnn.{ext}")
    if ext == "pth":
        torch.save(torch_model.state_dict(), path)
    else:
        weights.write_safetensors(path, v1_state_dict(state))
    workdir = tmp_path / "converted"
    result = _convert(path, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{names} key names" in result.stdout

    config, task, restored, step = evaluate.load_trained(str(workdir))
    assert step == 0
    # torchvision's resize (800 / 1333) on a canvas of 1344, the classes kept for fine-tuning.
    assert config.data.resize == "torchvision" and config.data.image_size == 1344
    assert (config.data.min_size, config.data.max_size) == (800, 1333)
    assert finetune.load_pretrained_metadata(str(workdir)).class_names[1] == "person"
    # v1 weights get the frozen batch norm epsilon torchvision gives them, 0.
    assert task.model.norm_epsilon == (0.0 if names == "v1" else 1e-5)
    assert not task.model.roi_align_aligned and task.model.frozen_batch_norm
    metadata = task.metadata
    assert metadata.num_classes == 91 and metadata.class_names[1] == "person"
    assert metadata.class_names[90] == "toothbrush" and metadata.class_names[12] == "N/A"
    assert sum(name != "N/A" for name in metadata.class_names[1:]) == 80
    assert list(metadata.category_ids) == list(range(91))
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    assert convert.COCO_CATEGORY_IDS[-1] == 90 and len(convert.COCO_CATEGORY_IDS) == 80


def test_convert_rejects_a_resnet_classifier_in_one_line(tmp_path):
    path = str(tmp_path / "r18.npz")
    np.savez(path, **{k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()})
    result = _convert(path, tmp_path / "w")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "no key 'backbone.body." in lines[-1]
    assert "an ImageNet classifier" in lines[-1] and "ResNet-18" in lines[-1]
    assert not (tmp_path / "w").exists()
