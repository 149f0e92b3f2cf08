"""Prediction throughput: `python -m jfcnn.predict` on JPEG files against the bare model.

Both sides run the same compiled function (`jfcnn.predict.Predictor`'s model
call, batch ``--batch_size``) on the same machine:

- bare: pre-batched (B, S, S, 3) canvases already on the device, one call per
  batch, waiting for the outputs: what the model alone can do;
- predict: `jfcnn.predict.predict_to_directory` on a directory of JPEGs
  (``--num_images`` photos of ``--height`` x ``--width``, made by this script):
  decoding, fitting, the model, mapping back to the photo's resolution and
  writing every PNG (and predictions.json), exactly what the command does.

Repeats alternate between the two and the medians are compared, so load from
other processes hits both alike. The target is predict >= 80% of bare. Also
prints the host's single-threaded cost per image of each step, to show what
dominates when the target is missed.

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
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
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
    start = time.perf_counter()
    outputs = [predictor._forward(predictor._variables, canvases) for _ in range(batches)]
    jax.block_until_ready(outputs)
    return num_images / (time.perf_counter() - start)


def time_predict(predictor: predict.Predictor, files, out_dir: str) -> float:
    """Images/s of the command's whole path: files in, PNGs (and JSON) out."""
    start = time.perf_counter()
    errors = predict.predict_to_directory(predictor, files, out_dir, progress=False)
    elapsed = time.perf_counter() - start
    assert errors == 0
    return len(files) / elapsed


def host_costs(predictor: predict.Predictor, files, out_dir: str) -> dict[str, float]:
    """Milliseconds per image of each host step, one thread, one image at a time."""
    costs = {"decode": [], "fit": [], "map back": [], "write": []}
    for file in files[:8]:
        t0 = time.perf_counter()
        image = images_lib.load_image(file.path)
        t1 = time.perf_counter()
        fitted = predictor._fit_one(predict.Prediction(file.path, image=image))
        t2 = time.perf_counter()
        host = jax.device_get(predictor._dispatch([fitted.canvas]))
        t3 = time.perf_counter()
        fitted.prediction.result = predictor._map_back(fitted, host, 0, False)
        t4 = time.perf_counter()
        predict.write_outputs(fitted.prediction, file, out_dir, predictor)
        t5 = time.perf_counter()
        for key, seconds in zip(costs, (t1 - t0, t2 - t1, t4 - t3, t5 - t4), strict=True):
            costs[key].append(seconds * 1000)
    return {key: statistics.median(values) for key, values in costs.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    predictor = predict.Predictor(args.workdir, batch_size=args.batch_size, workers=args.workers)
    print(
        f"{predictor.task_name} model, canvas {predictor.image_size}, batch "
        f"{predictor.batch_size}, {args.num_images} JPEGs of {args.height}x{args.width}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPUs, {predictor._workers} host threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        photo_dir = os.path.join(tmp, "photos")
        os.makedirs(photo_dir)
        make_photos(photo_dir, args.num_images, args.height, args.width)
        files, _ = predict.collect_inputs([photo_dir])
        out_dir = os.path.join(tmp, "out")
        # Warm-up: compiles, and the first writes of each kind.
        time_bare(predictor, predictor.batch_size)
        time_predict(predictor, files[: predictor.batch_size], out_dir)
        bare, full = [], []
        for _ in range(args.repeats):
            bare.append(time_bare(predictor, args.num_images))
            full.append(time_predict(predictor, files, out_dir))
        costs = host_costs(predictor, files, out_dir)
    predictor.close()
    bare_median, full_median = statistics.median(bare), statistics.median(full)
    print(
        f"bare model:        {bare_median:8.1f} images/s  (repeats {[round(v, 1) for v in bare]})"
    )
    print(
        f"python -m predict: {full_median:8.1f} images/s  (repeats {[round(v, 1) for v in full]})"
    )
    print(f"ratio: {full_median / bare_median:.2f} (target >= 0.80)")
    print(
        "host ms per image, one thread: "
        + ", ".join(f"{key} {value:.1f}" for key, value in costs.items())
        + f"; model {1000 / bare_median:.1f} ms per image"
    )


if __name__ == "__main__":
    main()
