"""The training loop shared by every jfcnn task.

``train_and_evaluate(config, workdir)`` builds the task's model, an Optax
optimizer, the tf.data input pipeline and an Orbax checkpoint manager, then
runs ``train_step`` under ``jax.jit`` (batch sharded over a 1-D ``data`` mesh
of all devices, parameters replicated) or ``jax.pmap`` (``pmean`` of the
gradients), evaluating and checkpointing on a fixed schedule.

Resuming is exact: a run that is killed after a checkpoint, or stopped with
SIGTERM (which saves the current step and exits cleanly, as on a preempted TPU
VM), and then restarted with the same command ends with bit-identical
parameters to an uninterrupted run, because the state, the RNG and the data
position (a function of ``seed`` and the step) are all restored.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jfcnn import checkpoint as ckpt
from jfcnn import data as data_lib
from jfcnn import evaluate as evaluate_lib
from jfcnn import finetune, tasks
from jfcnn import train_state as state_lib
from jfcnn import weights as weights_lib
from jfcnn import workdir as workdir_lib
from jfcnn.errors import (
    CheckpointMismatchError,
    ConfigError,
    NonFiniteLossError,
    TrainingInterrupted,
)
from jfcnn.train_state import TrainState

PMAP_AXIS = "batch"
# Compiler options for programs that run once, where compile time dominates.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Training steps dispatched but not finished at any time: enough to keep the
# device busy, few enough that a SIGTERM is answered within about two steps.
MAX_STEPS_IN_FLIGHT = 2


# ---------------------------------------------------------------------------
# Optimizers


def create_learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    lr, steps = config.learning_rate, max(config.num_train_steps, 1)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(lr)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=steps)
    warmup = min(config.warmup_steps, steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=steps
    )


def frozen_param_paths(model: Any) -> tuple[tuple[str, ...], ...]:
    """Param subtrees of ``model`` that training leaves unchanged.

    The backbone layers a pretrained model keeps fixed
    (``MaskRCNN.frozen_param_paths``, from ``model.trainable_backbone_layers``);
    none for a model without the notion.
    """
    return tuple(getattr(model, "frozen_param_paths", ()))


def _frozen_labels(frozen: tuple[tuple[str, ...], ...], params: Any) -> Any:
    def label(path, _) -> str:
        keys = tuple(str(getattr(entry, "key", entry)) for entry in path)
        return "frozen" if any(keys[: len(p)] == p for p in frozen) else "trained"

    return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(
    config: ml_collections.ConfigDict, *, frozen: tuple[tuple[str, ...], ...] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of ``config`` and its learning-rate schedule.

    Params under a ``frozen`` path (see :func:`frozen_param_paths`) get zero
    updates and no optimizer state: they are outside the optimizer
    (``optax.multi_transform`` with ``set_to_zero``), so neither weight decay
    nor momentum moves them, and gradient clipping measures only the trained
    params' gradients, as in PyTorch where frozen params have no gradient.
    """
    schedule = create_learning_rate_schedule(config)
    if config.optimizer == "adam":
        tx = optax.adam(schedule)
    elif config.optimizer == "adamw":
        tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    else:
        tx = optax.sgd(schedule, momentum=config.momentum or None, nesterov=False)
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    if frozen:
        tx = optax.multi_transform(
            {"trained": tx, "frozen": optax.set_to_zero()},
            functools.partial(_frozen_labels, tuple(frozen)),
        )
    return tx, schedule


# ---------------------------------------------------------------------------
# The step


