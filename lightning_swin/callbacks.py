"""Callbacks: the shared clock, tags and epoch line with the non-finite loss stop, dashboards, --max-steps, the bar."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from lightning_swin.checkpointing import AtomicCheckpointIO
from lightning_swin.devices import device_peak_mb
from shared_data import dashboards, event_files, tags
from shared_data.clock import Sections, Span, StepClock
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
class StepInFlight:
    """A finished optimiser step whose loss the host has not read yet (on a GPU: maybe still being computed); the
    mirror of flax_swin.train.StepInFlight."""

    step: int
    values: torch.Tensor  # [loss, accuracy], float32, on the host once `done` has completed
    # Its completion (shared_data.tags): a CUDA event recorded after the optimiser step, or on a CPU, where the
    # step runs synchronously, the host perf_counter when it returned.
    done: torch.cuda.Event | float
    fetch: Span  # the host's fetch of this step's batch
    lr: float  # the rate this step's update used

    def read(self) -> tuple[float, float]:
        """(loss, accuracy), waiting for this step's work only: not for the steps queued after it."""
        if isinstance(self.done, torch.cuda.Event):
            self.done.synchronize()
        loss, accuracy = self.values.tolist()
        return loss, accuracy


class TimingAndMetrics(pl.Callback):
    """The clock of shared_data.tags and every shared tag, the non-finite loss stop, and each epoch's line.

    Each step's completion is stamped as shared_data.tags defines it: on a CPU when the step returns, on a GPU by a
    CUDA event read one step later (so no callback synchronises the device per step; a step is read at once where
    the next thing needs it finished: a step checkpoint, the validation, the end of the run). `history` holds one
    shared_data.run_report entry per validated epoch and travels in the checkpoints. Host seconds in the
    "checkpoint" and "profile" sections of `sections` (the CheckpointIO and the profiler time themselves there) are
    left out of the step times; the batch fetch of each step comes from the loader (datamodule.ResumableLoader).
    The dashboards' records (shared_data.dashboards) go in too: the layout and HParams session when training starts,
    the run's outcome when it ends.
    """

    def __init__(self, config: dict[str, Any], num_val_images: int, steps_per_epoch: int, total_steps: int,
                 checkpoint_io: AtomicCheckpointIO, sections: Sections) -> None:
        self.global_batch_size = config["batch_size"]
        self.run_dir = config["run_dir"]
        self.step_tags = config["step_timing"] == "on"
        self.every_n_steps = config["checkpoint_every_steps"]
        self.num_val_images = num_val_images
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.epochs = math.ceil(total_steps / steps_per_epoch)
        self.checkpoint_io = checkpoint_io
        self.sections = sections
        self.clock = StepClock(sections)
        self.history: list[dict[str, float]] = []
        self.last_loss: float | None = None  # shown by the progress bar
        self.completion = "host return"  # how the last step's completion was stamped: "cuda event" on a GPU
        self._in_flight: StepInFlight | None = None
        self._reset_epoch(time.perf_counter())

    def _reset_epoch(self, now: float) -> None:
        self._epoch_start = self._train_end = self._val_start = now
        self._steps = 0
        self._losses: list[float] = []
        self._result: EpochResult | None = None
        self._checkpoint_before = self.sections.totals["checkpoint"]
        self._previous_event: torch.cuda.Event | None = None  # the device's stamp the next step counts from (GPU)
        self.clock.start(now)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    @staticmethod
    def _writer(trainer: pl.Trainer) -> Any:
        """The run's SummaryWriter on the process that writes (global rank 0, with a logger), else None."""
        return trainer.logger.experiment if trainer.is_global_zero and trainer.logger is not None else None

    def _write(self, trainer: pl.Trainer, values: dict[str, float], step: int, flush: bool = False) -> None:
        """Write `values` at TensorBoard step `step`; with `flush`, put them and every tag before them on disk."""
        writer = self._writer(trainer)
        if writer is None:
            return
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        if flush:
            writer.flush()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (writer := self._writer(trainer)) is not None:
            # SummaryWriter has no add_summary of its own; its FileWriter's is public.
            for summary in dashboards.run_start(self.run_dir):
                writer.file_writer.add_summary(summary, 0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_epoch(time.perf_counter())
        if pl_module.device.type == "cuda":
            self._previous_event = torch.cuda.Event(enable_timing=True)
            self._previous_event.record()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step's update uses
        now = time.perf_counter()
        self._fetch = getattr(trainer.train_dataloader, "last_fetch", None) or Span(now, now)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The global batch's values: the mean over ranks of equal shards (queued, like the step itself).
        values = torch.stack([trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean"),
                              trainer.strategy.reduce(outputs["accuracy"].float(), reduce_op="mean")])
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record()
        else:
            done = time.perf_counter()
        previous, self._in_flight = self._in_flight, StepInFlight(trainer.global_step, values, done, self._fetch,
                                                                  self._lr)
        if previous is not None:
            self._finish(trainer, previous)
        step = trainer.global_step
        saves_now = (self.every_n_steps and step % self.every_n_steps == 0
                     and batch_idx + 1 < trainer.num_training_batches and step < self.total_steps)
        # On a CPU the step is done: read it now. Before a step checkpoint too: it must not hold a non-finite state.
        if not values.is_cuda or saves_now:
            self._finish_in_flight(trainer)
        if saves_now:
            # Its steps' tags go to disk before it does: a run killed after the save resumes from it, and the
            # resumed run's event files keep only what was on disk (shared_data.event_files.resume_purge).
            self._write(trainer, {}, step, flush=True)

    def _finish_in_flight(self, trainer: pl.Trainer) -> None:
        if self._in_flight is not None:
            self._finish(trainer, self._in_flight)
            self._in_flight = None

    def _finish(self, trainer: pl.Trainer, done: StepInFlight) -> None:
        """Read a step's loss, stop on a non-finite one, and write the step tags (shared_data.tags' clock)."""
        loss, accuracy = done.read()
        if isinstance(done.done, torch.cuda.Event):
            times = self.clock.completed_after(self._previous_event.elapsed_time(done.done) / 1000, done.fetch)
            self._previous_event, self._train_end, self.completion = done.done, time.perf_counter(), "cuda event"
        else:
            times = self.clock.completed_at(done.done, done.fetch)
            self._train_end = done.done
        if not math.isfinite(loss):
            # The loss is the mean over ranks, so every rank sees the same value and stops at the same step.
            raise NonFiniteLossError.at_step(done.step, loss, self.checkpoint_io.last_saved)
        self._steps += 1
        self._losses.append(loss)
        self.last_loss = loss
        if self.step_tags and (writer := self._writer(trainer)) is not None:
            writer.file_writer.add_summary(event_files.step_summary(done.step, loss, accuracy, done.lr, times),
                                           done.step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._finish_in_flight(trainer)
        self._val_start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_in_flight(trainer)
        if self._writer(trainer) is not None:
            self._write(trainer, {}, trainer.global_step, flush=True)  # the outcome's median reads the event files
            self._write(trainer, dashboards.outcome(self.run_dir, self.history), trainer.global_step, flush=True)

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
        peak = device_peak_mb(pl_module.device)
        if peak is not None:
            values[tags.DEVICE_PEAK_MB] = peak
        self._write(trainer, values, self._result.epoch, flush=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._result is None:
            # Not validated in this process: a resumed run replays the end of the epoch its checkpoint closed.
            return
        result = dataclasses.replace(
            self._result, checkpoint_time_s=self.sections.totals["checkpoint"] - self._checkpoint_before,
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
