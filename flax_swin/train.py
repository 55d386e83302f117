"""CLU-style training of Swin V2 in Flax NNX: train_and_evaluate(config, workdir), data parallel over a mesh."""


import functools
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm

from flax_swin import checkpointing
from flax_swin.configs import default as default_config
from flax_swin.model import create_model, decay_mask
from shared_data import batches, run_config, tags, timing
from shared_data.loader import BatchLoader
from shared_data.normalize import MEAN, STD
from shared_data.trash_safe import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

BATCH_AXIS = "batch"
# Test-only: the loss of this global step (1-based) reads as NaN, to exercise the non-finite stop.
INJECT_NAN_ENV = "SWIN_INJECT_NAN_AT_STEP"
# Test-only: raise KeyboardInterrupt right after this global step (its checkpoint included), as a kill would.
INTERRUPT_ENV = "SWIN_INTERRUPT_AFTER_STEP"
# fold_in tags keeping the dropout stream independent of the parameter-init stream of the same seed.
_DROPOUT_STREAM = 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""


class TrainState(flax.struct.PyTreeNode):
    """What training changes: the step (which fixes lr, data position and dropout keys), params, optimiser state."""

    step: jax.Array
    params: Any
    opt_state: Any


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy
    accuracy_top5: clu_metrics.Average.from_output("top5")


# ---------------------------------------------------------------------------------------------
# Building blocks: mesh, optimiser, model state, jitted steps


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh over every device of every process: the batch is split along it, params replicated."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up then cosine, per optimiser step: the optax form of run_config.learning_rate."""
    cfg = config.to_dict()
    peak = cfg["lr"]
    warm = run_config.warmup_steps(cfg, steps_per_epoch)
    total = run_config.total_steps(cfg, steps_per_epoch)
    cosine = optax.cosine_decay_schedule(peak, decay_steps=max(total - warm, 1), alpha=cfg["cosine_end_factor"])
    if warm == 0:
        return cosine
    warmup = optax.linear_schedule(peak * cfg["warmup_start_factor"], peak, transition_steps=warm)
    return optax.join_schedules([warmup, cosine], boundaries=[warm])


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW (official betas and eps) with the official no-decay mask, after global-norm clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(config, steps_per_epoch), b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=config.weight_decay, mask=decay_mask(params),
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


