"""CLU-style training of Swin V2 in Flax NNX: train_and_evaluate(config, workdir), data parallel over a mesh."""


import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

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

from flax_swin import checkpointing, distributed, input_pipeline
from flax_swin.configs import default as default_config
from flax_swin.model import create_model, decay_mask
from flax_swin.weights import load_pretrained
from flax_swin.reporting import Reporter, StepProfiler, device_description
from shared_data import augment, batches, event_files, run_config, run_report
from shared_data.errors import ConfigError, NonFiniteLossError
from shared_data.trash_safe import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

BATCH_AXIS = "batch"
# fold_in tags keeping the dropout stream independent of the parameter-init stream of the same seed.
_DROPOUT_STREAM = 1


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


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A pytree of arrays equal in every process -> the same tree replicated over every device of the mesh.

    With several processes, jax.device_put refuses arrays already placed on this process's device (the model's,
    built under jit) and checks host arrays with one collective per leaf; each process supplies its own copy instead.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(functools.partial(_replicated_leaf, sharding=sharding), tree)


def _replicated_leaf(leaf: Any, sharding: NamedSharding) -> jax.Array:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys (dropout streams) travel as their data
        data = _replicated_leaf(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))


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
    """The model split into (graph, params, rest), with params and optimiser state replicated over the mesh.

    The parameters are the seed's initialisation, or the weights of --pretrained (the head kept at its
    initialisation when its class count differs); raises ConfigError when those weights do not fit.
    """
    dtype = jnp.bfloat16 if config.precision == "bf16" else jnp.float32
    # float32 means full float32 in both stacks: on a GPU, XLA's default precision would use TF32 for float32
    # matmuls and convolutions, where torch keeps full float32 (README, "On a GPU"). No effect on a CPU.
    if config.precision == "fp32":
        jax.config.update("jax_default_matmul_precision", "highest")
    # Built under one jit: eagerly, every initializer of every shape compiles on its own (103 XLA programs,
    # 7.0 s for the nano model on a 2-core CPU, against 4.5 s jitted), with bitwise the same parameters.
    def build() -> nnx.Module:
        return create_model(config.model, num_classes, nnx.Rngs(params=config.seed, dropout=config.seed),
                            img_size=config.img_size, drop_path_rate=config.drop_path, dtype=dtype)

    model = nnx.jit(build)()
    if config.pretrained:
        run_config.load_pretrained(load_pretrained, model, config.pretrained, announce=jax.process_index() == 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Plain nested dicts of arrays: each jitted call flattens them far faster than nnx.State's Variables.
    params, rest = params.to_pure_dict(), rest.to_pure_dict()
    optimizer = make_optimizer(config, params, steps_per_epoch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    return graphdef, replicate(state, mesh), replicate(rest, mesh), optimizer


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of -sum(targets * log_softmax(logits)): the training loss on soft targets [B, classes]."""
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    mesh: Mesh, num_classes: int) -> Callable:
    """jit(state, metrics, rest, images, labels[, targets]) -> (state, metrics, {loss, accuracy}); state and metrics
    donated. `targets` (soft, from shared_data.augment) come with --augment official; without them the targets are
    the label-smoothed one-hot labels."""
    dropout_root = jax.random.fold_in(jax.random.key(config.seed), _DROPOUT_STREAM)
    smoothing = config.label_smoothing

    def train_step(state: TrainState, metrics: TrainMetrics, rest: Any, images: jax.Array, labels: jax.Array,
                   targets: jax.Array | None = None):
        model = nnx.merge(graphdef, state.params, rest)
        # A fresh key every step, a pure function of (seed, step): resuming replays the same stream.
        nnx.reseed(model, dropout=jax.random.fold_in(dropout_root, state.step))
        inputs = input_pipeline.normalize_images(images)
        if targets is None:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)

        def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
            logits = model(inputs)
            return soft_target_cross_entropy(logits, targets), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        grads = grads.to_pure_dict()
        with jax.named_scope("optimizer"):  # names the update's operations in profiles (shared_data.op_profile)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        batch_metrics = TrainMetrics.single_from_model_output(loss=loss, logits=logits, labels=labels)
        return new_state, metrics.merge(batch_metrics), batch_metrics.compute()

    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    batch_arrays = 3 if config.augment == augment.OFFICIAL else 2
    return jax.jit(
        train_step, in_shardings=(replicated, replicated, replicated) + (sharded,) * batch_arrays,
        out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1),
    )


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh) -> Callable:
    """jit(params, rest, metrics, images, labels, mask) -> metrics: plain cross-entropy, top-1, top-5 of mask-1 rows."""

    def eval_step(params: Any, rest: Any, metrics: EvalMetrics, images: jax.Array, labels: jax.Array, mask: jax.Array):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        logits = model(input_pipeline.normalize_images(images))
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


# ---------------------------------------------------------------------------------------------
# The loop

# A hook is called as hook(steps_done, state) before each step is dispatched and returns the state to train
# on; tests use hooks to stop a run as a kill would, or to inject a fault into the real state.
Hook = Callable[[int, TrainState], TrainState]


def evaluate(eval_step: Callable, params: Any, rest: Any, data: Any, config: ml_collections.ConfigDict,
             mesh: Mesh) -> dict[str, float]:
    """One pass over every validation image: plain cross-entropy loss, top-1 and top-5 (0..1), image count."""
    loader = input_pipeline.val_batches(data.val, batch_size=config.batch_size, img_size=config.img_size,
                                        num_workers=config.num_workers)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    metrics = replicate(EvalMetrics.empty(), mesh)
    for local in loader:
        metrics = eval_step(params, rest, metrics, *input_pipeline.to_global(local, sharding))
    values = {name: float(value) for name, value in jax.device_get(metrics.compute()).items()}
    values["images"] = int(jax.device_get(metrics.accuracy.count))
    return values


def finish_step(step: int, outputs: dict[str, jax.Array], started: float, data_wait_s: float, lr: float,
                reporter: Reporter, last_saved: Path | None) -> float:
    """Wait for `step`'s loss and accuracy, stop on a non-finite loss, write the step's tags; return when it ended.

    Raises NonFiniteLossError naming the step and the last checkpoint saved before it.
    """
    values = jax.device_get(outputs)  # the one per-step wait on the device
    ended = time.perf_counter()
    loss = float(values["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLossError.at_step(step, loss, last_saved)
    reporter.step(step, loss, float(values["accuracy"]), lr, ended - started, data_wait_s)
    return ended


def checkpoint_meta(step: int, steps_per_epoch: int, val_accuracy: float | None, best_val_accuracy: float | None,
                    history: list[dict[str, float]]) -> dict[str, Any]:
    """What a checkpoint records beside the state: its place in the run, its val accuracy, the epoch history."""
    epoch = (step - 1) // steps_per_epoch
    return dict(step=step, epoch=epoch + 1, index_in_epoch=step - epoch * steps_per_epoch,
                val_accuracy=val_accuracy, best_val_accuracy=best_val_accuracy, history=history,
                steps_per_epoch=steps_per_epoch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train and validate each epoch in `workdir` (the run folder); return the summary also saved as summary.json.

    Raises ConfigError for a flag that cannot work with the data, NonFiniteLossError, CheckpointError and
    CheckpointSaveError; `hooks` see and may replace the state before each step (see Hook).
    """
    from shared_data.prepare import prepare_data  # the data stack imports PIL and friends; keep `import train` light

    wall_start = time.perf_counter()
    config = default_config.resolve(config)
    run_dir = Path(workdir)
    with config.unlocked():
        config.run_dir = str(run_dir)
        config.run_name = run_dir.name
    is_main = jax.process_index() == 0
    mesh = make_mesh()
    if config.batch_size % mesh.size or config.batch_size % jax.process_count():
        raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {mesh.size} devices")

    # ---- data
    data = prepare_data(config.dataset, config.data_dir, config.img_size, seed=config.seed, strict=config.strict,
                        synthetic_size=config.synthetic_size, noisy_labels=config.noisy_labels,
                        num_workers=config.num_workers, progress=is_main)
    steps_per_epoch = batches.train_steps_per_epoch(len(data.train.labels), config.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {len(data.train.labels)} "
                          "training images; lower it")
    augmentation = augment.from_config(config, data.num_classes)  # None: --augment basic
    total_steps = run_config.total_steps(config.to_dict(), steps_per_epoch)
    epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- state
    graphdef, state, rest, optimizer = create_model_and_state(config, data.num_classes, mesh, steps_per_epoch)
    record = run_report.run_record(
        data, dataset_requested=config.dataset, device=device_description(),
        num_params=parameter_overview.count_parameters(state.params),
        compile=False,  # "compile" names torch.compile on the Lightning side; XLA always compiles jitted steps
        steps_per_epoch=steps_per_epoch, num_devices=mesh.size, num_processes=jax.process_count())
    # Every process checks the run folder, and all have before process 0 writes it: a process stopping alone on a
    # ConfigError would leave the others waiting for it in their first collective.
    run_config.check_run_dir(config.to_dict(), record)
    distributed.sync("run folder checked")
    if is_main:
        run_config.prepare_run_dir(config.to_dict(), record)
        atomic_write_json(run_dir / "data_report.json", data.report())
        overview = parameter_overview.get_parameter_overview(state.params, include_stats=False)
        atomic_write_bytes(run_dir / "parameter_overview.txt", (overview + "\n").encode())
        log.info("parameters of %s:\n%s", config.model, overview)
        print(f"{config.model}: {record['num_params']:,} parameters (each array: "
              f"{run_dir / 'parameter_overview.txt'})", flush=True)
    checkpointer = checkpointing.Checkpointer(run_dir, config.keep_checkpoints)
    history: list[dict[str, float]] = []
    best_val_accuracy = None
    if config.resume:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = checkpointer.restore_latest(abstract)  # raises rather than start again while checkpoints exist
        if restored is None:
            if is_main:
                run_config.warn_no_checkpoint(run_dir)
        else:
            state, meta = restored
            history = list(meta.get("history", []))
            best_val_accuracy = meta.get("best_val_accuracy")
            if is_main:
                print(f"resumed from step {int(state.step)} of {run_dir}", flush=True)

    train_step = make_train_step(graphdef, optimizer, config, mesh, data.num_classes)
    eval_step = make_eval_step(graphdef, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    # Python's copy of the schedule (equal to optax's, tested): evaluating the optax one costs a dispatch.
    # Optax counts updates from 0, so step s (1-based) used learning_rate(s - 1).
    learning_rate = functools.partial(run_config.learning_rate, config=config.to_dict(),
                                      steps_per_epoch=steps_per_epoch)
    start_step = int(jax.device_get(state.step))
    # A resumed run's event files drop what the interrupted process wrote after the step it resumes from.
    purge_step, replay = (event_files.resume_purge(run_dir, start_step, steps_per_epoch) if config.resume and is_main
                          else (None, []))
    reporter = Reporter(run_dir, total_steps, start_step, enabled=is_main, step_tags=config.step_timing == "on",
                        purge_step=purge_step, replay=replay)
    # The profile's ops.json needs the compiled step's HLO: the cached executable of the last arguments it ran on.
    profiler = StepProfiler(run_config.parse_profile_steps(config.profile_steps), run_dir / "profile",
                            compiled_step=lambda: train_step.lower(state, metrics, rest, *batch).compile().as_text())
    every = config.checkpoint_every_steps
    last_saved: Path | None = None
    try:
        profiler.after_step(start_step)
        for epoch in range(start_step // steps_per_epoch, epochs):
            epoch_first = epoch * steps_per_epoch  # global steps done when the epoch began
            first = max(start_step - epoch_first, 0)  # index of the epoch's first batch still to train
            last = min(steps_per_epoch, total_steps - epoch_first)
            reporter.set_epoch(epoch + 1, epochs)
            epoch_start = time.perf_counter()
            checkpoint_s = 0.0

            # ---- train: step k+1 is dispatched before the host waits for step k, so the device never idles
            metrics = replicate(TrainMetrics.empty(), mesh)
            loader = input_pipeline.train_batches(
                data.train, seed=config.seed, epoch=epoch, first=first, last=last, batch_size=config.batch_size,
                img_size=config.img_size, num_workers=config.num_workers, augment=augmentation)
            in_flight: tuple[int, dict[str, jax.Array]] | None = None  # dispatched, not yet waited for
            step_started, data_wait_s = epoch_start, 0.0
            with contextlib.closing(iter(loader)) as host_batches:
                for step in range(epoch_first + first + 1, epoch_first + last + 1):
                    fetch_start = time.perf_counter()
                    host_batch = next(host_batches)
                    data_wait_s += time.perf_counter() - fetch_start
                    for hook in hooks:
                        state = hook(step - 1, state)
                    batch = input_pipeline.to_global(host_batch, batch_sharding)
                    state, metrics, outputs = train_step(state, metrics, rest, *batch)
                    if in_flight is not None:
                        step_started = finish_step(*in_flight, step_started, data_wait_s,
                                                   learning_rate(in_flight[0] - 1), reporter, last_saved)
                        data_wait_s = 0.0
                        profiler.after_step(in_flight[0])
                    in_flight = (step, outputs)
                    saves_now = bool(every) and step % every == 0 and step != epoch_first + last
                    if saves_now or profiler.is_boundary(step):
                        # Wait for this step before its state is saved (never save a non-finite state) or traced.
                        finish_step(step, outputs, step_started, data_wait_s, learning_rate(step - 1), reporter,
                                    last_saved)
                        data_wait_s, in_flight = 0.0, None
                        profiler.after_step(step)
                        if saves_now:
                            reporter.flush()
                            meta = checkpoint_meta(step, steps_per_epoch, None, best_val_accuracy, history)
                            checkpoint_s += checkpointer.save(step, state, meta, None)
                            last_saved = checkpointer.directory / str(step)
                        step_started = time.perf_counter()  # a save or a trace start is not part of the next step
            if in_flight is not None:
                finish_step(*in_flight, step_started, data_wait_s, learning_rate(in_flight[0] - 1), reporter,
                            last_saved)
                profiler.after_step(in_flight[0])
            train_summary = jax.device_get(metrics.compute())
            train_s = time.perf_counter() - epoch_start
            step = epoch_first + last

            # ---- eval
            val_start = time.perf_counter()
            val = evaluate(eval_step, state.params, rest, data, config, mesh)
            val_s = time.perf_counter() - val_start
            if best_val_accuracy is None or val["accuracy"] > best_val_accuracy:
                best_val_accuracy = val["accuracy"]
            result = run_report.EpochResult(
                epoch=epoch + 1, step=step, steps_timed=last - first, epoch_steps=last,
                train_loss=float(train_summary["loss"]), train_time_s=train_s,
                train_images=(last - first) * config.batch_size, val_loss=val["loss"], val_accuracy=val["accuracy"],
                val_accuracy_top5=val["accuracy_top5"], val_time_s=val_s, val_images=val["images"],
                checkpoint_time_s=0.0, wall_time_s=0.0)  # both known once the checkpoint below is saved
            history.append(result.history_entry())
            # On disk before the checkpoint below is published: a kill never leaves a checkpoint without its epoch.
            reporter.epoch_validated(result)

            # ---- checkpoint
            meta = checkpoint_meta(step, steps_per_epoch, val["accuracy"], best_val_accuracy, history)
            checkpoint_s += checkpointer.save(step, state, meta, val["accuracy"])
            last_saved = checkpointer.directory / str(step)

            # ---- log
            result = dataclasses.replace(result, checkpoint_time_s=checkpoint_s,
                                         wall_time_s=time.perf_counter() - epoch_start)
            reporter.epoch_done(result, epochs)
            start_step = step
        checkpointer.wait()
    finally:
        profiler.stop()
        reporter.close()
        checkpointer.close()

    summary = run_report.run_summary(history, steps=int(jax.device_get(state.step)), steps_per_epoch=steps_per_epoch,
                                     wall_time_s=time.perf_counter() - wall_start, best_val_accuracy=best_val_accuracy)
    if is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary
