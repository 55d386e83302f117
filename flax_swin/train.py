"""CLU-style training of Swin V2 in Flax NNX: train_and_evaluate(config, workdir), data parallel over a mesh."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
from clu import parameter_overview
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_swin import checkpointing, distributed, input_pipeline
from flax_swin.configs import default as default_config
from flax_swin.devices import arithmetic, device_description
from flax_swin.profiling import StepProfiler
from flax_swin.reporting import Reporter, StepInFlight, ready_at
from flax_swin.steps import (BATCH_AXIS, EvalMetrics, TrainMetrics, TrainState, create_model_and_state, make_eval_step,
                             make_mesh, make_train_step, replicate)
from shared_data import augment, batches, event_files, run_config, run_report
from shared_data.clock import Sections, StepClock
from shared_data.errors import ConfigError
from shared_data.trash_safe import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


# A hook is called as hook(steps_done, state) before each step is dispatched and returns the state to train
# on; tests use hooks to stop a run as a kill would, or to inject a fault into the real state.
Hook = Callable[[int, TrainState], TrainState]


def evaluate(eval_step: Callable, params: Any, rest: Any, data: Any, config: ml_collections.ConfigDict,
             mesh: Mesh) -> dict[str, float]:
    """One pass over every validation image: plain cross-entropy loss, top-1 and top-5 (0..1), image count."""
    loader = input_pipeline.val_batches(data.val, config)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    metrics = replicate(EvalMetrics.empty(), mesh)
    for local in loader:
        metrics = eval_step(params, rest, metrics, *input_pipeline.to_global(local, sharding))
    values = {name: float(value) for name, value in jax.device_get(metrics.compute()).items()}
    values["images"] = int(jax.device_get(metrics.accuracy.count))
    return values


def checkpoint_meta(step: int, steps_per_epoch: int, val_accuracy: float | None, best_val_accuracy: float | None,
                    history: list[dict[str, float]]) -> dict[str, Any]:
    """What a checkpoint records beside the state: its place in the run, its val accuracy, the epoch history."""
    epoch = (step - 1) // steps_per_epoch
    return dict(step=step, epoch=epoch + 1, index_in_epoch=step - epoch * steps_per_epoch,
                val_accuracy=val_accuracy, best_val_accuracy=best_val_accuracy, history=history,
                steps_per_epoch=steps_per_epoch)


def prepare_run_folder(config: ml_collections.ConfigDict, data: Any, state: TrainState, mesh: Mesh,
                       steps_per_epoch: int) -> None:
    """Check the run folder in every process, then write config.json, data_report.json and the parameter overview
    from process 0; raises ConfigError as shared_data.run_config.check_run_dir does."""
    record = run_report.run_record(
        data, dataset_requested=config.dataset, device=device_description(), arithmetic=arithmetic(config.precision),
        num_params=parameter_overview.count_parameters(state.params),
        compile=False,  # "compile" names torch.compile on the Lightning side; XLA always compiles jitted steps
        steps_per_epoch=steps_per_epoch, num_devices=mesh.size, num_processes=jax.process_count())
    # Every process checks, and all have before process 0 writes: a process stopping alone on a ConfigError would
    # leave the others waiting for it in their first collective.
    run_config.check_run_dir(config.to_dict(), record)
    distributed.sync("run folder checked")
    if jax.process_index() != 0:
        return
    run_dir = Path(config.run_dir)
    run_config.prepare_run_dir(config.to_dict(), record)
    atomic_write_json(run_dir / "data_report.json", data.report())
    overview = parameter_overview.get_parameter_overview(state.params, include_stats=False)
    atomic_write_bytes(run_dir / "parameter_overview.txt", (overview + "\n").encode())
    log.info("parameters of %s:\n%s", config.model, overview)
    print(f"{config.model}: {record['num_params']:,} parameters (each array: {run_dir / 'parameter_overview.txt'})",
          flush=True)


def start_run(config: ml_collections.ConfigDict, data: Any, state: TrainState, mesh: Mesh,
              steps_per_epoch: int) -> tuple[checkpointing.Checkpointer, TrainState, list[dict[str, float]], float | None]:
    """Prepare the run folder and its checkpointer; with --resume, restore the newest undamaged checkpoint.

    Returns (checkpointer, state, epoch history, best val accuracy): the fresh state without --resume, or when the run
    has no checkpoint yet (a warning says so). Raises ConfigError (prepare_run_folder) and CheckpointError
    (Checkpointer.restore_latest: it raises rather than start again while checkpoints exist).
    """
    prepare_run_folder(config, data, state, mesh, steps_per_epoch)
    checkpointer = checkpointing.Checkpointer(config.run_dir, config.keep_checkpoints)
    if not config.resume:
        return checkpointer, state, [], None
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpointer.restore_latest(abstract)
    if restored is None:
        if jax.process_index() == 0:
            run_config.warn_no_checkpoint(config.run_dir)
        return checkpointer, state, [], None
    state, meta = restored
    if jax.process_index() == 0:
        print(f"resumed from step {int(state.step)} of {config.run_dir}", flush=True)
    return checkpointer, state, list(meta.get("history", [])), meta.get("best_val_accuracy")


def load_data(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, int]:
    """The prepared dataset (shared_data.prepare) and the steps per epoch; raises ConfigError for a global batch the
    devices cannot split or the training set cannot fill, and prepare_data's errors."""
    from shared_data.prepare import prepare_data  # the data stack imports PIL and friends; keep `import train` light

    if config.batch_size % mesh.size or config.batch_size % jax.process_count():
        raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {mesh.size} devices")
    data = prepare_data(config.dataset, config.data_dir, config.img_size, seed=config.seed, strict=config.strict,
                        synthetic_size=config.synthetic_size, noisy_labels=config.noisy_labels,
                        num_workers=config.num_workers, progress=jax.process_index() == 0)
    steps_per_epoch = batches.train_steps_per_epoch(len(data.train.labels), config.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {len(data.train.labels)} "
                          "training images; lower it")
    return data, steps_per_epoch


