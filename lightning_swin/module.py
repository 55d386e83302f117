"""The LightningModule: Swin V2 classifier, its losses and metrics, and the AdamW warm-up-cosine recipe."""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_swin.model import create_model, param_groups
from shared_data import op_profile, run_config, tags
from shared_data.errors import CheckpointError
from shared_data.normalize import MEAN, STD

ADAMW_BETAS = (0.9, 0.999)  # official Swin V2 recipe
ADAMW_EPS = 1e-8
PADDING_LABEL = -100  # validation rows that only pad the last batch


def learning_rate_schedule(optimizer: torch.optim.Optimizer, config: dict[str, Any], steps_per_epoch: int) -> LambdaLR:
    """Per-step schedule of shared_data.run_config.learning_rate, as a factor of the peak rate.

    A pure function of (step, config), like the Flax stack's optax schedule: a checkpoint keeps only the step
    count (not the factor: a partial's keywords are not its __dict__, which LambdaLR saves), so a resumed run
    follows its own config's schedule, a larger --epochs included, instead of the saved run's.
    """
    return LambdaLR(optimizer, functools.partial(_lr_factor, config=config, steps_per_epoch=steps_per_epoch))


def _lr_factor(step: int, config: dict[str, Any], steps_per_epoch: int) -> float:
    return run_config.learning_rate(step, config, steps_per_epoch) / config["lr"]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)), in float32: the training loss on soft targets
    [B, classes]."""
    return F.cross_entropy(logits.float(), targets)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the dropout / drop-path stream for one optimiser step: a function of (seed, step, rank) only."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class SwinClassifier(pl.LightningModule):
    """Swin Transformer V2 on uint8 NHWC batches: normalised on device, label-smoothed training loss."""

    def __init__(self, config: dict[str, Any], num_classes: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.model = create_model(
            config["model"], num_classes, img_size=config["img_size"], drop_path_rate=config["drop_path"],
        )
        # Non-persistent: checkpoints keep only the model's official parameter names.
        self.register_buffer("mean", torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.val_loss = MeanMetric()
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=PADDING_LABEL)
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro",
                                           ignore_index=PADDING_LABEL)

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW, (x / 255 - MEAN) / STD, on the model's device; float NHWC images come
        normalised from the host (shared_data.augment) and are only permuted."""
        if images.dtype != torch.uint8:
            return images.permute(0, 3, 1, 2)
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize_images(images))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Re-seeding each step from (seed, step, rank) makes a resumed run draw the same drop-path masks
        # as an uninterrupted one, whatever else consumed random numbers in between.
        torch.manual_seed(step_seed(self.config["seed"], self.global_step, self.global_rank))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> dict[str, torch.Tensor]:
        images, labels, *targets = batch  # soft targets come with --augment official (shared_data.augment)
        # Marks the forward pass in profiles: Lightning runs it inside optimizer.step (shared_data.op_profile).
        with torch.profiler.record_function(op_profile.FORWARD_RANGE):
            logits = self(images)
            if targets:
                loss = soft_target_cross_entropy(logits, targets[0])
            else:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config["label_smoothing"])
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        # ModelCheckpoint names files with a logged "epoch" where there is one: the 1-based epoch of this step.
        self.log("epoch", float(self.current_epoch + 1), logger=False)
        return {"loss": loss, "accuracy": accuracy.detach()}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels, mask = batch
        logits = self(images).float()
        # Plain cross-entropy for validation; padded rows carry weight 0 and are left out of accuracy
        # (relabelled rather than dropped: a shard may hold padding only, and metrics reject empty batches).
        self.val_loss.update(F.cross_entropy(logits, labels, reduction="none"), mask)
        labels = labels.masked_fill(mask == 0, PADDING_LABEL)
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)
        log = dict(on_step=False, on_epoch=True, logger=False)
        self.log(tags.VAL_LOSS, self.val_loss, **log)
        self.log(tags.VAL_ACCURACY, self.val_top1, prog_bar=True, **log)
        self.log(tags.VAL_ACCURACY_TOP5, self.val_top5, **log)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            param_groups(self.model, self.config["weight_decay"]), lr=self.config["lr"], betas=ADAMW_BETAS, eps=ADAMW_EPS,
        )
        scheduler = learning_rate_schedule(optimizer, self.config, self.steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A restored optimiser holds the rate the saving run's schedule gave its last step; this run's schedule
        # (a larger --epochs, say) may give the next step another.
        scheduler = self.lr_schedulers()
        for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["swin_config"] = {k: v for k, v in self.config.items() if isinstance(v, (str, int, float, bool, type(None)))}
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called before the weights are loaded: a checkpoint of other code stops the run with one line.
        mismatch = CheckpointError.not_fitting(
            self.trainer.ckpt_path, {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()},
            {name: tuple(t.shape) for name, t in self.state_dict().items()})
        if mismatch is not None:
            raise mismatch
        states = checkpoint["rng_states"]
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        np.random.set_state(states["numpy"])
        random.setstate(states["python"])
