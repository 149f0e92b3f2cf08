"""Prediction throughput: `python -m jfcnn.predict` on JPEG files against the bare model.

All sides run the same compiled function (`jfcnn.predict.Predictor`'s model
call, batch ``--batch_size``, the run's canvas) on the same machine:

- bare: pre-batched (B, S, S, 3) canvases already on the device, one call per
  batch, waiting for the outputs: what the model alone can do;
- predict: `jfcnn.predict.predict_to_directory` on a directory of JPEGs
  (``--num_images`` photos of each ``--sizes`` entry, made by this script):
  decoding, fitting, the model, mapping back to the photo's resolution and
  writing every PNG (and predictions.json), exactly what the command does;
- no overlay: the same with ``--no_overlay`` (no ``_overlay.png`` pictures).

Photos come in each of ``--sizes`` (default: 480x640, a phone photo, and the
run's own S x S, the size it was trained on). Repeats interleave the sides
(bare, predict, no overlay, bare, ...) and the medians are compared, so load
from other processes hits all alike. The target is predict >= 80% of bare.
Also prints the host's single-threaded cost per image of each step, to show
what dominates when the target is missed.

    python train.py --config configs/unet.py --workdir runs/unet
    python benchmarks/predict.py --workdir runs/unet
    python benchmarks/predict.py --workdir runs/maskrcnn --num_images 32 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from jfcnn import predict
from jfcnn.data import images as images_lib


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="A trained run's work directory.")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument(
        "--sizes",
        default="480x640,canvas",
        help="Photo sizes, HxW, comma-separated; 'canvas' is the run's S x S.",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per side.")
    parser.add_argument("--workers", type=int, default=None, help="Predictor host threads.")
    return parser.parse_args(argv)


def make_photos(directory: str, num: int, height: int, width: int) -> list[str]:
    """JPEGs of smooth color blobs with noise (JPEG-compressed like photos, not flat)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(num):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))
        noise = rng.integers(-12, 13, image.shape)
        image = np.clip(image.astype(np.int32) + noise, 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"photo_{i:04d}.jpg")
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def time_bare(predictor: predict.Predictor, num_images: int) -> float:
    """Images/s of the compiled model call on pre-batched device arrays."""
    size, batch_size = predictor.image_size, predictor.batch_size
    batches = -(-num_images // batch_size)
    canvases = np.random.default_rng(1).random((batch_size, size, size, 3), np.float32)
    canvases = jax.device_put(canvases, predictor._batch_sharding)
    sizes = np.full((batch_size, 2), size, np.int32)  # Each canvas filled.
    sizes = jax.device_put(sizes, predictor._batch_sharding)
    start = time.perf_counter()
    outputs = [predictor._forward(predictor._variables, canvases, sizes) for _ in range(batches)]
    jax.block_until_ready(outputs)
    return num_images / (time.perf_counter() - start)


def time_predict(predictor: predict.Predictor, files, out_dir: str, overlay: bool = True) -> float:
    """Images/s of the command's whole path: files in, PNGs (and JSON) out."""
    start = time.perf_counter()
    errors = predict.predict_to_directory(
        predictor, files, out_dir, progress=False, overlay=overlay
    )
    elapsed = time.perf_counter() - start
    assert errors == 0
    return len(files) / elapsed


def host_costs(predictor: predict.Predictor, files, out_dir: str) -> dict[str, float]:
    """Milliseconds per image of each host step, one thread, one image at a time."""
    costs = {"decode": [], "fit": [], "map back": [], "write": [], "overlay": []}
    for file in files[:8]:
        t0 = time.perf_counter()
        image = images_lib.load_image(file.path)
        t1 = time.perf_counter()
        fitted = predictor._fit_one(predict.Prediction(file.path, image=image))
        t2 = time.perf_counter()
        host = jax.device_get(predictor._dispatch([fitted]))
        t3 = time.perf_counter()
        fitted.prediction.result = predictor._map_back(fitted, host, 0, full_masks=False)
        t4 = time.perf_counter()
        predict.write_outputs(fitted.prediction, file, out_dir, predictor, overlay=False)
        t5 = time.perf_counter()
        predict.write_outputs(fitted.prediction, file, out_dir, predictor)
        t6 = time.perf_counter()
        steps = (t1 - t0, t2 - t1, t4 - t3, t5 - t4, (t6 - t5) - (t5 - t4))
        for key, seconds in zip(costs, steps, strict=True):
            costs[key].append(seconds * 1000)
    return {key: statistics.median(values) for key, values in costs.items()}


def photo_sizes(sizes: str, canvas: int) -> list[tuple[int, int]]:
    out = []
    for item in sizes.split(","):
        item = item.strip().lower()
        if item == "canvas":
            out.append((canvas, canvas))
        else:
            height, width = item.split("x")
            out.append((int(height), int(width)))
    return out


def bench_size(predictor, args, tmp: str, height: int, width: int) -> None:
    photo_dir = os.path.join(tmp, f"photos_{height}x{width}")
    os.makedirs(photo_dir)
    make_photos(photo_dir, args.num_images, height, width)
    files, _ = predict.collect_inputs([photo_dir])
    out_dir = os.path.join(tmp, f"out_{height}x{width}")
    # Warm-up: compiles, and the first writes of each kind.
    time_bare(predictor, predictor.batch_size)
    time_predict(predictor, files[: predictor.batch_size], out_dir)
    sides = {
        "bare model": lambda: time_bare(predictor, args.num_images),
        "python -m predict": lambda: time_predict(predictor, files, out_dir),
        "  --no_overlay": lambda: time_predict(predictor, files, out_dir, overlay=False),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, run in sides.items():
            rates[name].append(run())
    costs = host_costs(predictor, files, out_dir)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    bare = medians["bare model"]
    print(f"-- {args.num_images} JPEGs of {height}x{width}")
    for name, values in rates.items():
        ratio = "" if name == "bare model" else f"  ratio {medians[name] / bare:.2f}"
        print(
            f"{name:18s} {medians[name]:8.1f} images/s{ratio}  "
            f"(repeats {[round(v, 1) for v in values]})"
        )
    print(
        "host ms per image, one thread: "
        + ", ".join(f"{key} {value:.1f}" for key, value in costs.items())
        + f"; model {1000 / bare:.1f} ms per image"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    predictor = predict.Predictor(args.workdir, batch_size=args.batch_size, workers=args.workers)
    print(
        f"{predictor.task_name} model, canvas {predictor.image_size}, batch "
        f"{predictor.batch_size}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPUs, {predictor._workers} host threads; target ratio >= 0.80; "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for height, width in photo_sizes(args.sizes, predictor.image_size):
            bench_size(predictor, args, tmp, height, width)
    predictor.close()


if __name__ == "__main__":
    main()
