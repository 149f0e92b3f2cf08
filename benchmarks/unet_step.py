"""U-Net training-step throughput: jfcnn (Flax + Optax, jit) against PyTorch, side by side.

Both sides train the same architecture (jfcnn's `UNet` and `TorchUNet` below,
which `tests/models/test_unet.py` checks compute the same function given the
same weights) with Adam and softmax cross-entropy on the same random batch, on
the same CPU threads. Repeats alternate between the two frameworks and the
medians are compared, so load from other processes hits both alike. Defaults
follow `configs/unet.py` (64x64 images, batch 16, depth 3, base width 16,
4 classes, GroupNorm).

    python benchmarks/unet_step.py
    python benchmarks/unet_step.py --batch_size=8 --image_size=128 --repeats=7
    python benchmarks/unet_step.py --cpu_devices=2  # the batch sharded over 2 CPU devices

Also reports jfcnn's achieved FLOP/s (XLA's cost analysis of the compiled step
over its median time) and, when `jfcnn.data` provides `create_train_iterator`,
the input pipeline's images/s (`--no-data` skips it).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfcnn.models.layers import group_norm_groups
from jfcnn.models.unet import UNet


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--base_width", type=int, default=16)
    parser.add_argument("--norm", choices=("group", "batch", "none"), default="group")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="jfcnn compute dtype (PyTorch always runs float32).",
    )
    parser.add_argument(
        "--cpu_devices",
        type=int,
        default=1,
        help=(
            "Split the host CPU into this many JAX devices (jax_num_cpu_devices) and shard the "
            "batch over them with jit, as parallelism='jit' training does."
        ),
    )
    parser.add_argument("--steps", type=int, default=5, help="Training steps per timed repeat.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per framework.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per framework.")
    parser.add_argument(
        "--torch_threads",
        default="0,1",
        help=(
            "Comma-separated torch.set_num_threads values, each timed (interleaved) as its own "
            "PyTorch row; 0 is PyTorch's default (all cores). The headline ratio is against "
            "the fastest row: on a loaded machine PyTorch's OpenMP threads can stall each "
            "other badly, so its default alone can understate it."
        ),
    )
    parser.add_argument(
        "--torch_channels_last",
        action="store_true",
        help="Run PyTorch in channels_last memory format.",
    )
    parser.add_argument(
        "--data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also time jfcnn.data's training input pipeline.",
    )
    parser.add_argument("--data_dir", default=None, help="TFDS data dir for --data.")
    parser.add_argument("--data_batches", type=int, default=30)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# PyTorch U-Net with jfcnn's architecture (layer for layer, same names).


def _torch_modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    def norm_layer(norm, channels):
        if norm == "group":
            return nn.GroupNorm(group_norm_groups(channels), channels, eps=1e-5)
        if norm == "batch":
            return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
        return nn.Identity()

    class DoubleConv(nn.Module):
        def __init__(self, cin, cout, norm):
            super().__init__()
            bias = norm == "none"
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
            self.norm1 = norm_layer(norm, cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
            self.norm2 = norm_layer(norm, cout)

        def forward(self, x):
            x = F.relu(self.norm1(self.conv1(x)))
            return F.relu(self.norm2(self.conv2(x)))

    class TorchUNet(nn.Module):
        """PyTorch twin of `jfcnn.models.UNet` (NCHW in, NCHW logits out)."""

        def __init__(
            self,
            in_channels,
            num_classes,
            *,
            depth=3,
            base_width=16,
            up_kernel_size=2,
            up_stride=2,
            up_padding=0,
            norm="group",
        ):
            super().__init__()
            self.depth = depth
            widths = [base_width * 2**level for level in range(depth + 1)]
            cin = in_channels
            for level in range(depth):
                self.add_module(f"down_{level}", DoubleConv(cin, widths[level], norm))
                cin = widths[level]
            self.bottleneck = DoubleConv(cin, widths[depth], norm)
            for level in range(depth):
                self.add_module(
                    f"up_{level}",
                    nn.ConvTranspose2d(
                        widths[level + 1],
                        widths[level],
                        up_kernel_size,
                        stride=up_stride,
                        padding=up_padding,
                    ),
                )
                self.add_module(f"dec_{level}", DoubleConv(2 * widths[level], widths[level], norm))
            self.head = nn.Conv2d(base_width, num_classes, 1)

        def forward(self, x):
            skips = []
            for level in range(self.depth):
                x = getattr(self, f"down_{level}")(x)
                skips.append(x)
                x = F.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for level in reversed(range(self.depth)):
                x = F.relu(getattr(self, f"up_{level}")(x))
                skip = skips[level]
                dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
                x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
                x = torch.cat([skip, x], dim=1)
                x = getattr(self, f"dec_{level}")(x)
            return self.head(x)

    return TorchUNet


def __getattr__(name):
    # Lazy so that importing this file (e.g. from the tests) does not need torch.
    if name == "TorchUNet":
        return _torch_modules()
    raise AttributeError(name)


def copy_params_to_torch(params, torch_model) -> None:
    """Copies jfcnn UNet params into a `TorchUNet` (kernels permuted to PyTorch layouts)."""
    import torch

    state = {}
    for module_name, module_params in params.items():
        flat = {}
        for layer, leaves in module_params.items():
            if isinstance(leaves, dict):
                for leaf, value in leaves.items():
                    flat[f"{layer}.{leaf}"] = value
            else:
                flat[layer] = leaves
        for key, value in flat.items():
            value = np.array(value, np.float32)  # a writable copy for torch.from_numpy
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "kernel":
                # Conv (KH, KW, Cin, Cout) -> (Cout, Cin, KH, KW);
                # ConvTranspose (KH, KW, Cin, Cout) -> (Cin, Cout, KH, KW).
                value = value.transpose(
                    (2, 3, 0, 1) if module_name.startswith("up_") else (3, 2, 0, 1)
                )
                key = key[: -len("kernel")] + "weight"
            elif leaf == "scale":
                key = key[: -len("scale")] + "weight"
            state[f"{module_name}.{key}"] = torch.from_numpy(np.ascontiguousarray(value))
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    missing = [
        k for k in missing if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    if missing or unexpected:
        raise ValueError(f"param mismatch: missing {missing}, unexpected {unexpected}")


# ---------------------------------------------------------------------------


def make_jax_step(model: UNet, tx: optax.GradientTransformation):
    has_batch_stats = model.norm == "batch"

    def loss_fn(params, batch_stats, images, labels):
        variables = {"params": params}
        if has_batch_stats:
            variables["batch_stats"] = batch_stats
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            logits = model.apply(variables, images, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, batch_stats

    @partial(jax.jit, donate_argnums=(0,))
    def train_step(state, images, labels):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return train_step


def flops_of(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def time_steps(run_one, sync, steps: int, faults: list | None = None) -> float:
    """Seconds for ``steps`` steps; appends (page faults, system CPU s) per step to ``faults``."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(steps):
        run_one()
    sync()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if faults is not None:
        faults.append(
            (
                (after.ru_minflt - before.ru_minflt) / steps,
                (after.ru_stime - before.ru_stime) / steps,
            )
        )
    return seconds


