"""Mask R-CNN ResNet-50-FPN inference: a converted jfcnn model against torchvision's own.

torchvision's ``maskrcnn_resnet50_fpn`` runs in eval mode on a ``--height x
--width`` photo (COCO size by default: 800 x 1333, which torchvision's
transform keeps and pads to 800 x 1344); the same weights, converted by
``jfcnn.weights.maskrcnn_variables`` into the model ``python -m jfcnn.convert``
writes, run under ``jit`` on the same image on an 800 x 1344 canvas with
``image_sizes`` (torchvision's inference semantics).

The weights are ``--weights`` (a ``maskrcnn_resnet50_fpn`` state dict), or
without it random ones, built as the parity tests build them
(``tests/torchvision_maskrcnn.py``): batch-norm statistics calibrated on
photos and heads that give confident, distinct scores, so both models find
their 100 detections on the photo as the COCO weights do on a busy one.
``--heads=random`` keeps torchvision's random heads (the backbone calibrated
on a random image). ``--image=noise`` feeds uniform noise instead of the
photo: with random heads no score reaches the 0.05 threshold, so torchvision
skips the mask head and pasting, and jfcnn skips its empty detection slots.
The detection counts are printed.

Both use every CPU thread; repeats alternate between the two and the medians
are compared, so load from other processes hits both alike. Compile time is
reported on its own.

    python benchmarks/maskrcnn_infer.py
    python benchmarks/maskrcnn_infer.py --heads=random --image=noise
    python benchmarks/maskrcnn_infer.py --height=480 --width=640 --repeats=3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch  # Before TensorFlow (imported by jfcnn.convert): the other order can crash.
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # torchvision_maskrcnn: the parity tests' model

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torchvision_maskrcnn import build_torchvision_model, photo  # noqa: E402

from jfcnn import convert, tasks, weights  # noqa: E402
from jfcnn.models.maskrcnn import IMAGE_MEAN, MaskRCNN  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per framework.")
    parser.add_argument("--weights", default=None, help="A maskrcnn_resnet50_fpn state dict.")
    parser.add_argument(
        "--heads",
        choices=("confident", "random"),
        default="confident",
        help="Without --weights: the parity tests' confident heads, or torchvision's random ones.",
    )
    parser.add_argument("--image", choices=("photo", "noise"), default="photo")
    return parser.parse_args(argv)


def torch_model(weights_path: str | None, heads: str):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    if heads == "confident" and not weights_path:
        return build_torchvision_model(min_size=800, max_size=1333).eval()
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    if weights_path:
        current, _ = weights.current_key_names(weights.read_state_dict(weights_path))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in current.items()})
    else:
        with torch.no_grad():  # Realistic activations: statistics of a random image.
            for module in model.backbone.body.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.momentum = None
            model.backbone.body.train()
            model.backbone.body(torch.rand(1, 3, 512, 512))
    return model.eval()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"torch {torch.__version__} torchvision {torchvision.__version__} jax {jax.__version__}, "
        f"{os.cpu_count()} CPU threads, image {args.height} x {args.width}"
    )
    tv = torch_model(args.weights, args.heads)
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    config = convert.maskrcnn_config(norm_epsilon=1e-5)
    task = tasks.get_task(config, convert.coco_metadata())
    model: MaskRCNN = task.model
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), method=MaskRCNN.initialize)
    )
    variables = jax.tree.map(jnp.asarray, weights.maskrcnn_variables(state, expected))

    if args.image == "photo":
        image = photo(args.height, args.width, seed=3)
    else:
        image = np.random.default_rng(0).uniform(0, 1, (args.height, args.width, 3))
        image = image.astype(np.float32)
    image_t = torch.from_numpy(image).permute(2, 0, 1)
    with torch.no_grad():
        resized = tv.transform.resize(image_t, None)[0]
    height, width = resized.shape[1:]
    canvas_hw = tuple(math.ceil(s / 32) * 32 for s in (height, width))
    canvas = np.broadcast_to(np.asarray(IMAGE_MEAN, np.float32), (*canvas_hw, 3)).copy()
    canvas[:height, :width] = resized.permute(1, 2, 0).numpy()
    canvas = jnp.asarray(canvas[None])
    sizes = jnp.asarray([[height, width]], jnp.int32)

    start = time.perf_counter()
    forward = (
        jax.jit(lambda v, x, s: model.apply(v, x, image_sizes=s))
        .lower(variables, canvas, sizes)
        .compile()
    )
    compile_s = time.perf_counter() - start

    def run_jfcnn() -> float:
        start = time.perf_counter()
        jax.block_until_ready(forward(variables, canvas, sizes))
        return time.perf_counter() - start

    def run_torch() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            tv([image_t])
        return time.perf_counter() - start

    first = {"jfcnn": run_jfcnn(), "torchvision": run_torch()}
    with torch.no_grad():
        tv_count = len(tv([image_t])[0]["scores"])
    jfcnn_count = int(np.asarray(forward(variables, canvas, sizes)["detection_valid"]).sum())
    print(f"detections: jfcnn {jfcnn_count}, torchvision {tv_count}")
    times: dict[str, list[float]] = {"jfcnn": [], "torchvision": []}
    for _ in range(args.repeats):
        times["jfcnn"].append(run_jfcnn())
        times["torchvision"].append(run_torch())

    print()
    print("| | images/s (median) | min..max s | compile (s) | first run (s) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        compile_cell = f"{compile_s:.1f}" if name == "jfcnn" else "-"
        print(
            f"| {name} | {1 / statistics.median(values):.3f} | {min(values):.2f}.."
            f"{max(values):.2f} | {compile_cell} | {first[name]:.2f} |"
        )
    ratio = statistics.median(times["torchvision"]) / statistics.median(times["jfcnn"])
    print(f"\njfcnn / torchvision throughput: {ratio:.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
