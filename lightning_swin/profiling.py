"""Per-operation profiles of the Lightning train step: a torch.profiler trace of chosen steps and its ops.json
summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from shared_data import errors, op_profile
from shared_data.clock import Sections


class StepProfiler(pl.Callback):
    """A torch.profiler trace of global steps first..last (inclusive) into `folder`, for TensorBoard, and the
    per-operation summary of those steps beside it (shared_data.op_profile, ops.json); rank 0's. The mirror of
    flax_swin.profiling.StepProfiler.

    Lightning's PyTorchProfiler wraps every hook of every step in a record_function, which costs time in the steps it
    does not trace, and counts its schedule in its own calls; this starts and stops torch.profiler at the steps asked.
    Each traced step is one op_profile.STEP_RANGE range, and ops.json counts only what ran inside those ranges (not
    a validation or the loading of the next batch between them). The host time spent starting, stopping and
    summarising a trace goes into the "profile" section of `sections`, which the step clock leaves out of the step
    times, as the Flax profiler's.
    """

    def __init__(self, steps: tuple[int, int] | None, folder: Path, sections: Sections) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.folder = folder
        self.sections = sections
        self.profile: torch.profiler.profile | None = None
        self.step_range: torch.profiler.record_function | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Rank 0 only, as the Flax stack's process 0: the ranks of one machine would share one folder.
        if self.profile is None and trainer.global_step + 1 == self.first and trainer.is_global_zero:
            with self.sections("profile"):
                on_gpu = trainer.strategy.root_device.type == "cuda"
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
                handler = torch.profiler.tensorboard_trace_handler(str(self.folder),
                                                                   worker_name=f"rank{trainer.global_rank}")
                if on_gpu:
                    torch.cuda.synchronize()  # earlier steps' kernels are not this trace's
                self.profile = torch.profiler.profile(activities=activities, on_trace_ready=handler)
                self.profile.start()
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
        with self.sections("profile"):
            self._end_step_range()
            profile, self.profile = self.profile, None
            profile.stop()
            if complete:
                self._summarise(profile)

    def _summarise(self, profile: torch.profiler.profile) -> None:
        try:
            ops, clock = torch_op_times(profile, self.last - self.first + 1)
            op_profile.write_ops(self.folder, stack="lightning", steps=(self.first, self.last), clock=clock, ops=ops)
        except Exception as error:  # the trace is written; a summary that fails must not end the training run
            errors.warn(f"{self.folder}: no {op_profile.OPS_FILE} from the trace ({errors.first_line(error)})")


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