def create_model_and_state(config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh,
                           steps_per_epoch: int) -> tuple[nnx.GraphDef, TrainState, Any, optax.GradientTransformation]:
    """The model split into (graph, params, rest), with params and optimiser state replicated over the mesh."""
    dtype = jnp.bfloat16 if config.precision == "bf16" else jnp.float32
    model = create_model(
        config.model, num_classes, nnx.Rngs(params=config.seed, dropout=config.seed),
        img_size=config.img_size, drop_path_rate=config.drop_path, dtype=dtype,
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Plain nested dicts of arrays: each jitted call flattens them far faster than nnx.State's Variables.
    params, rest = params.to_pure_dict(), rest.to_pure_dict()
    optimizer = make_optimizer(config, params, steps_per_epoch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    replicated = NamedSharding(mesh, PartitionSpec())
    return graphdef, jax.device_put(state, replicated), jax.device_put(rest, replicated), optimizer


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32 (x / 255 - MEAN) / STD, on the device."""
    mean = jnp.asarray(MEAN, jnp.float32)
    std = jnp.asarray(STD, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    mesh: Mesh, num_classes: int) -> Callable:
    """jit(state, metrics, rest, images, labels) -> (state, metrics, {loss, accuracy}); state and metrics donated."""
    dropout_root = jax.random.fold_in(jax.random.key(config.seed), _DROPOUT_STREAM)
    smoothing = config.label_smoothing

    def train_step(state: TrainState, metrics: TrainMetrics, rest: Any, images: jax.Array, labels: jax.Array):
        model = nnx.merge(graphdef, state.params, rest)
        # A fresh key every step, a pure function of (seed, step): resuming replays the same stream.
        nnx.reseed(model, dropout=jax.random.fold_in(dropout_root, state.step))
        inputs = normalize_images(images)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)

        def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
            logits = model(inputs)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        grads = grads.to_pure_dict()
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        batch_metrics = TrainMetrics.single_from_model_output(loss=loss, logits=logits, labels=labels)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return new_state, metrics.merge(batch_metrics), {"loss": loss, "accuracy": accuracy}

    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    return jax.jit(
        train_step, in_shardings=(replicated, replicated, replicated, sharded, sharded),
        out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1),
    )


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh) -> Callable:
    """jit(params, rest, metrics, images, labels, mask) -> metrics: plain cross-entropy, top-1, top-5 of mask-1 rows."""

    def eval_step(params: Any, rest: Any, metrics: EvalMetrics, images: jax.Array, labels: jax.Array, mask: jax.Array):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        logits = model(normalize_images(images))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        top5 = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
        batch_metrics = EvalMetrics.single_from_model_output(logits=logits, labels=labels, loss=loss, top5=top5,
                                                             mask=mask)
        return metrics.merge(batch_metrics)

    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    return jax.jit(eval_step, in_shardings=(replicated, replicated, replicated, sharded, sharded, sharded),
                   out_shardings=replicated, donate_argnums=(2,))


def to_global(local: tuple[np.ndarray, ...], sharding: NamedSharding) -> tuple[jax.Array, ...]:
    """This process's shard of a global batch -> global arrays split over the mesh (asynchronous copy)."""
    if jax.process_count() == 1:
        return tuple(jax.device_put(local, sharding))  # the same result, in one call, at half the host cost
    return tuple(jax.make_array_from_process_local_data(sharding, array) for array in local)


# ---------------------------------------------------------------------------------------------
# Small helpers of the loop


def _env_step(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise run_config.ConfigError(f"{name} must be a step number, got {value!r}") from None


def device_description() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return timing.cpu_description()
    name = "cuda" if device.platform == "gpu" else device.platform
    return f"{name}: {device.device_kind} x{len(jax.devices())}"


def device_peak_mb() -> float | None:
    """Peak bytes in use on the first local device, where the backend reports it (GPU, TPU; not CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # backends without memory statistics raise rather than return None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


class _Profiler:
    """Start a jax.profiler trace before the first chosen step and stop it after the last."""

    def __init__(self, steps: tuple[int, int] | None, folder: Path) -> None:
        self.steps, self.folder, self.active = steps, folder, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(str(self.folder))
            self.active = True

    def boundary(self, step: int) -> bool:
        """Whether the trace starts right after `step` or ends at it."""
        return bool(self.steps) and step in (self.steps[0] - 1, self.steps[1])

    def after(self, step: int) -> None:
        if self.active and step >= self.steps[1]:
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


# ---------------------------------------------------------------------------------------------
# The loop


class StepLogger:
    """Per-step bookkeeping: read the step's loss and accuracy, stop on a non-finite loss, write the step tags."""

    def __init__(self, writer: SummaryWriter | None, bar: tqdm | None, learning_rate: Callable[[int], float],
                 nan_at_step: int | None = None) -> None:
        self.writer, self.bar, self.learning_rate, self.nan_at_step = writer, bar, learning_rate, nan_at_step

    def __call__(self, step: int, outputs: dict[str, jax.Array], step_s: float, wait_s: float,
                 last_good: Path | None = None) -> None:
        values = jax.device_get(outputs)  # already computed: the caller blocked on the loss
        loss = float(values["loss"])
        if step == self.nan_at_step:
            loss = math.nan  # test-only injection, on the host so the compiled step stays the same
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"non-finite training loss ({loss}) at step {step}: stopped; "
                                     f"last good checkpoint: {last_good or 'none'}")
        if self.writer is not None:
            # The lr that this step's update used: optax counts updates from 0.
            values = [(tags.TRAIN_LOSS, loss), (tags.TRAIN_ACCURACY, float(values["accuracy"])),
                      (tags.TRAIN_LR, self.learning_rate(step - 1)), (tags.STEP_TIME, step_s),
                      (tags.DATA_WAIT_TIME, wait_s), (tags.COMPUTE_TIME, step_s - wait_s)]
            if step == 1:
                values.append((tags.FIRST_STEP_TIME, step_s))
            # One event holding every scalar of the step: a fifth of the cost of one add_scalar call per tag.
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])
            self.writer.file_writer.add_summary(summary, step)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == 1:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


