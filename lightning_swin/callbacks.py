"""Callbacks: the shared TensorBoard timing/metric tags, trash-safe checkpoint retention, non-finite loss stop."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

from shared_data import tags
from shared_data.timing import host_peak_mb
from shared_data.trash_safe import remove_path


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the step."""


def _synchronize(module: pl.LightningModule) -> None:
    """Wait for queued device work, so host clocks measure the computation and not its dispatch."""
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def epoch_of_step(trainer: pl.Trainer) -> int:
    """1-based epoch that the latest optimiser step belongs to (0 before the first step)."""
    steps_per_epoch = trainer.num_training_batches
    if trainer.global_step == 0:
        return 0
    if not math.isfinite(steps_per_epoch) or steps_per_epoch < 1:
        return trainer.current_epoch + 1
    return (trainer.global_step - 1) // int(steps_per_epoch) + 1


class ValidateAtLastStep(pl.Callback):
    """When --max-steps ends the run mid-epoch, still validate the final weights (Lightning would not)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # A requested stop makes Lightning run the validation loop before leaving the epoch.
            trainer.should_stop = True


class NonFiniteLossStop(pl.Callback):
    """Stop the run at the first non-finite loss, before any checkpoint of the damaged weights is written."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"].detach()
        # Every rank must take the same decision, or the healthy ones wait forever at the next all-reduce.
        bad = trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {trainer.global_step}; stopped. The last checkpoint "
                "before it is intact: lower --lr, raise --warmup-epochs or use --precision fp32, then --resume"
            )


class TrashSafeModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint keeping the best (by val accuracy) and the latest, deleting old files trash-safely.

    Each save gets a new file name (never an overwrite, whose old bytes a cloud drive would keep in
    its trash); the superseded file is then removed through shared_data.trash_safe.remove_path.
    """

    CHECKPOINT_NAME_LAST = "last-epoch={epoch_number:03d}-step={step:06d}"

    def __init__(self, dirpath: str | Path, keep: int, every_n_steps: int = 0) -> None:
        super().__init__(
            dirpath=str(dirpath), filename="best-epoch={epoch_number:03d}-step={step:06d}-val_accuracy={"
            + tags.VAL_ACCURACY + ":.4f}", monitor=tags.VAL_ACCURACY, mode="max", save_top_k=keep - 1,
            save_last=True, auto_insert_metric_name=False, every_n_epochs=1, save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self.every_n_steps = every_n_steps
        self.seconds_saving = 0.0  # running total; the timing callback reads differences

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["epoch_number"] = torch.tensor(epoch_of_step(trainer))
        return candidates

    def _save(self, trainer: pl.Trainer, with_best: bool) -> None:
        start = time.perf_counter()
        candidates = self._monitor_candidates(trainer)
        if with_best:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self.seconds_saving += time.perf_counter() - start

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path:
            # The state just restored is already on disk; saving it again would overwrite that file in place.
            self._last_global_step_saved = trainer.global_step

    def _may_save(self, trainer: pl.Trainer) -> bool:
        return not self._should_skip_saving_checkpoint(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        epoch_end = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        run_end = trainer.max_steps > 0 and step >= trainer.max_steps
        # The epoch-end save (after validation) and the final save cover those steps.
        if self.every_n_steps and step % self.every_n_steps == 0 and not epoch_end and not run_end and self._may_save(trainer):
            self._save(trainer, with_best=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._may_save(trainer):
            self._save(trainer, with_best=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # saving happens after validation, which runs every epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run stopped by --max-steps between validations still leaves its final state.
        if self._may_save(trainer):
            self._save(trainer, with_best=False)

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        # Unlike the parent, also retire the file this run resumed from once newer ones exist.
        if Path(previous).absolute() == Path(current).absolute() or self.dirpath is None:
            return False
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            remove_path(filepath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Track the files by name in this folder, so a run moved or resumed from another directory
        # still retires its old checkpoints.
        folder = Path(self.dirpath) if self.dirpath else None

        def here(path: str) -> str:
            return str(folder / Path(path).name) if path and folder is not None else path

        state = dict(state_dict, dirpath=self.dirpath)
        state["best_k_models"] = {here(p): v for p, v in state_dict.get("best_k_models", {}).items()}
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = here(state[key])
        super().load_state_dict(state)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (rate and ETA) without the logger version number, which is always empty here."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class TimingAndMetrics(pl.Callback):
    """Writes every shared TensorBoard tag with the shared step axes, and a one-line summary per epoch."""

    def __init__(self, global_batch_size: int, num_val_images: int, checkpoint: TrashSafeModelCheckpoint | None = None) -> None:
        self.global_batch_size = global_batch_size
        self.num_val_images = num_val_images
        self.checkpoint = checkpoint
        self.epochs: list[dict[str, float]] = []  # per finished epoch, for summary.json
        self.last_step = 0
        self._first_step_logged = False
        self._reset_epoch(time.perf_counter())

    def _reset_epoch(self, now: float) -> None:
        self._epoch_start = now
        self._previous_end = now
        self._train_end = now
        self._steps = 0
        self._losses: list[float] = []
        self._val_time: float | None = None
        self._checkpoint_seconds_at_start = self._checkpoint_seconds()
        self._checkpoint_seconds_seen = self._checkpoint_seconds_at_start

    def _checkpoint_seconds(self) -> float:
        return self.checkpoint.seconds_saving if self.checkpoint is not None else 0.0

    @staticmethod
    def _write(trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
        if not trainer.is_global_zero or trainer.logger is None:
            return
        writer = trainer.logger.experiment
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _synchronize(pl_module)
        self._reset_epoch(time.perf_counter())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        _synchronize(pl_module)
        self._step_start = time.perf_counter()
        # A step-triggered checkpoint save ran after the previous step; it is not time spent waiting for data.
        saving = self._checkpoint_seconds() - self._checkpoint_seconds_seen
        self._checkpoint_seconds_seen = self._checkpoint_seconds()
        self._data_wait = max(self._step_start - self._previous_end - saving, 0.0)
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _synchronize(pl_module)
        end = time.perf_counter()
        compute = end - self._step_start
        self._previous_end = self._train_end = end
        # The global batch's values: the mean over ranks of equal shards.
        loss = float(trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean"))
        accuracy = float(trainer.strategy.reduce(outputs["accuracy"].float(), reduce_op="mean"))
        step = trainer.global_step
        self.last_step = step
        self._steps += 1
        self._losses.append(loss)
        values = {
            tags.TRAIN_LOSS: loss, tags.TRAIN_ACCURACY: accuracy, tags.TRAIN_LR: self._lr,
            tags.STEP_TIME: self._data_wait + compute, tags.DATA_WAIT_TIME: self._data_wait, tags.COMPUTE_TIME: compute,
        }
        if not self._first_step_logged:
            values[tags.FIRST_STEP_TIME] = self._data_wait + compute
            self._first_step_logged = True
        self._write(trainer, values, step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        _synchronize(pl_module)
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        _synchronize(pl_module)
        self._val_time = time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        train_time = self._train_end - self._epoch_start
        checkpoint_time = self._checkpoint_seconds() - self._checkpoint_seconds_at_start
        images = self._steps * self.global_batch_size
        record: dict[str, float] = {
            tags.EPOCH_TRAIN_TIME: train_time,
            tags.EPOCH_TRAIN_IMAGES_PER_S: images / train_time if train_time > 0 else 0.0,
            tags.EPOCH_CHECKPOINT_TIME: checkpoint_time,
            tags.HOST_PEAK_MB: host_peak_mb(),
        }
        if pl_module.device.type == "cuda":
            record[tags.DEVICE_PEAK_MB] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        metrics = trainer.callback_metrics
        if self._val_time is not None and tags.VAL_ACCURACY in metrics:
            record.update({
                tags.EPOCH_VAL_TIME: self._val_time,
                tags.EPOCH_VAL_IMAGES_PER_S: self.num_val_images / self._val_time if self._val_time > 0 else 0.0,
                tags.VAL_LOSS: float(metrics[tags.VAL_LOSS]),
                tags.VAL_ACCURACY: float(metrics[tags.VAL_ACCURACY]),
                tags.VAL_ACCURACY_TOP5: float(metrics[tags.VAL_ACCURACY_TOP5]),
            })
        _synchronize(pl_module)
        record[tags.EPOCH_WALL_TIME] = time.perf_counter() - self._epoch_start
        self._write(trainer, record, epoch)
        record["epoch"] = epoch
        record["train_loss"] = statistics.fmean(self._losses) if self._losses else math.nan
        self.epochs.append(record)
        if trainer.is_global_zero:
            self._print_summary(trainer, record)

    def _print_summary(self, trainer: pl.Trainer, record: dict[str, float]) -> None:
        val = (f"val loss {record[tags.VAL_LOSS]:.4f} | val acc {record[tags.VAL_ACCURACY]:.2%} | "
               f"val {record[tags.EPOCH_VAL_IMAGES_PER_S]:.1f} img/s | " if tags.VAL_ACCURACY in record else "")
        steps_per_epoch = trainer.num_training_batches
        epochs = trainer.max_epochs
        if trainer.max_steps > 0 and math.isfinite(steps_per_epoch) and steps_per_epoch > 0:
            epochs = min(epochs, math.ceil(trainer.max_steps / steps_per_epoch))
        line = (f"epoch {record['epoch']}/{epochs} | train loss {record['train_loss']:.4f} | {val}"
                f"train {record[tags.EPOCH_TRAIN_IMAGES_PER_S]:.1f} img/s | {record[tags.EPOCH_WALL_TIME]:.1f} s")
        bar = trainer.progress_bar_callback
        if bar is not None:
            bar.print(line)
        else:
            print(line, flush=True)

    def summary(self) -> dict[str, Any]:
        """Run-level figures for summary.json (medians over the epochs of this process)."""
        def median(tag: str) -> float | None:
            values = [e[tag] for e in self.epochs if tag in e]
            return statistics.median(values) if values else None

        val_accuracies = [e[tags.VAL_ACCURACY] for e in self.epochs if tags.VAL_ACCURACY in e]
        return {
            "final_val_accuracy": val_accuracies[-1] if val_accuracies else None,
            "images_per_s": {"train": median(tags.EPOCH_TRAIN_IMAGES_PER_S), "val": median(tags.EPOCH_VAL_IMAGES_PER_S)},
            "steps": self.last_step,
        }
