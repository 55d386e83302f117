"""LightningDataModule over shared_data: each item is one global batch's shard, resumable mid-epoch."""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shared_data import augment, batches
from shared_data.clock import Span
from shared_data.prepare import prepare_data


class TrainBatches(Dataset):
    """Key (epoch, index) -> this process's shard of global training batch `index` of `epoch`: (images uint8,
    labels int64), or with `augment` (images float32 normalised, labels int64, soft targets float32)."""

    def __init__(self, split: Any, *, seed: int, batch_size: int, img_size: int, shard_index: int = 0,
                 shard_count: int = 1, augment: augment.Augmentation | None = None) -> None:
        self.split = split
        self.seed = seed
        self.batch_size = batch_size
        self.img_size = img_size
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.augment = augment

    def __len__(self) -> int:
        return batches.train_steps_per_epoch(len(self.split.labels), self.batch_size)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, index = key
        images, labels, *targets = batches.train_batch(
            self.split, seed=self.seed, epoch=epoch, index=index, batch_size=self.batch_size,
            img_size=self.img_size, shard_index=self.shard_index, shard_count=self.shard_count, augment=self.augment,
        )
        return (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                *(torch.from_numpy(soft) for soft in targets))


class ValBatches(Dataset):
    """Index -> this process's shard of validation batch `index` (the last one padded, with a 0/1 mask)."""

    def __init__(self, split: Any, *, batch_size: int, img_size: int, shard_index: int = 0, shard_count: int = 1) -> None:
        self.split = split
        self.batch_size = batch_size
        self.img_size = img_size
        self.shard_index = shard_index
        self.shard_count = shard_count

    def __len__(self) -> int:
        return batches.val_steps(len(self.split.labels), self.batch_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels, mask = batches.val_batch(
            self.split, index=index, batch_size=self.batch_size, img_size=self.img_size,
            shard_index=self.shard_index, shard_count=self.shard_count,
        )
        return (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                torch.from_numpy(mask.astype(np.float32)))


class EpochBatchSampler(Sampler):
    """Yields (epoch, index) keys for one epoch, starting at `start` when resumed mid-epoch.

    The epoch travels inside the key, so worker processes (persistent or not) never hold a stale one.
    `__len__` is the whole epoch even when resumed: Lightning counts the restored batches itself.
    """

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this at every epoch start; a resume offset only belongs to the epoch it was saved in.
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in range(self.start, self.steps_per_epoch))

    def __len__(self) -> int:
        return self.steps_per_epoch


class ResumableLoader(DataLoader):
    """A DataLoader that records how many batches the training loop took, so a checkpoint can resume after them,
    and when the host fetched the last one (`last_fetch`, the data wait of shared_data.tags' clock).

    Lightning saves `state_dict()` in every checkpoint and feeds it back through `load_state_dict()`
    before iterating again (it treats any loader with these two methods as resumable).
    """

    def __init__(self, dataset: TrainBatches, sampler: EpochBatchSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, sampler=sampler, **kwargs)
        self._epoch = sampler.epoch
        self._next_index = sampler.start
        self.last_fetch: Span | None = None  # host perf_counter span of the latest batch handed to the loop

    def __iter__(self) -> Iterator[Any]:
        sampler: EpochBatchSampler = self.sampler
        self._epoch, self._next_index = sampler.epoch, sampler.start
        fetch = Span(time.perf_counter())  # the first fetch includes starting the iterator (and its workers)
        batches = super().__iter__()
        while True:
            batch = next(batches, None)
            fetch.end = time.perf_counter()
            if batch is None:
                return
            self.last_fetch = fetch
            # The worker prefetch runs ahead of this; what was handed to the loop is what counts.
            self._next_index += 1
            yield batch
            fetch = Span(time.perf_counter())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "next_index": self._next_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochBatchSampler = self.sampler
        sampler.epoch, sampler.start = int(state["epoch"]), int(state["next_index"])
        self._epoch, self._next_index = sampler.epoch, sampler.start


class ImagenetteDataModule(pl.LightningDataModule):
    """Wraps shared_data.prepare_data and shared_data.batches; implements none of the data pipeline itself."""

    def __init__(self, config: dict[str, Any], *, progress: bool = True) -> None:
        super().__init__()
        self.config = config
        self.progress = progress
        self.data: Any = None

    def load(self) -> Any:
        """Prepare (find, download or synthesise, decode, cache) the dataset once; return PreparedData."""
        if self.data is None:
            c = self.config
            self.data = prepare_data(
                c["dataset"], c["data_dir"], c["img_size"], seed=c["seed"], strict=bool(c["strict"]),
                synthetic_size=c["synthetic_size"], noisy_labels=c["noisy_labels"], num_workers=c["num_workers"],
                progress=self.progress,
            )
        return self.data

    def prepare_data(self) -> None:
        self.load()

    def setup(self, stage: str) -> None:
        self.load()

    @property
    def steps_per_epoch(self) -> int:
        return batches.train_steps_per_epoch(len(self.load().train.labels), self.config["batch_size"])

    def _shard(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_options(self) -> dict[str, Any]:
        workers = self.config["num_workers"]
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=on_gpu)

    def train_dataloader(self) -> ResumableLoader:
        shard_index, shard_count = self._shard()
        dataset = TrainBatches(
            self.load().train, seed=self.config["seed"], batch_size=self.config["batch_size"],
            img_size=self.config["img_size"], shard_index=shard_index, shard_count=shard_count,
            augment=augment.from_config(self.config, self.load().num_classes),
        )
        return ResumableLoader(dataset, EpochBatchSampler(len(dataset)), **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        shard_index, shard_count = self._shard()
        dataset = ValBatches(
            self.load().val, batch_size=self.config["batch_size"], img_size=self.config["img_size"],
            shard_index=shard_index, shard_count=shard_count,
        )
        return DataLoader(dataset, batch_size=None, shuffle=False, **self._loader_options())