class _Run:
    """The state of one train_and_evaluate call, so the loop below reads like the recipe."""

    def __init__(self, config: ml_collections.ConfigDict, run_dir: Path, data: Any, mesh: Mesh) -> None:
        self.config, self.run_dir, self.data, self.mesh = config, run_dir, data, mesh
        self.is_main = jax.process_index() == 0
        self.shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        self.prefetch = max(2, 2 * config.num_workers)
        self.steps_per_epoch = batches.train_steps_per_epoch(len(data.train.labels), config.batch_size)
        self.total_steps = run_config.total_steps(config.to_dict(), self.steps_per_epoch)
        self.writer: SummaryWriter | None = None
        self.bar: tqdm | None = None
        self.history: list[dict[str, Any]] = []
        self.last_saved: Path | None = None

    def train_loader(self, epoch: int, first: int, last: int) -> BatchLoader:
        fn = functools.partial(self._train_batch, epoch)
        return BatchLoader(fn, range(first, last), self.config.num_workers, prefetch=self.prefetch)

    def _train_batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        return batches.train_batch(self.data.train, seed=self.config.seed, epoch=epoch, index=index,
                                   batch_size=self.config.batch_size, img_size=self.config.img_size, **self.shard)

    def _val_batch(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return batches.val_batch(self.data.val, index=index, batch_size=self.config.batch_size,
                                 img_size=self.config.img_size, **self.shard)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)


def run_epoch_steps(train_step: Callable, state: TrainState, metrics: TrainMetrics, rest: Any,
                    host_batches: Iterator[tuple[np.ndarray, ...]], num_steps: int, first_step: int,
                    sharding: NamedSharding, on_step: Callable[[int, TrainState | None, dict, float, float], None],
                    needs_state: Callable[[int], bool] = lambda step: False) -> tuple[TrainState, TrainMetrics]:
    """The inner loop: `num_steps` steps, each timed from the previous step's end to its own loss being ready.

    The host keeps the device busy: step k+1 is dispatched (its batch fetched and copied) before waiting for
    step k's loss, and step k's bookkeeping (on_step: checks, logging, progress) runs while k+1 computes.
    A step for which `needs_state(step)` holds (a checkpoint, a profile boundary, a planned stop) is waited
    for and handed to on_step with its state before the next dispatch, which donates that state's buffers.
    """
    window_start = time.perf_counter()
    data_wait = 0.0

    def next_batch() -> tuple[jax.Array, ...]:
        nonlocal data_wait
        fetched = time.perf_counter()
        host = next(host_batches)
        data_wait += time.perf_counter() - fetched
        return to_global(host, sharding)

    state, metrics, outputs = train_step(state, metrics, rest, *next_batch())
    for offset in range(num_steps):
        step = first_step + offset
        has_next = offset + 1 < num_steps
        current = outputs
        wants_state = needs_state(step)
        upcoming = next_batch() if has_next else None
        if has_next and not wants_state:
            state, metrics, outputs = train_step(state, metrics, rest, *upcoming)
        jax.block_until_ready(current["loss"])  # the one per-step sync, which the timing tags need
        end = time.perf_counter()
        step_s, wait_s, data_wait = end - window_start, data_wait, 0.0
        window_start = end
        if wants_state:
            on_step(step, state, current, step_s, wait_s)
            window_start = time.perf_counter()  # a checkpoint save is not part of the next step
            if has_next:
                state, metrics, outputs = train_step(state, metrics, rest, *upcoming)
        else:
            on_step(step, None, current, step_s, wait_s)
    return state, metrics


