"""jfcnn.ops.roi_align vs torchvision.ops.roi_align on detectron2's CPU workload.

    python benchmarks/roi_align.py            # needs the bench extra: torch, torchvision

Workload (detectron2 `tests/layers/test_roi_align.py::benchmark_roi_align`, CPU
part): one 128x128 feature map with 256 channels (NHWC for jfcnn, NCHW for
torch), 512 boxes, 7x7 output, `aligned=True`, `spatial_scale=1`; small boxes
(~10 px) and large boxes (~24-48 px) with `sampling_ratio` 0 (adaptive) and 2.
"fwd" computes the pooled features; "fwd+bwd" computes them and their
vector-Jacobian product with respect to the features for a fixed random
cotangent (torch: `out.backward(cotangent)`). Both libraries get the same
boxes, and the script checks that their outputs and gradients agree before
timing. Times are medians over interleaved repeats (jfcnn, torch, jfcnn, ...),
jfcnn jitted and warmed up; torch and XLA use their default thread pools (all
cores). The machine is usually shared: compare the ratios, which are measured
side by side, not the absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jfcnn.ops import roi_align

try:
    import torch
    import torchvision
except ImportError as e:  # pragma: no cover - depends on the environment
    raise SystemExit("this benchmark needs torch and torchvision: pip install -e '.[bench]'") from e

HEIGHT = WIDTH = 128
CHANNELS = 256
NUM_BOXES = 512
OUTPUT = 7


def random_boxes(rng: np.random.Generator, size: str) -> np.ndarray:
    """detectron2's benchmark boxes: mean box + uniform jitter, clamped to the map."""
    if size == "large":
        mean, jitter = [80.0, 80.0, 130.0, 130.0], 24.0
    else:
        mean, jitter = [100.0, 100.0, 110.0, 110.0], 4.0
    boxes = rng.random((NUM_BOXES, 4), dtype=np.float32) * jitter + np.float32(mean)
    return np.clip(boxes, 0, HEIGHT).astype(np.float32)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One box set, laid out for each library (K boxes, PH x PW = OUTPUT x OUTPUT)."""

    features_nhwc: jax.Array  # (1, H, W, C), jfcnn
    features_nchw: torch.Tensor  # (1, C, H, W), torch
    boxes_k4: jax.Array  # (K, 4) boxes (x1, y1, x2, y2)
    box_indices_k: jax.Array  # (K,) int32 image of each box
    rois_k5: torch.Tensor  # (K, 5) torchvision rois (image, x1, y1, x2, y2)
    cotangent_kpqc: jax.Array  # (K, PH, PW, C)
    cotangent_kcpq: torch.Tensor  # (K, C, PH, PW)


def run_case(inputs: Inputs, *, size: str, ratio: int, repeats: int):
    """Times one (box size, sampling ratio) case; returns (size, ratio, medians in ms)."""

    def pool(features, boxes):
        return roi_align(
            features,
            boxes,
            OUTPUT,
            spatial_scale=1.0,
            sampling_ratio=ratio,
            aligned=True,
            box_indices=inputs.box_indices_k,
        )

    def pool_and_grad(features, boxes, cotangent):
        out, vjp = jax.vjp(lambda f: pool(f, boxes), features)
        return out, vjp(cotangent)[0]

    jfcnn_fwd = jax.jit(pool)
    jfcnn_fwd_bwd = jax.jit(pool_and_grad)

    def torch_fwd():
        with torch.no_grad():
            return torchvision.ops.roi_align(
                inputs.features_nchw, inputs.rois_k5, OUTPUT, 1.0, ratio, True
            )

    def torch_fwd_bwd():
        features = inputs.features_nchw.detach().requires_grad_(True)
        out = torchvision.ops.roi_align(features, inputs.rois_k5, OUTPUT, 1.0, ratio, True)
        out.backward(inputs.cotangent_kcpq)
        return out, features.grad

    def jfcnn_fwd_run():
        return jfcnn_fwd(inputs.features_nhwc, inputs.boxes_k4).block_until_ready()

    def jfcnn_fwd_bwd_run():
        return jax.block_until_ready(
            jfcnn_fwd_bwd(inputs.features_nhwc, inputs.boxes_k4, inputs.cotangent_kpqc)
        )

    # Agreement on exactly what is timed (this also compiles and warms up).
    out_j = np.asarray(jfcnn_fwd_run())
    out_t = torch_fwd().permute(0, 2, 3, 1).numpy()
    _, grad_j = jfcnn_fwd_bwd_run()
    _, grad_t = torch_fwd_bwd()
    fwd_err = float(np.abs(out_j - out_t).max())
    grad_err = float(np.abs(np.asarray(grad_j) - grad_t.permute(0, 2, 3, 1).numpy()).max())
    if fwd_err > 1e-4 or grad_err > 1e-3:
        raise SystemExit(f"{size}/{ratio}: outputs differ: {fwd_err=} {grad_err=}")

    times = {key: [] for key in ("jf", "tf", "jb", "tb")}
    for _ in range(repeats):
        times["jf"].append(timed(jfcnn_fwd_run))
        times["tf"].append(timed(torch_fwd))
        times["jb"].append(timed(jfcnn_fwd_bwd_run))
        times["tb"].append(timed(torch_fwd_bwd))
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    print(
        f"{size:5s} ratio={ratio}: fwd jfcnn {med['jf']:6.1f} ms, torch {med['tf']:6.1f} ms "
        f"({med['tf'] / med['jf']:.1f}x); fwd+bwd jfcnn {med['jb']:6.1f} ms, torch "
        f"{med['tb']:6.1f} ms ({med['tb'] / med['jb']:.1f}x); max |diff| out {fwd_err:.1e}, "
        f"grad {grad_err:.1e}",
        flush=True,
    )
    return size, ratio, med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case and library")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    features = rng.random((1, HEIGHT, WIDTH, CHANNELS), dtype=np.float32)
    features_nhwc = jnp.asarray(features)
    features_nchw = torch.from_numpy(features).permute(0, 3, 1, 2).contiguous()

    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), torchvision {torchvision.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(f"load average before: {os.getloadavg()}")

    rows = []
    for size in ("small", "large"):
        boxes = random_boxes(rng, size)
        cotangent = rng.standard_normal((NUM_BOXES, OUTPUT, OUTPUT, CHANNELS), dtype=np.float32)
        inputs = Inputs(
            features_nhwc=features_nhwc,
            features_nchw=features_nchw,
            boxes_k4=jnp.asarray(boxes),
            box_indices_k=jnp.zeros((NUM_BOXES,), jnp.int32),
            rois_k5=torch.cat([torch.zeros(NUM_BOXES, 1), torch.from_numpy(boxes)], dim=1),
            cotangent_kpqc=jnp.asarray(cotangent),
            cotangent_kcpq=torch.from_numpy(cotangent).permute(0, 3, 1, 2).contiguous(),
        )
        for ratio in (0, 2):
            rows.append(run_case(inputs, size=size, ratio=ratio, repeats=args.repeats))

    print(f"load average after: {os.getloadavg()}\n")
    print(
        "| boxes | sampling_ratio | torchvision fwd (ms) | jfcnn fwd (ms) | speed-up "
        "| torchvision fwd+bwd (ms) | jfcnn fwd+bwd (ms) | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size, ratio, med in rows:
        print(
            f"| {size} | {ratio} | {med['tf']:.1f} | {med['jf']:.1f} | "
            f"{med['tf'] / med['jf']:.1f}x | {med['tb']:.1f} | {med['jb']:.1f} | "
            f"{med['tb'] / med['jb']:.1f}x |"
        )
    geo_f = float(np.exp(np.mean([np.log(m["tf"] / m["jf"]) for _, _, m in rows])))
    geo_b = float(np.exp(np.mean([np.log(m["tb"] / m["jb"]) for _, _, m in rows])))
    print(f"| geometric mean | | | | {geo_f:.1f}x | | | {geo_b:.1f}x |")


if __name__ == "__main__":
    main()
