"""Event files: each step's tags as one event, and across a resume the step a resumed run's writer purges from and
the points it writes again."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

from tensorboard.compat.proto.summary_pb2 import Summary

from shared_data import tags
from shared_data.clock import StepTimes


@dataclasses.dataclass(frozen=True)
class Point:
    """One scalar as written: its tag, TensorBoard step, value and wall time."""

    tag: str
    step: int
    value: float
    wall_time: float


def step_summary(step: int, loss: float, accuracy: float, lr: float, times: StepTimes) -> Summary:
    """Every step tag of one optimiser step (train loss, top-1 accuracy 0..1, the learning rate its update used, and
    its times in seconds, shared_data.tags) in one Summary, which both stacks write as one event: one event per tag
    costs five times the host time (0.37 ms against 0.06 ms per step through tensorboard's writer, 2-core EPYC)."""
    values = [(tags.TRAIN_LOSS, loss), (tags.TRAIN_ACCURACY, accuracy), (tags.TRAIN_LR, lr),
              (tags.STEP_TIME, times.step_s), (tags.DATA_WAIT_TIME, times.data_wait_s),
              (tags.COMPUTE_TIME, times.compute_s)]
    if step == 1:
        values.append((tags.FIRST_STEP_TIME, times.step_s))
    return Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])


def resume_purge(run_dir: str | os.PathLike, restored_step: int, steps_per_epoch: int) -> tuple[int, list[Point]]:
    """The purge step of a resumed run's event writer, and the points to write again right after it.

    A writer opened with TensorBoard's purge_step P makes readers drop every point at step P or later, whatever
    its tag. What a killed run wrote after its restored checkpoint must go: the step tags after `restored_step`,
    and the epoch tags of an epoch that checkpoint does not complete (an epoch's tags are flushed before its
    checkpoint is published, so a kill between the two leaves them). Purging from restored_step + 1 drops the
    first. Epoch tags count epochs, not steps: when such a stale epoch is found, the purge starts at the first
    epoch the checkpoint does not complete, and the step points from there to `restored_step`, which that purge
    drops too, are returned to be written again.
    """
    completed = restored_step // steps_per_epoch
    points = read_points(run_dir)
    if not any(point.tag in tags.EPOCH_AXIS and point.step > completed for point in points):
        return restored_step + 1, []
    return completed + 1, [point for point in points
                           if point.tag not in tags.EPOCH_AXIS and completed < point.step <= restored_step]


def read_points(run_dir: str | os.PathLike) -> list[Point]:
    """Every scalar point of the event files directly in `run_dir`, as TensorBoard shows them (purges applied)."""
    if not any("tfevents" in path.name for path in Path(run_dir).glob("events.out.*")):
        return []
    # Here, not at the top: only a resume reads event files, and tensorboard takes a second to import.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [Point(tag, event.step, event.value, event.wall_time)
            for tag in accumulator.Tags()["scalars"] for event in accumulator.Scalars(tag)]


def write_points(writer: Any, points: Iterable[Point]) -> None:
    """Write `points` again through a writer with SummaryWriter's add_scalar (torch's, or the Flax stack's
    reporting.EventFile), with their original wall times."""
    for point in points:
        writer.add_scalar(point.tag, point.value, point.step, walltime=point.wall_time)