def time_input_pipeline(args) -> tuple[float | None, str]:
    try:
        import ml_collections

        from jfcnn.data import create_train_iterator, default_config
    except ImportError as error:
        return None, f"skipped: jfcnn.data has no train iterator yet ({error})"
    data_config = default_config()
    data_config.image_size = args.image_size
    if args.data_dir is not None:
        data_config.data_dir = args.data_dir
    config = ml_collections.ConfigDict(
        {"seed": 0, "batch_size": args.batch_size, "data": data_config}
    )
    iterator = create_train_iterator(config)
    for _ in range(3):  # builds the data set on first use, fills cache and prefetch
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.data_batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return args.data_batches * args.batch_size / seconds, f"{args.data_batches} batches"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import torch

    default_threads = torch.get_num_threads()
    thread_counts = [int(t) or default_threads for t in args.torch_threads.split(",")]
    thread_counts = list(dict.fromkeys(thread_counts))
    TorchUNet = _torch_modules()

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, args.channels)
    images_np = rng.random(shape, dtype=np.float32)
    labels_np = rng.integers(0, args.num_classes, shape[:3]).astype(np.int32)

    # jfcnn.
    model = UNet(
        num_classes=args.num_classes,
        depth=args.depth,
        base_width=args.base_width,
        norm=args.norm,
        dtype=jnp.dtype(args.dtype),
    )
    images, labels = jnp.asarray(images_np), jnp.asarray(labels_np)
    if args.cpu_devices > 1:
        from jfcnn.train_state import batch_sharded, replicated

        images, labels = jax.device_put((images, labels), batch_sharded())
    t0 = time.perf_counter()
    variables = jax.jit(partial(model.init, train=False))(jax.random.key(0), images)
    params = variables["params"]
    tx = optax.adam(1e-3)
    state = (params, variables.get("batch_stats", {}), tx.init(params))
    if args.cpu_devices > 1:
        state = jax.device_put(state, replicated())
    train_step = make_jax_step(model, tx)
    compiled = train_step.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - t0
    flops = flops_of(compiled)
    jax_state = {"state": state}

    def jax_one():
        jax_state["state"], jax_state["loss"] = train_step(jax_state["state"], images, labels)

    def jax_sync():
        jax.block_until_ready(jax_state["state"])

    # PyTorch, same initial weights.
    torch_model = TorchUNet(
        args.channels,
        args.num_classes,
        depth=args.depth,
        base_width=args.base_width,
        norm=args.norm,
    )
    copy_params_to_torch(params, torch_model)
    torch_model.train()
    images_t = torch.from_numpy(images_np.transpose(0, 3, 1, 2).copy())
    labels_t = torch.from_numpy(labels_np.astype(np.int64))
    if args.torch_channels_last:
        torch_model = torch_model.to(memory_format=torch.channels_last)
        images_t = images_t.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-3)

    def torch_one():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(torch_model(images_t), labels_t)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        jax_one()
    jax_sync()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for _ in range(args.warmup):
            torch_one()
    jax_times, torch_times = [], {threads: [] for threads in thread_counts}
    jax_faults, torch_faults = [], {threads: [] for threads in thread_counts}
    for _ in range(args.repeats):
        jax_times.append(time_steps(jax_one, jax_sync, args.steps, jax_faults))
        for threads in thread_counts:
            torch.set_num_threads(threads)
            torch_times[threads].append(
                time_steps(torch_one, lambda: None, args.steps, torch_faults[threads])
            )
    torch.set_num_threads(default_threads)

    per_repeat = args.steps * args.batch_size
    jax_ips = per_repeat / statistics.median(jax_times)
    torch_ips_by_threads = {t: per_repeat / statistics.median(v) for t, v in torch_times.items()}
    best_threads = max(torch_ips_by_threads, key=torch_ips_by_threads.get)
    torch_ips = torch_ips_by_threads[best_threads]
    step_s = statistics.median(jax_times) / args.steps

    # Settings that change the step's speed, as set for this run.
    settings = [name for name in ("XLA_FLAGS", "GLIBC_TUNABLES") if name in os.environ]
    environment = "".join(f", {name}={os.environ[name]}" for name in settings)
    print(
        f"U-Net train step: batch {args.batch_size}, {args.image_size}x{args.image_size}x"
        f"{args.channels}, {args.num_classes} classes, depth {args.depth}, base width "
        f"{args.base_width}, norm {args.norm}, jfcnn dtype {args.dtype}; {args.repeats} "
        f"interleaved repeats x {args.steps} steps; jax {jax.__version__} on "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s) ({os.cpu_count()} cores"
        f"{environment}), "
        f"torch {torch.__version__}"
        f"{' channels_last' if args.torch_channels_last else ''}; ratios are to the fastest "
        f"PyTorch row."
    )
    print()
    # Page faults and the kernel's CPU time per step: memory the step's allocator
    # maps afresh each step is faulted in page by page (README, U-Net benchmark).
    print(
        "| | images/s (median) | min..max images/s | ratio to PyTorch | page faults per step "
        "| system CPU ms per step |"
    )
    print("|---|---|---|---|---|---|")
    rows = [("jfcnn (jit)", jax_times, jax_faults)]
    rows += [
        (f"PyTorch, {t} thread{'s' * (t > 1)}", torch_times[t], torch_faults[t])
        for t in thread_counts
    ]
    for name, times, faults in rows:
        ips = per_repeat / statistics.median(times)
        lo, hi = per_repeat / max(times), per_repeat / min(times)
        page_faults = statistics.median(f for f, _ in faults)
        system_ms = statistics.median(s for _, s in faults) * 1e3
        print(
            f"| {name} | {ips:.1f} | {lo:.1f}..{hi:.1f} | {ips / torch_ips:.2f}x | "
            f"{page_faults:.0f} | {system_ms:.1f} |"
        )
    if flops is not None:
        print(
            f"| jfcnn FLOP/s | {flops / step_s / 1e9:.1f} GFLOP/s | {flops / 1e9:.2f} GFLOP "
            f"per step (XLA cost analysis) | | | |"
        )
    print(f"| jfcnn init + compile | {compile_s:.1f} s | | | | |")
    if args.data:
        try:
            data_ips, note = time_input_pipeline(args)
        except Exception as error:  # the pipeline is optional here; report, do not fail
            data_ips, note = None, f"skipped: {type(error).__name__}: {error}"
        if data_ips is None:
            print(f"| input pipeline | {note} | | | | |")
        else:
            print(
                f"| input pipeline (jfcnn.data) | {data_ips:.1f} | {note} | "
                f"{data_ips / jax_ips:.1f}x jfcnn step | | |"
            )
    print()
    ratios = ", ".join(
        f"{jax_ips / ips:.2f} vs {t} threads" for t, ips in torch_ips_by_threads.items()
    )
    print(f"ratio jfcnn / PyTorch: {jax_ips / torch_ips:.2f} (fastest PyTorch; {ratios})")


if __name__ == "__main__":
    main()