def open_reporter(config: ml_collections.ConfigDict, start_step: int, total_steps: int,
                  steps_per_epoch: int) -> Reporter:
    """The run's Reporter (process 0 writes); a resumed run's event files drop what the interrupted process wrote
    after the step it resumes from (shared_data.event_files)."""
    main = jax.process_index() == 0
    purge_step, replay = (event_files.resume_purge(config.run_dir, start_step, steps_per_epoch)
                          if config.resume and main else (None, []))
    return Reporter(Path(config.run_dir), total_steps, start_step, enabled=main, step_tags=config.step_timing == "on",
                    purge_step=purge_step, replay=replay)


def open_profiler(config: ml_collections.ConfigDict, train_step: Callable, arguments: tuple[Any, ...],
                  num_classes: int, sharding: NamedSharding, sections: Sections) -> StepProfiler:
    """The --profile-steps profiler, timing itself into `sections`; `arguments` (state, metrics, rest) give the shapes
    of the train step whose compiled HLO names what each traced operation computes."""
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arguments)
    batch = input_pipeline.train_batch_spec(config.batch_size, config.img_size, num_classes,
                                            config.augment == augment.OFFICIAL, sharding)
    return StepProfiler(run_config.parse_profile_steps(config.profile_steps), Path(config.run_dir) / "profile",
                        functools.partial(compiled_hlo, train_step, *abstract, *batch), sections)


