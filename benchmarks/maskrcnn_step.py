"""Mask R-CNN ResNet-50-FPN training step: jfcnn (Flax + Optax, jit) against torchvision.

jfcnn trains the model of `configs/maskrcnn_coco.py` (ResNet-50-FPN,
torchvision's proposal and ROI counts: 2000 proposals per image, 512 sampled
ROIs of which up to 25% positive, the mask head on the 128 positive slots)
and torchvision trains `maskrcnn_resnet50_fpn` (random weights, so
`BatchNorm2d` and all layers trainable, like `norm="batch"` here) with the
same image size, batch, classes and ROI counts, both with SGD on the same
random batch, on the same CPU threads. Repeats alternate between the two and
the medians are compared, so load from other processes hits both alike.

    python benchmarks/maskrcnn_step.py
    python benchmarks/maskrcnn_step.py --image_size=320 --batch_size=2 --repeats=5

torchvision's mask head runs on the positive ROIs only (at most 128 per
image; with random weights far fewer), jfcnn's on a fixed number of slots
(static shapes). By default (`--mask_rois=auto`) jfcnn gets as many slots as
torchvision's first step had positives per image (rounded up to a multiple of
8), so both heads do about the same work; `--mask_rois=128` times the COCO
config as is. `--roi_align=dense` times jfcnn's matrix-product ROI Align
instead of the gather one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import jax
import numpy as np

# The configs live beside the package, at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import maskrcnn_coco  # noqa: E402
from jfcnn import train as train_lib  # noqa: E402
from jfcnn.tasks.instance import InstanceSegmentationTask  # noqa: E402
from jfcnn.train_state import create_train_state  # noqa: E402

NUM_CLASSES = 91  # torchvision's COCO head (background + 90 category ids).


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--instances", type=int, default=4, help="Objects per image.")
    parser.add_argument("--roi_align", choices=("gather", "dense"), default="gather")
    parser.add_argument(
        "--mask_rois",
        default="auto",
        help="jfcnn mask-head slots per image: an int, or 'auto' (torchvision's positives).",
    )
    parser.add_argument("--steps", type=int, default=2, help="Training steps per timed repeat.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per framework.")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--torch_threads",
        default="0,1",
        help=(
            "Comma-separated torch.set_num_threads values, each timed (interleaved) as its own "
            "row; 0 is PyTorch's default (all cores). The ratio is against the fastest row: on "
            "a loaded machine PyTorch's OpenMP threads can stall each other badly."
        ),
    )
    return parser.parse_args(argv)


def make_batch(args) -> dict[str, np.ndarray]:
    """Random images with rectangular objects, in jfcnn's batch format."""
    rng = np.random.default_rng(0)
    b, s, m = args.batch_size, args.image_size, args.instances
    images = rng.uniform(size=(b, s, s, 3)).astype(np.float32)
    boxes = np.zeros((b, m, 4), np.float32)
    masks = np.zeros((b, m, s, s), np.uint8)
    for i in range(b):
        for k in range(m):
            w, h = rng.integers(s // 8, s // 2, 2)
            x, y = rng.integers(0, s - w), rng.integers(0, s - h)
            boxes[i, k] = [x, y, x + w, y + h]
            masks[i, k, y : y + h, x : x + w] = 1
    return {
        "image": images,
        "boxes": boxes,
        "labels": rng.integers(1, NUM_CLASSES, (b, m)).astype(np.int32),
        "instance_masks": masks,
        "instance_valid": np.ones((b, m), bool),
    }


def jfcnn_step(args, batch, mask_rois: int):
    """Compiled train step of the COCO config at this size; returns (step, state, compile s)."""
    config = maskrcnn_coco.get_config()
    config.data.image_size = args.image_size
    config.data.max_instances = args.instances
    config.batch_size = args.batch_size
    config.model.dtype = "float32"
    config.model.roi_align = args.roi_align
    config.model.mask_rois_per_image = mask_rois
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.lr_schedule = "constant"
    metadata = types.SimpleNamespace(
        name="synthetic",
        num_classes=NUM_CLASSES,
        class_names=tuple(str(i) for i in range(NUM_CLASSES)),
        has_instances=True,
    )
    task = InstanceSegmentationTask(config, metadata)
    tx, schedule = train_lib.create_optimizer(config)
    rng = jax.random.PRNGKey(0)
    init = jax.jit(lambda r: create_train_state(task, tx, r))
    state = init.lower(rng).compile(compiler_options=train_lib.FAST_COMPILE)(rng)
    batch = jax.device_put(batch)
    start = time.perf_counter()
    step = jax.jit(train_lib.make_train_step(task, tx, schedule), donate_argnums=0)
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    return step, state, batch, compile_s


def torch_step(args, batch):
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES,
        min_size=args.image_size,
        max_size=args.image_size,
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=2000,
        box_batch_size_per_image=512,
        box_positive_fraction=0.25,
    )
    model.train()
    positives = []
    sample = model.roi_heads.select_training_samples

    def counting_sample(proposals, targets):
        out = sample(proposals, targets)
        positives.extend(int((labels > 0).sum()) for labels in out[2])
        return out

    model.roi_heads.select_training_samples = counting_sample
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = [torch.from_numpy(x).permute(2, 0, 1).contiguous() for x in batch["image"]]
    targets = [
        {
            "boxes": torch.from_numpy(batch["boxes"][i]),
            "labels": torch.from_numpy(batch["labels"][i]).long(),
            "masks": torch.from_numpy(batch["instance_masks"][i]),
        }
        for i in range(args.batch_size)
    ]

    def step():
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step, positives


