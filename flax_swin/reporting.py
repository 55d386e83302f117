"""The Flax stack's reporting side: step and epoch tags, the progress bar, the device, its peak memory, profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import jax
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm

from shared_data import environment, event_files, tags
from shared_data.run_report import EpochResult


def device_description() -> str:
    """The shared device string for this process's devices, e.g. 'cuda: NVIDIA H200 x1'."""
    device = jax.devices()[0]
    return environment.device_description(device.platform, device.device_kind, len(jax.devices()))


def device_peak_mb() -> float | None:
    """Peak MiB in use on the first local device, where the backend reports it (GPU, TPU; not CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # backends without memory statistics raise rather than return None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


class Reporter:
    """Writes the shared TensorBoard tags and drives the progress bar; on processes other than 0 it does nothing.

    With `step_tags` False (--step-timing off) only the epoch tags are written. A resumed run passes the
    `purge_step` and the `replay` points of shared_data.event_files.resume_purge, so that its event files hold
    each step once.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, step_tags: bool = True,
                 purge_step: int | None = None, replay: Iterable[event_files.Point] = ()) -> None:
        self.step_tags = step_tags  # False (--step-timing off): the epoch tags only
        self.writer = SummaryWriter(logdir=str(run_dir), flush_secs=30, purge_step=purge_step) if enabled else None
        if self.writer is not None:
            event_files.write_points(self.writer, replay)
        self.bar = (tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)
                    if enabled else None)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Show the 1-based epoch being trained."""
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}/{epochs}")

    def step(self, step: int, loss: float, accuracy: float, lr: float, step_s: float, data_wait_s: float) -> None:
        """The step tags of one global optimiser step (seconds; lr is the rate that step's update used)."""
        if self.writer is not None and self.step_tags:
            values = [(tags.TRAIN_LOSS, loss), (tags.TRAIN_ACCURACY, accuracy), (tags.TRAIN_LR, lr),
                      (tags.STEP_TIME, step_s), (tags.DATA_WAIT_TIME, data_wait_s),
                      (tags.COMPUTE_TIME, step_s - data_wait_s)]
            if step == 1:
                values.append((tags.FIRST_STEP_TIME, step_s))
            # One event holding every scalar of the step: a fifth of the cost of one add_scalar call per tag.
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])
            self.writer.file_writer.add_summary(summary, step)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == 1:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

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
        self._write_epoch(scalars, result.epoch)

    def epoch_done(self, result: EpochResult, epochs: int) -> None:
        """The epoch's checkpoint and wall times, which include its save (flushed), and the epoch's line."""
        if self.writer is None:
            return
        self._write_epoch(result.closing_scalars(), result.epoch)
        self.bar.write(result.line(epochs))

    def _write_epoch(self, scalars: dict[str, float], epoch: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        """Flush the event file and end the bar."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class StepProfiler:
    """A jax.profiler trace of global steps first..last (inclusive) into `folder`, for TensorBoard's profile plugin.

    clu.periodic_actions.Profile does this job, but importing clu.periodic_actions imports TensorFlow,
    which the Flax stack runs without.
    """

    def __init__(self, steps: tuple[int, int] | None, folder: Path) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.folder = folder
        self.active = False

    def is_boundary(self, step: int) -> bool:
        """Whether the trace starts right after `step` or ends with it: the loop waits for such a step."""
        return step in (self.first - 1, self.last)

    def after_step(self, step: int) -> None:
        """Call once step `step` has finished: stops the trace at its last step, starts it before its first."""
        if self.active and step >= self.last:
            self.stop()
        if not self.active and step + 1 == self.first:
            jax.profiler.start_trace(str(self.folder))
            self.active = True

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
