"""Each 3x3 convolution of the U-Net step, jfcnn (XLA) against PyTorch, on the same cores.

`benchmarks/unet_step.py` times the whole training step; this script splits
out its convolutions, the bulk of the step's work. For every distinct 3x3
convolution of `jfcnn.models.UNet` (map size, input and output channels) it
times, under `jit` and on PyTorch's CPU kernels (`channels_last`), the three
passes a training step runs:

  forward:      y = conv(x, w)
  input grad:   dx = vjp of x -> conv(x, w), applied to dy
  filter grad:  dw = vjp of w -> conv(x, w), applied to dy

and reports which kernel library XLA picked for each pass: YNNPACK (a
`__ynn_fusion` in the compiled HLO) or XLA's own Eigen convolution. Repeats
alternate between the two frameworks and medians are compared. The batch
defaults to 8: what each of two CPU devices runs of `unet_step.py`'s
default batch of 16 split over them.

    python benchmarks/unet_convs.py                 # one core, both frameworks
    python benchmarks/unet_convs.py --cores 2       # both frameworks on two cores
    python benchmarks/unet_convs.py --batch_size 4 --image_size 128 --depth 4 --base_width 32

`--cores N` pins this process to its first N allowed cores before JAX starts
(XLA sizes its thread pool from the affinity mask) and gives PyTorch N threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from functools import partial


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--base_width", type=int, default=16)
    parser.add_argument("--cores", type=int, default=1, help="Cores for both frameworks.")
    parser.add_argument("--repeats", type=int, default=15, help="Timed calls per pass.")
    return parser.parse_args(argv)


def unet_convs(image_size: int, channels: int, depth: int, base_width: int) -> Counter:
    """``{(map size, in channels, out channels): count}`` of `UNet`'s 3x3 convolutions.

    Every level's DoubleConv runs at ``image_size // 2**level``; decoder
    levels see the skip and the up-sampled map concatenated (twice the
    level's width).
    """
    widths = [base_width * 2**level for level in range(depth + 1)]
    convs: Counter = Counter()
    cin = channels
    for level in range(depth + 1):  # encoder levels, then the bottleneck
        size = image_size // 2**level
        convs[(size, cin, widths[level])] += 1
        convs[(size, widths[level], widths[level])] += 1
        cin = widths[level]
    for level in range(depth):
        size = image_size // 2**level
        convs[(size, 2 * widths[level], widths[level])] += 1
        convs[(size, widths[level], widths[level])] += 1
    return convs


def jax_passes():
    """``{pass: jitted function}``, each taking ``(x, w, dy)`` in NHWC / HWIO."""
    import jax
    from jax import lax

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    return {
        "forward": jax.jit(lambda x, w, dy: conv(x, w)),
        "input grad": jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
        "filter grad": jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
    }


def torch_passes():
    """The same passes in PyTorch: ``{pass: make(x, w, dy) -> timed function}``.

    Tensors are NCHW in ``channels_last`` and OIHW filters. The gradient
    passes run the backward of one recorded forward (``retain_graph``), so,
    as in JAX, their time holds no forward.
    """
    import torch
    from torch.nn import functional as F

    def forward(x, w, dy):
        def run():
            with torch.no_grad():
                return F.conv2d(x, w, padding=1)

        return run

    def grad(wrt):
        def make(x, w, dy):
            x, w = x.detach().requires_grad_(wrt == "x"), w.detach().requires_grad_(wrt == "w")
            y = F.conv2d(x, w, padding=1)
            target = x if wrt == "x" else w
            return lambda: torch.autograd.grad(y, target, dy, retain_graph=True)[0]

        return make

    return {"forward": forward, "input grad": grad("x"), "filter grad": grad("w")}


def torch_inputs(x, w, dy):
    """NHWC maps and an HWIO filter (NumPy) as PyTorch's NCHW ``channels_last`` and OIHW."""
    import torch

    def maps(a):
        nchw = torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
        return nchw.contiguous(memory_format=torch.channels_last)

    return maps(x), torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), maps(dy)


def time_ms(fn, sync) -> float:
    start = time.perf_counter()
    sync(fn())
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> None:
    args = parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[: args.cores])  # before JAX creates its thread pool
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.cores)
    jax_fns, torch_fns = jax_passes(), torch_passes()
    rng = np.random.default_rng(0)
    convs = unet_convs(args.image_size, args.channels, args.depth, args.base_width)
    print(
        f"U-Net 3x3 convolutions: batch {args.batch_size}, {args.image_size}x{args.image_size}x"
        f"{args.channels} images, depth {args.depth}, base width {args.base_width}; "
        f"{args.cores} core(s) for both (PyTorch {args.cores} thread(s), channels_last); jax "
        f"{jax.__version__}, torch {torch.__version__}; median of {args.repeats} interleaved "
        "calls, ms. count: how often the step runs the convolution."
    )
    print()
    print("| map | channels | count | pass | XLA library | jfcnn ms | PyTorch ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    totals = Counter()
    for (size, cin, cout), count in sorted(convs.items(), key=lambda kv: (-kv[0][0], kv[0][1:])):
        x = rng.standard_normal((args.batch_size, size, size, cin), np.float32)
        w = rng.standard_normal((3, 3, cin, cout), np.float32) * (2 / (9 * cin)) ** 0.5
        dy = rng.standard_normal((args.batch_size, size, size, cout), np.float32)
        jax_args = [jax.numpy.asarray(a) for a in (x, w, dy)]
        torch_args = torch_inputs(x, w, dy)
        for name, jitted in jax_fns.items():
            if name == "input grad" and cin == args.channels and size == args.image_size:
                continue  # the images need no gradient
            compiled = jitted.lower(*jax_args).compile()  # timed below: compiled once
            library = "YNNPACK" if "__ynn_fusion" in compiled.as_text() else "Eigen"
            torch_fn = torch_fns[name](*torch_args)
            for _ in range(2):  # warm-up
                jax.block_until_ready(compiled(*jax_args))
                torch_fn()
            jax_fn = partial(compiled, *jax_args)
            jax_ms, torch_ms = [], []
            for _ in range(args.repeats):
                jax_ms.append(time_ms(jax_fn, jax.block_until_ready))
                torch_ms.append(time_ms(torch_fn, lambda out: out))
            j, t = statistics.median(jax_ms), statistics.median(torch_ms)
            totals[(name, "jfcnn")] += count * j
            totals[(name, "torch")] += count * t
            totals[(library, "jfcnn")] += count * j
            totals[(library, "torch")] += count * t
            print(
                f"| {size}x{size} | {cin}->{cout} | {count} | {name} | {library} | {j:.2f} | "
                f"{t:.2f} | {t / j:.2f}x |"
            )
    print()
    print("Per step (each convolution times its count), ms:")
    print()
    print("| | jfcnn | PyTorch | ratio |")
    print("|---|---|---|---|")
    for key in ("forward", "input grad", "filter grad", "YNNPACK", "Eigen"):
        j, t = totals[(key, "jfcnn")], totals[(key, "torch")]
        if j:
            label = key if key not in ("YNNPACK", "Eigen") else f"passes XLA runs with {key}"
            print(f"| {label} | {j:.1f} | {t:.1f} | {t / j:.2f}x |")
    j = sum(totals[(k, "jfcnn")] for k in ("forward", "input grad", "filter grad"))
    t = sum(totals[(k, "torch")] for k in ("forward", "input grad", "filter grad"))
    print(f"| all | {j:.1f} | {t:.1f} | {t / j:.2f}x |")


if __name__ == "__main__":
    main()