def _all_finite(tree: Any) -> jax.Array:
    """True if every floating-point entry of ``tree`` is finite (a bool scalar)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def make_train_step(
    task, tx: optax.GradientTransformation, schedule: optax.Schedule, *, axis_name=None
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns the pure ``train_step(state, batch) -> (state, metrics)``.

    With ``axis_name`` the step runs per device under ``pmap`` and averages
    gradients, loss and model state across devices. Either way a step whose
    loss, gradients or new state (parameters, optimizer and model state) are
    not all finite leaves the state unchanged and reports ``finite=False``, so
    a NaN or Inf never reaches the state or a checkpoint.
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        local_batch = batch["image"].shape[0]
        step_rng = jax.random.fold_in(state.rng, state.step)
        # One key per example of the global batch, so a stochastic loss gives
        # the same result whatever the number of devices.
        if axis_name is None:
            example_keys = jax.random.split(step_rng, local_batch)
        else:
            shards = jax.lax.psum(1, axis_name)
            all_keys = jax.random.split(step_rng, local_batch * shards)
            start = jax.lax.axis_index(axis_name) * local_batch
            example_keys = jax.lax.dynamic_slice_in_dim(all_keys, start, local_batch)

        def loss_fn(params):
            return task.loss_fn(params, state.model_state, batch, example_keys)

        (loss, (model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        if axis_name is not None:
            grads, loss, metrics, model_state = jax.lax.pmean(
                (grads, loss, metrics, model_state), axis_name
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
        )
        # Every leaf that would replace the old state is checked, not only the
        # loss and gradients: batch-norm statistics or optimizer moments can
        # overflow while the loss is still finite.
        finite = jnp.isfinite(loss) & _all_finite((grads, new_state))
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = dict(metrics, loss=loss, learning_rate=schedule(state.step), finite=finite)
        return new_state, metrics

    return train_step


# ---------------------------------------------------------------------------
# Parallelism: how the same step is wrapped and fed


class JitParallelism:
    """Batch sharded over a ``data`` mesh of all devices, state replicated."""

    name = "jit"
    axis_name = None

    def __init__(self):
        self.mesh = state_lib.data_mesh()
        self.replicated = state_lib.replicated(self.mesh)
        self.data_sharding = state_lib.batch_sharded(self.mesh)
        self.num_devices = len(jax.devices())

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), batch
        )

    def compile_step(self, step_fn):
        jitted = jax.jit(step_fn, donate_argnums=0)

        def step(*args):
            # With the mesh set, per-image ops run on each device's own images
            # (jfcnn.ops: ROI Align's gather kernels, which XLA cannot partition).
            with jax.set_mesh(self.mesh):
                return jitted(*args)

        return step

    def put_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.replicated)

    def unreplicate(self, state: TrainState) -> TrainState:
        return state

    def host_metrics(self, metrics: dict) -> dict:
        return jax.device_get(metrics)


class PmapParallelism:
    """One state copy per local device; the step ``pmean``s its gradients."""

    name = "pmap"
    axis_name = PMAP_AXIS

    def __init__(self):
        self.num_devices = jax.local_device_count()

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = self.num_devices
        return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

    def compile_step(self, step_fn):
        return jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=0)

    def put_state(self, state: TrainState) -> TrainState:
        if jax.process_count() > 1:
            # A restored state spans every process's devices; pmap takes this
            # process's copy of it (its step pmeans across processes).
            state = jax.tree.map(
                lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, state
            )
        # One copy per local device, placed as pmap places its own inputs and
        # outputs: a state placed otherwise is resharded by the first call, and
        # the step (minutes for a large model) compiles twice, once per placement.
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (PMAP_AXIS,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(PMAP_AXIS))
        return jax.device_put(flax.jax_utils.replicate(state), sharding)

    def unreplicate(self, state: TrainState) -> TrainState:
        state = flax.jax_utils.unreplicate(state)
        if jax.process_count() > 1:
            # Each process's copy is host-local, which Orbax cannot save and
            # evaluation cannot spread over all devices: the same values as one
            # array replicated over every process's devices, as under jit.
            sharding = state_lib.replicated()
            state = jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), state
            )
        return state

    def host_metrics(self, metrics: dict) -> dict:
        return jax.tree.map(lambda x: x[0], jax.device_get(metrics))


def get_parallelism(config: ml_collections.ConfigDict):
    parallelism = JitParallelism() if config.parallelism == "jit" else PmapParallelism()
    # The global batch: each process reads batch_size / process_count examples and
    # splits them over its local devices, so every device of every process gets
    # the same share (jit's global device count, pmap's local one, alike).
    devices, processes = jax.device_count(), jax.process_count()
    if config.batch_size % devices or config.batch_size % processes:
        where = f"{devices} devices" + (f" in {processes} processes" if processes > 1 else "")
        raise ConfigError(
            f"Config key `batch_size` is {config.batch_size}; with {config.parallelism} on "
            f"{where} it must be a multiple of {devices}."
        )
    if (config.batch_size // processes) % jax.local_device_count():
        raise ConfigError(
            f"Config key `batch_size` is {config.batch_size}; each of the {processes} "
            f"processes gets {config.batch_size // processes} examples, which its "
            f"{jax.local_device_count()} devices cannot share equally; use processes with "
            "the same number of devices."
        )
    return parallelism


# ---------------------------------------------------------------------------
# Preemption


class PreemptionHandler(contextlib.AbstractContextManager):
    """Turns SIGTERM and SIGINT into a request to checkpoint and stop after a step.

    SIGTERM is how a preempted cloud VM (or a scheduler) asks a job to stop; a
    run that answers it saves the current step and exits 0, to be resumed.
    SIGINT (Ctrl-C) does the same, and the run then exits non-zero: a person
    stopped it. Further SIGTERMs are ignored, so a second one cannot abort the
    save; a second Ctrl-C exits at once (Orbax writes each checkpoint into a
    temporary directory, so an abandoned save leaves none half-written).

    In a multi-process run every process takes part in the checkpoint, so all
    must stop after the same step: JAX's preemption sync point
    (``multihost_utils.reached_preemption_sync_point``) agrees on it. There
    JAX's runtime owns SIGTERM: a SIGTERM to any process (or to all, as a TPU
    maintenance event sends) reaches every process through the coordinator,
    and all stop after the first step that none had finished when it came. A
    Ctrl-C is handed to JAX as a SIGTERM to this process, so it stops the
    whole run the same way (and this process then exits non-zero).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, across_processes: bool | None = None):
        if across_processes is None:
            across_processes = jax.process_count() > 1
        self.across_processes = across_processes
        self.signal: int | None = None  # The first signal this process received.
        self.requested_at = math.nan  # time.monotonic() of that signal.
        self._previous: dict[int, Any] = {}
        self._first_step: int | None = None

    @property
    def requested(self) -> bool:
        """Whether this process received a signal (in a multi-process run, a Ctrl-C)."""
        return self.signal is not None

    @property
    def signal_name(self) -> str:
        """The signal that stops the run: this process's, else the SIGTERM JAX received."""
        return signal.Signals(self.signal or signal.SIGTERM).name

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint and stop after ``step``.

        Called once after every step, with consecutive steps; in a multi-process
        run every process gets the same answer for the same step.
        """
        if not self.across_processes:
            return self.requested
        from jax.experimental import multihost_utils

        if self._first_step is None:
            self._first_step = step
        # JAX counts from 0 before the first call and stops one past the highest count
        # any process reported: a notice that comes before the loop (all still at 0)
        # then stops after this run's first step, which the global step (a resumed
        # run starts past 1) never would.
        return multihost_utils.reached_preemption_sync_point(step - self._first_step + 1)

    def _handle(self, signum, frame):
        del frame
        if self.signal is None:
            self.signal, self.requested_at = signum, time.monotonic()
            logging.warning(
                "Received %s: saving a checkpoint and stopping.", signal.Signals(signum).name
            )
            if self.across_processes:
                # JAX tells the other processes of a SIGTERM (its handler, not ours).
                os.kill(os.getpid(), signal.SIGTERM)
        elif signum == signal.SIGINT:
            print("error: interrupted twice; exiting without a checkpoint.", file=sys.stderr)
            os._exit(130)
        else:
            logging.warning("Received %s again; still saving.", signal.Signals(signum).name)

    def __enter__(self):
        # In a multi-process run SIGTERM stays with JAX's preemption notifier.
        signals = (signal.SIGINT,) if self.across_processes else self.SIGNALS
        try:
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # Not the main thread: leave signals alone.
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if signum == signal.SIGTERM == self.signal and previous == signal.SIG_DFL:
                # The run is saved and on its way out: a repeated notice (a scheduler
                # often sends several) must not turn its exit 0 into a kill.
                previous = signal.SIG_IGN
            signal.signal(signum, previous)
        return False


# ---------------------------------------------------------------------------
# Logging


TRAIN_LOG = "train_log.jsonl"


class SummaryWriter:
    """TensorBoard event files via ``tf.summary`` and ``<workdir>/train_log.jsonl``.

    The JSON-lines log holds one record per logged step (``step``, ``loss``,
    ``learning_rate``, ``steps_per_sec``, ...), per evaluation (``step``,
    ``eval``) and per stop (``step``, ``event``): the same numbers as the text
    log, for scripts and tests. Resuming appends to it. Process 0 writes both.
    """

    def __init__(self, workdir: str):
        self._writer = None
        self._log_path = os.path.join(workdir, TRAIN_LOG)
        if jax.process_index() == 0:
            import tensorflow as tf

            self._tf = tf
            self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def record(self, values: dict[str, Any]) -> None:
        """Appends one JSON record to the run's ``train_log.jsonl``."""
        if self._writer is None:
            return
        with open(self._log_path, "a") as f:
            f.write(json.dumps(evaluate_lib.json_safe(values), sort_keys=True) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default():
            for name, value in values.items():
                if np.isscalar(value) and np.isfinite(value):
                    self._tf.summary.scalar(name, float(value), step=step)
        self._writer.flush()

    def images(self, step: int, name: str, images: list[np.ndarray]) -> None:
        if self._writer is None or not images:
            return
        with self._writer.as_default():
            self._tf.summary.image(name, np.stack(images), step=step, max_outputs=len(images))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------
# The loop


def _save_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
    """Saves the config; a different config already there is kept as a backup."""
    path = os.path.join(workdir, ckpt.CONFIG_FILE)
    if jax.process_index() == 0 and os.path.exists(path):
        with open(path) as f:
            previous = f.read()
        if previous != config.to_json_best_effort(indent=2, sort_keys=True):
            backup = os.path.join(workdir, f"config.before_step_{step}.{int(time.time())}.json")
            os.replace(path, backup)
            logging.warning("The config changed since the last run; the old one is in %s", backup)
    ckpt.save_config(workdir, config)


def _load_backbone_weights(config, state: TrainState) -> TrainState:
    """``state`` with ``config.model.backbone_weights`` (a torchvision ResNet) in its backbone."""
    path = config.model.get("backbone_weights")
    if not path:
        return state
    # The C4 design runs res5 in its ROI heads (a top-level `res5`): torchvision's
    # layer4 goes there.
    moved = ("res5",) if "res5" in state.params and "res5" not in state.params["backbone"] else ()
    trees = {"params": state.params, **state.model_state}
    expected = {
        collection: {**tree["backbone"], **{name: tree[name] for name in moved if name in tree}}
        for collection, tree in trees.items()
        if "backbone" in tree
    }
    converted = weights_lib.resnet_variables(
        weights_lib.read_state_dict(path), expected, source=path
    )
    converted = jax.tree.map(jnp.asarray, converted)
    for collection, tree in converted.items():
        top = {name: tree.pop(name) for name in moved if name in tree}
        trees[collection] = {**trees[collection], "backbone": tree, **top}
    params = trees.pop("params")
    model_state = trees
    logging.info("Loaded the backbone weights of %s.", path)
    return state.replace(params=params, model_state=model_state)


def _restore_or_init(config, task, tx, parallelism, manager) -> TrainState:
    # The newest intact checkpoint: a damaged one is named, moved aside (never
    # deleted) and the one before it is used.
    try:
        state = state_lib.restore_latest_intact(manager, task, tx)
    except CheckpointMismatchError:
        # A step-0 checkpoint (converted pretrained weights) holds no optimizer
        # progress: fine-tuning it with another optimizer, or other frozen
        # layers, starts that optimizer afresh on its variables; on a data set
        # with other classes, its class rows are mapped (jfcnn.finetune).
        if ckpt.latest_step(manager) != 0:
            raise
        variables = finetune.step0_variables(config, task, manager)
        state = state_lib.state_at_step_0(
            variables, tx, jax.random.split(jax.random.PRNGKey(config.seed))[1]
        )
        logging.info("Fine-tuning the step-0 checkpoint with a fresh optimizer state.")
    if state is None:
        rng = jax.random.PRNGKey(config.seed)
        init = jax.jit(functools.partial(state_lib.create_train_state, task, tx))
        # Initialization runs once: XLA's optimizing backend compiles the random
        # initializers for far longer than the unoptimized one needs to run them.
        state = init.lower(rng).compile(compiler_options=FAST_COMPILE)(rng)
        # Pretrained weights enter at step 0 only: a resumed run keeps what it learned.
        state = _load_backbone_weights(config, state)
    else:
        logging.info("Resuming from the checkpoint at step %d.", int(state.step))
    return parallelism.put_state(state)


def _non_finite_message(config, manager, step: int, loss: float) -> str:
    latest = ckpt.latest_step(manager)
    saved = (
        f"the last checkpoint in {manager.directory} (step {latest}) is intact"
        if latest is not None
        else "no checkpoint had been written yet"
    )
    fixes = ["lower `learning_rate`"]
    if not config.grad_clip_norm:
        fixes.append("set `grad_clip_norm`")
    fixes.append("check the data")
    return (
        f"The loss, gradients or new state became NaN/Inf at step {step} (loss={loss}). "
        f"Training stopped; that step was not applied, and {saved}. "
        f"To fix: {', '.join(fixes[:-1])} or {fixes[-1]}."
    )


# Called as progress(step, num_train_steps, metrics) each time training metrics are logged.
ProgressFn = Callable[[int, int, dict[str, float]], None]


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

    Everything a user can get wrong (config keys, the data set, the work
    directory, a run already training there, a directory trained with another
    model) is checked before any file is written.

    ``progress``, if given, is called as ``progress(step, num_train_steps,
    metrics)`` in every process each time the training metrics are logged
    (every ``log_every_steps``, and before each evaluation and checkpoint),
    with ``step`` the number of steps done and ``metrics`` the means since the
    previous call (``loss``, ``learning_rate``, ``steps_per_sec``, ... as
    floats), e.g. to drive a progress bar in a notebook.

    Returns the metrics of the final evaluation (``{"step", "preempted"}`` when
    SIGTERM stopped the run).
    """
    tasks.validate_config(config)
    data_lib.get_spec(config.data.name)  # An unknown data set stops before any file is written.
    config = _absolute_data_paths(config)
    config = _check_backbone_weights(config)
    workdir_lib.check(workdir)  # Before the data set is built; creates nothing.
    parallelism = get_parallelism(config)
    metadata = data_lib.dataset_metadata(config)  # Raises if the data set is not prepared.
    workdir = workdir_lib.prepare(workdir)
    lock = workdir_lib.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        _check_same_model(workdir, config)
        return _train(config, workdir, parallelism, metadata, progress)


def _check_backbone_weights(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``model.backbone_weights`` made absolute; a missing file stops here."""
    path = config.model.get("backbone_weights")
    if not path:
        return config
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"Config key `model.backbone_weights` is {path!r}; no such file.")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.backbone_weights = path
    return config