def evaluate(eval_step: Callable, params: Any, rest: Any, run: _Run) -> dict[str, float]:
    """One pass over every validation image; returns loss, accuracy, top-5 and the image count."""
    steps = batches.val_steps(len(run.data.val.labels), run.config.batch_size)
    loader = BatchLoader(run._val_batch, range(steps), run.config.num_workers, prefetch=run.prefetch)
    metrics = jax.device_put(EvalMetrics.empty(), NamedSharding(run.mesh, PartitionSpec()))
    for local in loader:
        metrics = eval_step(params, rest, metrics, *to_global(local, run.batch_sharding))
    values = {name: float(value) for name, value in jax.device_get(metrics.compute()).items()}
    values["images"] = int(jax.device_get(metrics.accuracy.count))
    return values


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train and validate each epoch in `workdir` (the run folder); return the summary also saved as summary.json."""
    from shared_data.prepare import prepare_data  # the data stack imports PIL and friends; keep `import train` light

    wall_start = time.perf_counter()
    config = default_config.resolve(config)
    run_dir = Path(workdir)
    with config.unlocked():
        config.run_dir = str(run_dir)
        config.run_name = run_dir.name
    profile_steps = default_config.parse_profile_steps(config.profile_steps)
    nan_at_step = _env_step(INJECT_NAN_ENV)
    interrupt_after = _env_step(INTERRUPT_ENV)
    mesh = make_mesh()
    if config.batch_size % mesh.size or config.batch_size % jax.process_count():
        raise run_config.ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {mesh.size} devices")

    # ---- data
    data = prepare_data(config.dataset, config.data_dir, config.img_size, seed=config.seed, strict=config.strict,
                        synthetic_size=config.synthetic_size, noisy_labels=config.noisy_labels,
                        num_workers=config.num_workers, progress=jax.process_index() == 0)
    run = _Run(config, run_dir, data, mesh)
    if run.steps_per_epoch < 1:
        raise run_config.ConfigError(f"--batch-size {config.batch_size} is larger than the {len(data.train.labels)} "
                                     "training images; lower it")

    # ---- state
    graphdef, state, rest, optimizer = create_model_and_state(config, data.num_classes, mesh, run.steps_per_epoch)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    extra = dict(
        dataset=data.dataset, dataset_requested=config.dataset, fell_back=data.fell_back,
        device=device_description(), versions=timing.library_versions(), num_params=num_params,
        compile=False,  # "compile" names torch.compile on the Lightning side; XLA always compiles jitted steps
        steps_per_epoch=run.steps_per_epoch, num_devices=mesh.size, num_processes=jax.process_count(),
        num_classes=data.num_classes,
    )
    if run.is_main:
        run_config.prepare_run_dir(config.to_dict(), extra)
        atomic_write_json(run_dir / "data_report.json", data.report())
        overview = parameter_overview.get_parameter_overview(state.params, include_stats=False)
        atomic_write_bytes(run_dir / "parameter_overview.txt", (overview + "\n").encode())
        log.info("parameters of %s:\n%s", config.model, overview)
        print(f"{config.model}: {num_params:,} parameters (each array: {run_dir / 'parameter_overview.txt'})",
              flush=True)
    checkpointer = checkpointing.Checkpointer(run_dir, config.keep_checkpoints)
    best_val_accuracy = None
    if config.resume:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = checkpointer.restore_latest(abstract)
        if restored is not None:
            state, meta = restored
            run.history = list(meta.get("history", []))
            best_val_accuracy = meta.get("best_val_accuracy")
            print(f"resumed from step {int(state.step)} of {run_dir}", flush=True)

    train_step = make_train_step(graphdef, optimizer, config, mesh, data.num_classes)
    eval_step = make_eval_step(graphdef, mesh)
    profiler = _Profiler(profile_steps, run_dir / "profile")
    start_step = int(jax.device_get(state.step))
    replicated = NamedSharding(mesh, PartitionSpec())

    if run.is_main:
        run.writer = SummaryWriter(logdir=str(run_dir), flush_secs=30)
        run.bar = tqdm(total=run.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       smoothing=0.1)
    # Python's copy of the schedule (equal to optax's, tested): evaluating the optax one costs a dispatch.
    step_logger = StepLogger(run.writer, run.bar, functools.partial(run_config.learning_rate, config=config.to_dict(),
                                                                    steps_per_epoch=run.steps_per_epoch), nan_at_step)
    try:
        epochs_needed = math.ceil(run.total_steps / run.steps_per_epoch)
        for epoch in range(start_step // run.steps_per_epoch, epochs_needed):
            epoch_start = time.perf_counter()
            first = max(start_step - epoch * run.steps_per_epoch, 0)
            last = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
            if first >= last:
                continue
            if run.bar is not None:
                run.bar.set_description(f"epoch {epoch + 1}/{epochs_needed}")
            checkpoint_time = [0.0]

            def saves_mid_epoch(step: int) -> bool:
                every = config.checkpoint_every_steps
                return bool(every) and step % every == 0 and step != epoch * run.steps_per_epoch + last

            def needs_state(step: int) -> bool:
                return saves_mid_epoch(step) or step == interrupt_after or profiler.boundary(step)

            def on_step(step: int, new_state: TrainState | None, outputs: dict, step_s: float, wait_s: float) -> None:
                step_logger(step, outputs, step_s, wait_s, last_good=run.last_saved)
                profiler.after(step)
                profiler.before(step + 1)
                if saves_mid_epoch(step):
                    checkpoint_time[0] += save(new_state, step, epoch, None)
                if step == interrupt_after:
                    raise KeyboardInterrupt(f"{INTERRUPT_ENV}={interrupt_after}")

            def save(state: TrainState, step: int, epoch: int, val_accuracy: float | None) -> float:
                meta = dict(step=step, epoch=epoch + 1, index_in_epoch=step - epoch * run.steps_per_epoch,
                            val_accuracy=val_accuracy, best_val_accuracy=best_val_accuracy, history=run.history,
                            steps_per_epoch=run.steps_per_epoch)
                seconds = checkpointer.save(step, state, meta, val_accuracy)
                run.last_saved = checkpointer.directory / str(step)
                return seconds

            # ---- train
            metrics = jax.device_put(TrainMetrics.empty(), replicated)
            profiler.before(epoch * run.steps_per_epoch + first + 1)
            loader = run.train_loader(epoch, first, last)
            host_batches = iter(loader)
            try:
                state, metrics = run_epoch_steps(train_step, state, metrics, rest, host_batches, last - first,
                                                 epoch * run.steps_per_epoch + first + 1, run.batch_sharding, on_step,
                                                 needs_state)
            finally:
                host_batches.close()
            train_summary = {name: float(value) for name, value in jax.device_get(metrics.compute()).items()}
            train_time = time.perf_counter() - epoch_start
            step = epoch * run.steps_per_epoch + last
            images_trained = (last - first) * config.batch_size

            # ---- eval
            val_start = time.perf_counter()
            final_val = evaluate(eval_step, state.params, rest, run)
            val_time = time.perf_counter() - val_start
            if best_val_accuracy is None or final_val["accuracy"] > best_val_accuracy:
                best_val_accuracy = final_val["accuracy"]
            record = dict(epoch=epoch + 1, step=step, train_loss=train_summary["loss"],
                          train_images_per_s=images_trained / train_time,
                          val_images_per_s=final_val["images"] / val_time, val_accuracy=final_val["accuracy"],
                          val_loss=final_val["loss"])
            run.history.append(record)

            # ---- checkpoint
            checkpoint_time[0] += save(state, step, epoch, final_val["accuracy"])

            # ---- log
            e = epoch + 1
            run.scalar(tags.EPOCH_TRAIN_TIME, train_time, e)
            run.scalar(tags.EPOCH_VAL_TIME, val_time, e)
            run.scalar(tags.EPOCH_TRAIN_IMAGES_PER_S, record["train_images_per_s"], e)
            run.scalar(tags.EPOCH_VAL_IMAGES_PER_S, record["val_images_per_s"], e)
            run.scalar(tags.EPOCH_CHECKPOINT_TIME, checkpoint_time[0], e)
            run.scalar(tags.VAL_LOSS, final_val["loss"], e)
            run.scalar(tags.VAL_ACCURACY, final_val["accuracy"], e)
            run.scalar(tags.VAL_ACCURACY_TOP5, final_val["accuracy_top5"], e)
            run.scalar(tags.HOST_PEAK_MB, timing.host_peak_mb(), e)
            peak = device_peak_mb()
            if peak is not None:
                run.scalar(tags.DEVICE_PEAK_MB, peak, e)
            wall = time.perf_counter() - epoch_start
            run.scalar(tags.EPOCH_WALL_TIME, wall, e)
            if run.is_main:
                message = (f"epoch {e}/{epochs_needed}: train loss {train_summary['loss']:.4f}, "
                           f"val loss {final_val['loss']:.4f}, val acc {final_val['accuracy']:.2%} "
                           f"(top-5 {final_val['accuracy_top5']:.2%}), {record['train_images_per_s']:.1f} img/s train, "
                           f"{record['val_images_per_s']:.1f} img/s val, {wall:.1f} s")
                run.bar.write(message) if run.bar is not None else print(message, flush=True)
            start_step = step
        profiler.stop()
        checkpointer.wait()
    finally:
        profiler.stop()
        if run.bar is not None:
            run.bar.close()
        if run.writer is not None:
            run.writer.close()
        checkpointer.close()

    summary = dict(
        wall_time_s=time.perf_counter() - wall_start,
        final_val_accuracy=run.history[-1]["val_accuracy"] if run.history else None,
        best_val_accuracy=best_val_accuracy,
        steps=int(jax.device_get(state.step)),
        epochs_completed=int(jax.device_get(state.step)) // run.steps_per_epoch,
        images_per_s={"train": _median([r["train_images_per_s"] for r in run.history]),
                      "val": _median([r["val_images_per_s"] for r in run.history])},
    )
    if run.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
