"""Callbacks: the shared clock, tags and epoch line with the non-finite loss stop, validation at --max-steps, profiles."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from lightning_swin.checkpointing import AtomicCheckpointIO
from shared_data import op_profile, tags
from shared_data.environment import host_peak_mb
from shared_data.errors import NonFiniteLossError
from shared_data.run_report import EpochResult


class ValidateAtLastStep(pl.Callback):
    """When --max-steps ends the run mid-epoch, still validate the final weights (Lightning would not)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and batch_idx + 1 < trainer.num_training_batches:
            # A requested stop makes Lightning run the validation loop before leaving the epoch.
            trainer.should_stop = True


@dataclasses.dataclass
class _StepInFlight:
    """A finished optimiser step whose loss the host has not read yet (on a GPU: still being computed)."""

    step: int
    values: torch.Tensor  # [loss, accuracy], float32, on the host once `ready` has completed
    ready: torch.cuda.Event | None  # recorded after the copy; None on a CPU, where the step is already done
    lr: float

    def read(self) -> tuple[float, float]:
        """(loss, accuracy), waiting for this step's work only: not for the steps queued after it."""
        if self.ready is not None:
            self.ready.synchronize()
        loss, accuracy = self.values.tolist()
        return loss, accuracy


class TimingAndMetrics(pl.Callback):
    """The clock of shared_data.tags and every shared tag, the non-finite loss stop, and each epoch's line.

    Like the Flax loop it keeps one step in flight: step k's loss is read once step k+1 has been queued (at
    the end of k+1's batch), through a CUDA event on a GPU, so no callback synchronises the device per step.
    A step is read at once where the next thing needs it finished: a step checkpoint, the validation, the
    end of the run. `history` holds one shared_data.run_report entry per validated epoch and travels in the
    checkpoints; seconds spent saving come from `checkpoint_io`, which every save goes through, and seconds spent
    profiling from `profiler`; both are left out of the step times.
    """

    def __init__(self, config: dict[str, Any], num_val_images: int, steps_per_epoch: int, total_steps: int,
                 checkpoint_io: AtomicCheckpointIO, profiler: StepProfiler | None = None) -> None:
        self.global_batch_size = config["batch_size"]
        self.step_tags = config["step_timing"] == "on"
        self.every_n_steps = config["checkpoint_every_steps"]
        self.num_val_images = num_val_images
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.epochs = math.ceil(total_steps / steps_per_epoch)
        self.checkpoint_io = checkpoint_io
        self.profiler = profiler  # its seconds are left out of the step times, as saving's are
        self._profiling_seen = 0.0
        self.history: list[dict[str, float]] = []
        self.last_loss: float | None = None  # shown by the progress bar
        self._in_flight: _StepInFlight | None = None
        self._reset_epoch(time.perf_counter())

    def _reset_epoch(self, now: float) -> None:
        self._epoch_start = self._last_done = self._train_end = self._val_start = now
        self._steps = 0
        self._losses: list[float] = []
        self._result: EpochResult | None = None
        self._saving_at_start = self._saving_seen = self.checkpoint_io.seconds_saving
        self._fetch_seen: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    @staticmethod
    def _write(trainer: pl.Trainer, values: dict[str, float], step: int, flush: bool = False) -> None:
        """Write `values` at TensorBoard step `step`; with `flush`, put them and every tag before them on disk."""
        if not trainer.is_global_zero or trainer.logger is None:
            return
        writer = trainer.logger.experiment
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        if flush:
            writer.flush()

    @staticmethod
    def _fetch_seconds(trainer: pl.Trainer) -> float:
        """Host seconds the training loader has spent obtaining batches so far (see datamodule.ResumableLoader)."""
        return getattr(trainer.train_dataloader, "fetch_seconds", 0.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_epoch(time.perf_counter())
        self._fetch_seen = self._fetch_seconds(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step's update uses

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The global batch's values: the mean over ranks of equal shards (queued, like the step itself).
        values = torch.stack([trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean"),
                              trainer.strategy.reduce(outputs["accuracy"].float(), reduce_op="mean")])
        ready = None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        previous, self._in_flight = self._in_flight, _StepInFlight(trainer.global_step, values, ready, self._lr)
        if previous is not None:
            self._finish(trainer, previous)
        step = trainer.global_step
        saves_now = (self.every_n_steps and step % self.every_n_steps == 0
                     and batch_idx + 1 < trainer.num_training_batches and step < self.total_steps)
        if saves_now:  # the step checkpoint saved after this hook must not hold a non-finite state
            self._finish_in_flight(trainer)
            # Its steps' tags go to disk before it does: a run killed after the save resumes from it, and the
            # resumed run's event files keep only what was on disk (shared_data.event_files.resume_purge).
            self._write(trainer, {}, step, flush=True)

    def _finish_in_flight(self, trainer: pl.Trainer) -> None:
        if self._in_flight is not None:
            self._finish(trainer, self._in_flight)
            self._in_flight = None

    def _finish(self, trainer: pl.Trainer, done: _StepInFlight) -> None:
        """Read a step's loss, stop on a non-finite one, and write the step tags (step time excludes saving)."""
        loss, accuracy = done.read()
        now = time.perf_counter()
        saving = self.checkpoint_io.seconds_saving - self._saving_seen
        fetch = self._fetch_seconds(trainer)
        data_wait = max(fetch - (self._fetch_seen if self._fetch_seen is not None else fetch), 0.0)
        profiling = self.profiler.seconds - self._profiling_seen if self.profiler is not None else 0.0
        step_s = max(now - self._last_done - saving - profiling, 0.0)
        self._last_done, self._saving_seen, self._fetch_seen, self._train_end = now, self.checkpoint_io.seconds_saving, fetch, now
        self._profiling_seen += profiling
        if not math.isfinite(loss):
            # The loss is the mean over ranks, so every rank sees the same value and stops at the same step.
            raise NonFiniteLossError.at_step(done.step, loss, self.checkpoint_io.last_saved)
        self._steps += 1
        self._losses.append(loss)
        self.last_loss = loss
        if self.step_tags:
            values = {tags.TRAIN_LOSS: loss, tags.TRAIN_ACCURACY: accuracy, tags.TRAIN_LR: done.lr,
                      tags.STEP_TIME: step_s, tags.DATA_WAIT_TIME: data_wait, tags.COMPUTE_TIME: step_s - data_wait}
            if done.step == 1:
                values[tags.FIRST_STEP_TIME] = step_s
            self._write(trainer, values, done.step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._finish_in_flight(trainer)
        self._val_start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_in_flight(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        val_loss, val_accuracy = float(metrics[tags.VAL_LOSS]), float(metrics[tags.VAL_ACCURACY])
        val_accuracy_top5 = float(metrics[tags.VAL_ACCURACY_TOP5])  # on the host: the pass is over
        epoch_first = trainer.current_epoch * self.steps_per_epoch
        # Saving and the epoch's end are still to come; their times are filled in on_train_epoch_end.
        self._result = EpochResult(
            epoch=trainer.current_epoch + 1, step=trainer.global_step, steps_timed=self._steps,
            epoch_steps=min(self.steps_per_epoch, self.total_steps - epoch_first),
            train_loss=statistics.fmean(self._losses) if self._losses else float("nan"),
            train_time_s=self._train_end - self._epoch_start, train_images=self._steps * self.global_batch_size,
            val_loss=val_loss, val_accuracy=val_accuracy, val_accuracy_top5=val_accuracy_top5,
            val_time_s=time.perf_counter() - self._val_start, val_images=self.num_val_images,
            checkpoint_time_s=0.0, wall_time_s=0.0,
        )
        # Now, not at the epoch's end: the epoch-end checkpoints (ModelCheckpoints run after this) must hold it.
        self.history.append(self._result.history_entry())
        # On disk before those checkpoints are published: a kill never leaves a checkpoint without its epoch.
        values = dict(self._result.scalars(), **{tags.HOST_PEAK_MB: host_peak_mb()})
        if pl_module.device.type == "cuda":
            values[tags.DEVICE_PEAK_MB] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        self._write(trainer, values, self._result.epoch, flush=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._result is None:
            # Not validated in this process: a resumed run replays the end of the epoch its checkpoint closed.
            return
        result = dataclasses.replace(
            self._result, checkpoint_time_s=self.checkpoint_io.seconds_saving - self._saving_at_start,
            wall_time_s=time.perf_counter() - self._epoch_start,
        )
        self._write(trainer, result.closing_scalars(), result.epoch, flush=True)  # they include the epoch's saves
        if not trainer.is_global_zero:
            return
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.print(result.line(self.epochs))
        else:
            print(result.line(self.epochs), flush=True)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (rate and ETA) showing the last loss the timing callback read (reading it here would
    synchronise the device every step) and without the logger version number, which is always empty here."""

    def __init__(self, timing: TimingAndMetrics) -> None:
        super().__init__()
        self.timing = timing

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if self.timing.last_loss is not None:
            metrics["loss"] = f"{self.timing.last_loss:.4f}"
        return metrics


class StepProfiler(pl.Callback):
    """A torch.profiler trace of global steps first..last (inclusive) into `folder`, for TensorBoard, and the
    per-operation summary of those steps beside it (shared_data.op_profile, ops.json); rank 0's. The mirror of
    flax_swin.reporting.StepProfiler.

    Lightning's PyTorchProfiler wraps every hook of every step in a record_function, which costs time in the steps it
    does not trace, and counts its schedule in its own calls; this starts and stops torch.profiler at the steps asked.
    Each traced step is one op_profile.STEP_RANGE range, and ops.json counts only what ran inside those ranges (not
    a validation or the loading of the next batch between them). `seconds` (host seconds spent starting, stopping and
    summarising) is left out of the step times by TimingAndMetrics, as the Flax loop leaves it out.
    """

    def __init__(self, steps: tuple[int, int] | None, folder: Path) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.folder = folder
        self.profile: torch.profiler.profile | None = None
        self.step_range: torch.profiler.record_function | None = None
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Rank 0 only, as the Flax stack's process 0: the ranks of one machine would share one folder.
        if self.profile is None and trainer.global_step + 1 == self.first and trainer.is_global_zero:
            started = time.perf_counter()
            on_gpu = trainer.strategy.root_device.type == "cuda"
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
            handler = torch.profiler.tensorboard_trace_handler(str(self.folder), worker_name=f"rank{trainer.global_rank}")
            if on_gpu:
                torch.cuda.synchronize()  # earlier steps' kernels are not this trace's
            self.profile = torch.profiler.profile(activities=activities, on_trace_ready=handler)
            self.profile.start()
            self.seconds += time.perf_counter() - started
        if self.profile is not None:
            self.step_range = torch.profiler.record_function(op_profile.STEP_RANGE)
            self.step_range.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.profile is None:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels end inside its range
        self._end_step_range()
        if trainer.global_step >= self.last:
            self._stop(complete=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(complete=False)  # the run ended before the last traced step: a partial trace, no ops.json

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop(complete=False)

    def _end_step_range(self) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None

    def _stop(self, complete: bool) -> None:
        if self.profile is None:
            return
        started = time.perf_counter()
        self._end_step_range()
        profile, self.profile = self.profile, None
        profile.stop()
        if complete:
            try:
                ops, clock = torch_op_times(profile, self.last - self.first + 1)
                op_profile.write_ops(self.folder, stack="lightning", steps=(self.first, self.last), clock=clock, ops=ops)
            except Exception as error:  # the trace is written; a summary that fails must not end the training run
                warnings.warn(f"{self.folder}: no {op_profile.OPS_FILE} from the trace ({error})", stacklevel=2)
        self.seconds += time.perf_counter() - started


def torch_op_times(profile: torch.profiler.profile, steps: int) -> tuple[list[op_profile.OpTime], str]:
    """Self time per step (seconds) of each operation that started inside an op_profile.STEP_RANGE range of a
    finished torch.profiler trace, on any thread (autograd's backward threads included), with its kind (op_profile);
    and the clock: 'device' (CUDA kernel time attributed to each op) when the trace has CUDA activity, else 'cpu'."""
    events = profile.events()
    windows = [(event.time_range.start, event.time_range.end) for event in events if event.name == op_profile.STEP_RANGE]
    on_device = any(event.self_device_time_total > 0 for event in events)
    rows = []
    for event in events:
        if event.name == op_profile.STEP_RANGE or not any(start <= event.time_range.start <= end
                                                            for start, end in windows):
            continue
        seconds = (event.self_device_time_total if on_device else event.self_cpu_time_total) / 1e6
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        rows.append((event.name, op_profile.torch_kind(event.name, ancestors), seconds))
    return op_profile.aggregate(rows, steps), "device" if on_device else "cpu"