# config.data keys that name files or directories.
_DATA_PATH_KEYS = (
    "data_dir",
    "folder",
    "train_annotations",
    "train_images",
    "eval_annotations",
    "eval_images",
)


def _absolute_data_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with relative data paths made absolute.

    The saved config.json is read later by evaluation from any directory; a
    path relative to where training started would point elsewhere then.
    """
    relative = {
        key: config.data[key]
        for key in _DATA_PATH_KEYS
        if isinstance(config.data.get(key), str)
        and not os.path.isabs(config.data[key])
        and "://" not in config.data[key]  # gs://bucket/tfds and other remote paths
    }
    if not relative:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, path in relative.items():
            config.data[key] = os.path.abspath(os.path.expanduser(path))
    return config


def _check_same_model(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Stops a resume whose config builds another task or model than the saved run."""
    path = os.path.join(workdir, ckpt.CONFIG_FILE)
    if not os.path.exists(path):
        return
    saved = ckpt.load_config(workdir)
    before = (saved.get("task"), saved.get("model", {}).get("name"))
    now = (config.task, config.model.name)
    if before != now and os.path.isdir(ckpt.checkpoint_dir(workdir)):
        raise ConfigError(
            f"{workdir} holds a run of task {before[0]!r} with model {before[1]!r} (see {path}), "
            f"but this config trains task {now[0]!r} with model {now[1]!r}. Resume it with the "
            "config it was trained with, or use a new --workdir."
        )