def main(argv=None) -> None:
    args = parse_args(argv)
    batch = make_batch(args)
    print(
        f"Mask R-CNN ResNet-50-FPN training step, batch {args.batch_size} x "
        f"{args.image_size}x{args.image_size}, {NUM_CLASSES} classes, jfcnn roi_align="
        f"{args.roi_align}; jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    run_torch, torch_first, positives = None, None, []
    if args.torch:
        try:
            run_torch, positives = torch_step(args, batch)
        except ImportError:
            print("torch/torchvision not installed: jfcnn only.")
        else:
            start = time.perf_counter()
            run_torch()
            torch_first = time.perf_counter() - start
    if args.mask_rois == "auto":
        mask_rois = 128 if not positives else max(8, -(-max(positives) // 8) * 8)
    else:
        mask_rois = int(args.mask_rois)
    print(
        f"torchvision positive ROIs per image in its first step: {positives or '-'}; "
        f"jfcnn mask-head slots per image: {mask_rois}"
    )
    step, state, device_batch, compile_s = jfcnn_step(args, batch, mask_rois)
    holder = {"state": state}

    def jax_steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics)
        assert bool(metrics["finite"]), metrics
        return time.perf_counter() - start

    first_jax = jax_steps(1)
    rows: dict[str, list[float]] = {"jfcnn": []}
    firsts = {"jfcnn": first_jax}
    compiles = {"jfcnn": f"{compile_s:.1f}"}
    threads = [int(t) for t in args.torch_threads.split(",")] if run_torch else []
    if threads:
        import torch

        default_threads = torch.get_num_threads()
        names = {t: f"torchvision ({t or default_threads} threads)" for t in threads}
        for name in names.values():
            rows[name], firsts[name], compiles[name] = [], torch_first, "-"
    for _ in range(args.repeats):
        rows["jfcnn"].append(args.steps * args.batch_size / jax_steps(args.steps))
        for t in threads:
            torch.set_num_threads(t or default_threads)
            start = time.perf_counter()
            for _ in range(args.steps):
                run_torch()
            rows[names[t]].append(args.steps * args.batch_size / (time.perf_counter() - start))
    if threads:
        torch.set_num_threads(default_threads)

    print()
    print("| | images/s (median) | min..max | compile (s) | first step (s) |")
    print("|---|---|---|---|---|")
    for name, values in rows.items():
        print(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}..{max(values):.2f} "
            f"| {compiles[name]} | {firsts[name]:.1f} |"
        )
    if threads:
        best = max(statistics.median(rows[name]) for name in names.values())
        ratio = statistics.median(rows["jfcnn"]) / best
        print(f"\nratio jfcnn / fastest torchvision images/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
