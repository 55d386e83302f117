"""What a run reports, built once for both stacks: the config.json record, each epoch's tags and line, summary.json."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from shared_data import environment, tags


def run_record(data: Any, *, dataset_requested: str, device: str, arithmetic: str, num_params: int, compile: bool,
               steps_per_epoch: int, num_devices: int, num_processes: int) -> dict[str, Any]:
    """The facts config.json records beside the flags: the dataset actually used (`data` is a PreparedData),
    the device string, what --precision computes (each stack's devices.arithmetic), library versions, parameter
    count, and the run's shape (steps per epoch, devices)."""
    return dict(
        dataset=data.dataset, dataset_requested=dataset_requested, fell_back=data.fell_back,
        num_classes=data.num_classes, device=device, arithmetic=arithmetic, versions=environment.library_versions(),
        num_params=int(num_params), compile=bool(compile), steps_per_epoch=int(steps_per_epoch),
        num_devices=int(num_devices), num_processes=int(num_processes),
    )


@dataclasses.dataclass(frozen=True)
class EpochResult:
    """One trained and validated epoch, as both stacks measure it.

    Times in seconds: `train_time_s` from the epoch's start to its last step's end, `val_time_s` the whole
    validation pass, `checkpoint_time_s` the time saving blocked training, `wall_time_s` the whole epoch with
    logging. `train_images` and `val_images` count images (global batch x steps; every validation image once).
    `steps_timed` counts the optimiser steps this process trained (and timed) in the epoch, `epoch_steps` the
    steps the epoch has: fewer timed ones mean a resume split the epoch, whose speed figures are partial.
    """

    epoch: int  # 1-based
    step: int  # global optimiser step at the epoch's end
    steps_timed: int
    epoch_steps: int
    train_loss: float  # mean over the epoch's steps
    train_time_s: float
    train_images: int
    val_loss: float
    val_accuracy: float
    val_accuracy_top5: float
    val_time_s: float
    val_images: int
    checkpoint_time_s: float
    wall_time_s: float

    @property
    def partial(self) -> bool:
        return self.steps_timed < self.epoch_steps

    @property
    def train_images_per_s(self) -> float:
        return self.train_images / self.train_time_s if self.train_time_s > 0 else 0.0

    @property
    def val_images_per_s(self) -> float:
        return self.val_images / self.val_time_s if self.val_time_s > 0 else 0.0

    def scalars(self) -> dict[str, float]:
        """The epoch tags known once the validation is over (TensorBoard step = `epoch`), without the memory tags:
        both stacks write and flush them before the epoch's checkpoint is saved, so a kill never publishes a
        checkpoint whose epoch the event files lack."""
        return {
            tags.EPOCH_TRAIN_TIME: self.train_time_s, tags.EPOCH_VAL_TIME: self.val_time_s,
            tags.EPOCH_TRAIN_IMAGES_PER_S: self.train_images_per_s, tags.EPOCH_VAL_IMAGES_PER_S: self.val_images_per_s,
            tags.EPOCH_STEPS_TIMED: self.steps_timed,
            tags.VAL_LOSS: self.val_loss, tags.VAL_ACCURACY: self.val_accuracy,
            tags.VAL_ACCURACY_TOP5: self.val_accuracy_top5,
        }

    def closing_scalars(self) -> dict[str, float]:
        """The epoch tags that include the epoch's checkpoint save, so are known only after it."""
        return {tags.EPOCH_CHECKPOINT_TIME: self.checkpoint_time_s, tags.EPOCH_WALL_TIME: self.wall_time_s}

    def history_entry(self) -> dict[str, float]:
        """The record kept in checkpoints and summed up in summary.json."""
        return dict(epoch=self.epoch, step=self.step, partial=self.partial, train_loss=self.train_loss,
                    train_images_per_s=self.train_images_per_s, val_images_per_s=self.val_images_per_s,
                    val_accuracy=self.val_accuracy, val_loss=self.val_loss)

    def line(self, epochs: int) -> str:
        """The one line printed when the epoch ends."""
        return (f"epoch {self.epoch}/{epochs}: train loss {self.train_loss:.4f}, val loss {self.val_loss:.4f}, "
                f"val acc {self.val_accuracy:.2%} (top-5 {self.val_accuracy_top5:.2%}), "
                f"{self.train_images_per_s:.1f} img/s train, {self.val_images_per_s:.1f} img/s val, "
                f"{self.wall_time_s:.1f} s")


def run_summary(history: list[dict[str, float]], *, steps: int, steps_per_epoch: int, wall_time_s: float,
                best_val_accuracy: float | None = None) -> dict[str, Any]:
    """summary.json: final and best val accuracy (0..1), steps, epochs completed, wall seconds, and the median
    images/s over the whole epochs (those split by a resume are listed under `partial_epochs`, not counted)."""
    accuracies = [entry["val_accuracy"] for entry in history]
    return dict(
        wall_time_s=wall_time_s, final_val_accuracy=accuracies[-1] if accuracies else None,
        best_val_accuracy=best_accuracy(history, best_val_accuracy), steps=int(steps),
        epochs_completed=int(steps) // steps_per_epoch,
        images_per_s={"train": whole_epoch_median(history, "train_images_per_s"),
                      "val": whole_epoch_median(history, "val_images_per_s")},
        partial_epochs=[entry["epoch"] for entry in history if entry.get("partial")],
    )


def whole_epoch_median(history: list[dict[str, float]], key: str) -> float | None:
    """The median of `key` over the history's whole epochs (an epoch split by a resume is partial, left out); None
    when there is none."""
    values = [entry[key] for entry in history if not entry.get("partial")]
    return statistics.median(values) if values else None


def best_accuracy(history: list[dict[str, float]], best_val_accuracy: float | None = None) -> float | None:
    """The run's best val accuracy (0..1): `best_val_accuracy` when the stack tracks it, else the history's best."""
    accuracies = [entry["val_accuracy"] for entry in history]
    if best_val_accuracy is None and accuracies:
        return max(accuracies)
    return best_val_accuracy