def compiled_hlo(train_step: Callable, *abstract_args: Any) -> str:
    """The HLO text of `train_step` compiled for arguments of these shapes and shardings (a profile's ops.json)."""
    return train_step.lower(*abstract_args).compile().as_text()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train and validate each epoch in `workdir` (the run folder); return the summary also saved as summary.json.

    Raises ConfigError for a flag that cannot work with the data, NonFiniteLossError, CheckpointError and
    CheckpointSaveError; `hooks` see and may replace the state before each step (see Hook).
    """
    wall_start, config = time.perf_counter(), default_config.resolve(config)
    with config.unlocked():
        config.run_dir, config.run_name = str(Path(workdir)), Path(workdir).name
    mesh = make_mesh()
    data, steps_per_epoch = load_data(config, mesh)
    total_steps = run_config.total_steps(config.to_dict(), steps_per_epoch)
    epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- state
    graphdef, state, rest, optimizer = create_model_and_state(config, data.num_classes, mesh, steps_per_epoch)
    checkpointer, state, history, best_val_accuracy = start_run(config, data, state, mesh, steps_per_epoch)
    start_step = int(jax.device_get(state.step))

    train_step = make_train_step(graphdef, optimizer, config, mesh, data.num_classes)
    eval_step = make_eval_step(graphdef, mesh)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    augmentation = augment.from_config(config, data.num_classes)  # None: --augment basic
    # Python's copy of the schedule (equal to optax's, tested): evaluating the optax one costs a dispatch.
    learning_rate = functools.partial(run_config.learning_rate, config=config.to_dict(),
                                      steps_per_epoch=steps_per_epoch)
    sections = Sections()  # named timed sections: data, train_step, eval, checkpoint, profile
    clock = StepClock(sections)
    reporter = open_reporter(config, start_step, total_steps, steps_per_epoch)
    profiler = open_profiler(config, train_step, (state, replicate(TrainMetrics.empty(), mesh), rest),
                             data.num_classes, sharding, sections)
    completions = ThreadPoolExecutor(1, thread_name_prefix="step-completion")  # stamps each step's end
    in_flight = host_batches = last_saved = None  # the step dispatched last, the epoch's loader, the newest save
    every = config.checkpoint_every_steps
    try:
        profiler.after_step(start_step)
        for step in range(start_step + 1, total_steps + 1):
            epoch, index = divmod(step - 1, steps_per_epoch)
            if step == start_step + 1 or index == 0:  # ---- an epoch's training starts (or resumes mid-epoch)
                first, last = index, min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                host_batches = iter(input_pipeline.train_batches(data.train, config, epoch, first, last, augmentation))
                metrics = replicate(TrainMetrics.empty(), mesh)
                reporter.set_epoch(epoch + 1, epochs)
                epoch_start, checkpoint_before = time.perf_counter(), sections.totals["checkpoint"]
                clock.start(epoch_start)

            # ---- train: step k+1 is dispatched before the host waits for step k, so the device never idles
            with sections("data") as fetch:
                host_batch = next(host_batches)
            for hook in hooks:
                state = hook(step - 1, state)
            with sections("train_step"):
                state, metrics, outputs = train_step(state, metrics, rest, *input_pipeline.to_global(host_batch,
                                                                                                    sharding))
            previous, in_flight = in_flight, StepInFlight(step, outputs, completions.submit(ready_at, outputs), fetch,
                                                          learning_rate(step - 1))  # optax counts updates from 0
            if previous is not None:
                train_end = reporter.step_done(previous, clock, last_saved)
            epoch_ends = index + 1 == last
            saves_now = bool(every) and step % every == 0 and not epoch_ends
            if not (epoch_ends or saves_now or profiler.is_boundary(step)):
                continue
            # What comes next needs this step finished: a save (never of a non-finite state), a trace, the validation.
            train_end, in_flight = reporter.step_done(in_flight, clock, last_saved), None
            profiler.after_step(step)
            if saves_now:
                with sections("checkpoint"):
                    reporter.flush()  # a run killed after this save resumes with every tag before it
                    checkpointer.save(step, state, checkpoint_meta(step, steps_per_epoch, None, best_val_accuracy,
                                                                   history), None)
                last_saved = checkpointer.directory / str(step)
            if not epoch_ends:
                continue

            # ---- eval
            host_batches.close()
            train_loss = float(jax.device_get(metrics.compute())["loss"])
            with sections("eval") as val_span:
                val = evaluate(eval_step, state.params, rest, data, config, mesh)
            if best_val_accuracy is None or val["accuracy"] > best_val_accuracy:
                best_val_accuracy = val["accuracy"]
            result = run_report.EpochResult(
                epoch=epoch + 1, step=step, steps_timed=last - first, epoch_steps=last, train_loss=train_loss,
                train_time_s=train_end - epoch_start, train_images=(last - first) * config.batch_size,
                val_loss=val["loss"], val_accuracy=val["accuracy"], val_accuracy_top5=val["accuracy_top5"],
                val_time_s=val_span.seconds, val_images=val["images"],
                checkpoint_time_s=0.0, wall_time_s=0.0)  # both known once the checkpoint below is saved
            history.append(result.history_entry())
            reporter.epoch_validated(result)  # on disk before the checkpoint: a kill never leaves one without its epoch

            # ---- checkpoint
            with sections("checkpoint"):
                checkpointer.save(step, state, checkpoint_meta(step, steps_per_epoch, val["accuracy"],
                                                               best_val_accuracy, history), val["accuracy"])
            last_saved = checkpointer.directory / str(step)

            # ---- log
            reporter.epoch_done(dataclasses.replace(
                result, checkpoint_time_s=sections.totals["checkpoint"] - checkpoint_before,
                wall_time_s=time.perf_counter() - epoch_start), epochs)
        reporter.run_done(int(jax.device_get(state.step)), history, best_val_accuracy)
        checkpointer.wait()
    finally:
        completions.shutdown(wait=False, cancel_futures=True)
        if host_batches is not None:
            host_batches.close()
        profiler.stop()
        reporter.close()
        checkpointer.close()

    summary = run_report.run_summary(history, steps=int(jax.device_get(state.step)), steps_per_epoch=steps_per_epoch,
                                     wall_time_s=time.perf_counter() - wall_start, best_val_accuracy=best_val_accuracy)
    if jax.process_index() == 0:
        atomic_write_json(Path(config.run_dir) / "summary.json", summary)
    return summary
