"""The Flax stack's clock and reporting side: the step in flight, the event file, the shared step and epoch tags with
the non-finite loss stop, the dashboards' records, and the progress bar (the mirror of lightning_swin/callbacks.py)."""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterable

import jax

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

from flax_swin.devices import device_peak_mb
from shared_data import dashboards, environment, event_files, tags
from shared_data.clock import Span, StepClock
from shared_data.errors import NonFiniteLossError
from shared_data.run_report import EpochResult


@dataclasses.dataclass
class StepInFlight:
    """A dispatched optimiser step whose loss the host has not read yet; the mirror of
    lightning_swin.callbacks.StepInFlight.

    `done` resolves to the host perf_counter at which the step's outputs became ready (shared_data.tags: completion),
    stamped by the thread that waits on them (ready_at), so a slow fetch of the next batch is not counted in it.
    """

    step: int
    values: dict[str, jax.Array]  # loss and accuracy of the step's global batch, still on the device
    done: Future
    fetch: Span  # the host's fetch of this step's batch
    lr: float  # the rate this step's update used

    def read(self) -> tuple[float, float]:
        """(loss, accuracy), waiting for this step's work only."""
        values = jax.device_get(self.values)
        return float(values["loss"]), float(values["accuracy"])


def ready_at(values: Any) -> float:
    """Block until `values` are computed and return the host perf_counter then (run in the completion thread)."""
    jax.block_until_ready(values)
    return time.perf_counter()


class EventFile:
    """A run's TensorBoard event file, written by the tensorboard package's own writer (no TensorFlow needed).

    Not tensorboardX's SummaryWriter: its flush() leaves the events still queued for its writer thread unwritten, and a
    run killed after a checkpoint then loses tags of the steps that checkpoint holds, which its resume cannot write
    again. flush() here returns once every event added before it is on disk. `purge_step` writes what
    SummaryWriter(purge_step=...) writes: readers drop every point of the earlier files at that step or later.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None, flush_secs: int = 30) -> None:
        self.file = EventFileWriter(str(run_dir), flush_secs=flush_secs)
        if purge_step is not None:
            self.file.add_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
            self.file.add_event(Event(step=purge_step, wall_time=time.time(),
                                      session_log=SessionLog(status=SessionLog.START)))

    def add_summary(self, summary: Summary, step: int, walltime: float | None = None) -> None:
        """Queue `summary` at TensorBoard step `step` (wall time: now, unless given in seconds since the epoch)."""
        self.file.add_event(Event(wall_time=time.time() if walltime is None else walltime, step=int(step),
                                  summary=summary))

    def add_scalar(self, tag: str, value: float, step: int, walltime: float | None = None) -> None:
        """Queue one scalar; the signature of SummaryWriter.add_scalar, which event_files.write_points calls."""
        self.add_summary(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step, walltime)

    def flush(self) -> None:
        """Return once every event queued so far is written to the file."""
        self.file.flush()

    def close(self) -> None:
        """Write everything queued and close the file."""
        self.file.close()


class Reporter:
    """Writes the shared TensorBoard tags and drives the progress bar; on processes other than 0 it does nothing.

    With `step_tags` False (--step-timing off) only the epoch tags are written. A resumed run passes the
    `purge_step` and the `replay` points of shared_data.event_files.resume_purge, so that its event files hold
    each step once. The event file opens with the dashboards' records of shared_data.dashboards.run_start, read from
    the run folder's config.json.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, step_tags: bool = True,
                 purge_step: int | None = None, replay: Iterable[event_files.Point] = ()) -> None:
        self.step_tags = step_tags  # False (--step-timing off): the epoch tags only
        self.run_dir = run_dir
        self.writer = EventFile(run_dir, purge_step) if enabled else None
        if self.writer is not None:
            event_files.write_points(self.writer, replay)
            for summary in dashboards.run_start(run_dir):
                self.writer.add_summary(summary, 0)
        self.bar = (tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)
                    if enabled else None)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Show the 1-based epoch being trained."""
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}/{epochs}")

    def step_done(self, done: StepInFlight, clock: StepClock, last_saved: Path | None) -> float:
        """Wait for a step, stop on a non-finite loss, write its tags (shared_data.tags' clock); return its completion.

        Raises NonFiniteLossError naming the step and the last checkpoint saved before it.
        """
        loss, accuracy = done.read()
        ended = done.done.result()
        if not math.isfinite(loss):
            raise NonFiniteLossError.at_step(done.step, loss, last_saved)
        times = clock.completed_at(ended, done.fetch)
        if self.writer is not None and self.step_tags:
            self.writer.add_summary(event_files.step_summary(done.step, loss, accuracy, done.lr, times), done.step)
        if self.bar is not None:
            self.bar.update(1)
            if done.step % 10 == 0 or done.step == 1:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        return ended

    def epoch_validated(self, result: EpochResult) -> None:
        """The epoch tags known once its validation is over (step = 1-based epoch), host and device peak memory,
        flushed to disk with every step tag before them: call it before the epoch's checkpoint is saved."""
        if self.writer is None:
            return
        scalars = dict(result.scalars())
        scalars[tags.HOST_PEAK_MB] = environment.host_peak_mb()
        peak = device_peak_mb()
        if peak is not None:
            scalars[tags.DEVICE_PEAK_MB] = peak
        self._write_flushed(scalars, result.epoch)

    def epoch_done(self, result: EpochResult, epochs: int) -> None:
        """The epoch's checkpoint and wall times, which include its save (flushed), and the epoch's line."""
        if self.writer is None:
            return
        self._write_flushed(result.closing_scalars(), result.epoch)
        self.bar.write(result.line(epochs))

    def run_done(self, step: int, history: list[dict[str, float]], best_val_accuracy: float | None) -> None:
        """Once the training has ended at global step `step`: the run's outcome for the HParams dashboard
        (shared_data.dashboards.outcome, from the epoch `history` and every step time on disk), flushed."""
        if self.writer is None:
            return
        self.writer.flush()  # the outcome's median reads the step times from the event files
        self._write_flushed(dashboards.outcome(self.run_dir, history, best_val_accuracy), step)

    def flush(self) -> None:
        """Put every tag written so far on disk: before a step checkpoint is saved, so that a run killed after it
        resumes with all its steps' tags (a resumed run keeps only what is on disk, shared_data.event_files)."""
        if self.writer is not None:
            self.writer.flush()

    def _write_flushed(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush the event file and end the bar."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