def _train(
    config, workdir: str, parallelism, metadata, progress: ProgressFn | None = None
) -> dict[str, Any]:
    task = tasks.get_task(config, metadata, axis_name=parallelism.axis_name)
    tx, schedule = create_optimizer(config, frozen=frozen_param_paths(task.model))

    manager = ckpt.create_manager(workdir, max_to_keep=config.keep_checkpoints)
    state = _restore_or_init(config, task, tx, parallelism, manager)
    start_step = int(jax.device_get(parallelism.unreplicate(state).step))
    _save_config(workdir, config, start_step)
    # Evaluation and prediction read these facts from the work directory, not the data set.
    ckpt.save_metadata(workdir, metadata.to_dict())

    train_step = parallelism.compile_step(
        make_train_step(task, tx, schedule, axis_name=parallelism.axis_name)
    )
    writer = SummaryWriter(workdir)
    eval_metrics: dict[str, Any] = {}
    num_steps = config.num_train_steps
    logging.info(
        "Training %s/%s for %d steps from step %d on %d %s device(s) with %s.",
        config.task,
        config.model.name,
        num_steps,
        start_step,
        jax.device_count(),
        jax.devices()[0].platform,
        parallelism.name,
    )
    writer.record(
        {
            "step": start_step,
            "event": "start",
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform,
            "parallelism": parallelism.name,
        }
    )

    def run_eval(step: int) -> dict[str, Any]:
        variables = parallelism.unreplicate(state).variables()
        result, images = evaluate_lib.run_evaluation(config, task, variables)
        result["step"] = step
        logging.info("eval step %d: %s", step, evaluate_lib.format_metrics(result))
        writer.scalars(step, {f"eval/{k}": v for k, v in result.items()})
        writer.images(step, "eval/input_truth_prediction", images)
        writer.record({"step": step, "eval": result})
        return result

    train_iter: Iterator[dict[str, np.ndarray]] = data_lib.create_train_iterator(
        config, start_step=start_step, instances=task.needs_instances
    )
    pending: list[tuple[int, dict]] = []
    timer_step, timer_start = start_step, time.perf_counter()

    def flush_metrics(step: int) -> None:
        """Fetches the metrics of the steps since the last flush; stops on NaN."""
        nonlocal pending, timer_step, timer_start
        if not pending:
            return
        fetched = [(s, parallelism.host_metrics(m)) for s, m in pending]
        pending = []
        for s, m in fetched:
            if not bool(m["finite"]):
                raise NonFiniteLossError(_non_finite_message(config, manager, s, m["loss"]))
        mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        mean.pop("finite")
        now = time.perf_counter()
        steps_per_sec = (step - timer_step) / max(now - timer_start, 1e-9)
        timer_step, timer_start = step, now
        eta = (num_steps - step) / steps_per_sec if steps_per_sec > 0 else math.inf
        logging.info(
            "step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  %.1f images/s  ETA %s",
            step,
            num_steps,
            mean["loss"],
            mean["learning_rate"],
            steps_per_sec,
            steps_per_sec * config.batch_size,
            _format_duration(eta) if math.isfinite(eta) else "?",
        )
        mean.update(steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * config.batch_size)
        writer.scalars(step, {f"train/{k}": v for k, v in mean.items()})
        writer.record({"step": step, **mean})
        if progress is not None:
            progress(step, num_steps, mean)

    with PreemptionHandler() as preemption:
        for step in range(start_step, num_steps):
            batch = next(train_iter)
            state, metrics = train_step(state, parallelism.put_batch(batch))
            pending.append((step, metrics))
            if len(pending) > MAX_STEPS_IN_FLIGHT:
                # Dispatch is asynchronous: without this wait the loop runs up to
                # `log_every_steps` ahead of the device, and a SIGTERM would have
                # to wait for all of those steps before the checkpoint.
                jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1][1])
            done = step + 1
            is_last = done == num_steps
            log_now = done % config.log_every_steps == 0
            eval_now = done % config.eval_every_steps == 0 and not is_last
            save_now = done % config.checkpoint_every_steps == 0 or is_last
            if log_now or eval_now or save_now or preemption.requested:
                flush_metrics(done)
            # Asked after the flush: it waits for the device, and a signal that
            # arrives meanwhile must still get its checkpoint at this step. Every
            # process of a multi-process run gets the same answer.
            stop = preemption.should_stop(done)
            if stop:
                flush_metrics(done)
            if save_now or stop:
                ckpt.save(manager, done, parallelism.unreplicate(state))
            if stop:
                name = preemption.signal_name
                # Unknown (NaN) where JAX's runtime, not this process, took the SIGTERM.
                seconds = time.monotonic() - preemption.requested_at
                logging.warning(
                    "Stopped at step %d, %s; rerun to resume.",
                    done,
                    f"{seconds:.1f} s after {name}" if math.isfinite(seconds) else f"on {name}",
                )
                writer.record(
                    {
                        "step": done,
                        "event": "preempted",
                        "signal": name,
                        "seconds_after_signal": seconds,
                    }
                )
                manager.close()
                writer.close()
                if preemption.signal == signal.SIGINT:
                    raise TrainingInterrupted(
                        f"Interrupted (Ctrl-C) at step {done}; its checkpoint is saved in "
                        f"{manager.directory}. Rerun the same command to resume."
                    )
                return {"step": done, "preempted": True}
            if eval_now:
                eval_metrics = run_eval(done)
        final_step = int(jax.device_get(parallelism.unreplicate(state).step))
        if ckpt.latest_step(manager) != final_step:
            ckpt.save(manager, final_step, parallelism.unreplicate(state))
        eval_metrics = run_eval(final_step)
    manager.close()
    writer.close()
    return eval_metrics
