"""The Flax stack's input side: this process's shard of each shared batch, on the mesh, normalised on the device."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from shared_data import batches
from shared_data.augment import Augmentation
from shared_data.loader import BatchLoader
from shared_data.normalize import MEAN, STD


def _shard() -> dict[str, int]:
    """This process's slice of every global batch: the batch axis is split over processes in order."""
    return dict(shard_index=jax.process_index(), shard_count=jax.process_count())


def _prefetch(num_workers: int) -> int:
    return max(2, 2 * num_workers)


def train_batches(split: Any, config: Any, epoch: int, first: int, last: int,
                  augment: Augmentation | None = None) -> BatchLoader:
    """Training batches `first`..`last - 1` of `epoch` (0-based) at `config`'s seed, global batch size, image size and
    loader workers, in order: (images uint8 [b, S, S, 3], labels int32 [b]) with b = batch_size / processes, or with
    `augment` (images float32, labels, soft targets); a pure function of (seed, epoch, index), see batches.py."""
    fn = functools.partial(_train_batch, split, config.seed, epoch, config.batch_size, config.img_size, augment)
    return BatchLoader(fn, range(first, last), config.num_workers, prefetch=_prefetch(config.num_workers))


def _train_batch(split: Any, seed: int, epoch: int, batch_size: int, img_size: int, augment: Augmentation | None,
                 index: int) -> tuple[np.ndarray, ...]:
    return batches.train_batch(split, seed=seed, epoch=epoch, index=index, batch_size=batch_size, img_size=img_size,
                               augment=augment, **_shard())


def val_batches(split: Any, config: Any) -> BatchLoader:
    """Every validation batch at `config`'s global batch size and image size, in order: (images uint8, labels int32,
    mask float32 [b]); the last is padded with mask 0, so every image counts exactly once and the eval step never
    recompiles."""
    fn = functools.partial(_val_batch, split, config.batch_size, config.img_size)
    steps = batches.val_steps(len(split.labels), config.batch_size)
    return BatchLoader(fn, range(steps), config.num_workers, prefetch=_prefetch(config.num_workers))


def _val_batch(split: Any, batch_size: int, img_size: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return batches.val_batch(split, index=index, batch_size=batch_size, img_size=img_size, **_shard())


def to_global(local: tuple[np.ndarray, ...], sharding: NamedSharding) -> tuple[jax.Array, ...]:
    """This process's shard of a global batch -> global arrays split over the mesh (an asynchronous copy)."""
    if jax.process_count() == 1:
        return tuple(jax.device_put(local, sharding))  # the same result, in one call, at half the host cost
    return tuple(jax.make_array_from_process_local_data(sharding, array) for array in local)


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 NHWC [B, H, W, 3] -> float32 (x / 255 - MEAN) / STD, on the device (MEAN, STD: shared_data.normalize).

    Float images come normalised from the host (shared_data.augment) and pass through unchanged.
    """
    if images.dtype != jnp.uint8:
        return images
    mean = jnp.asarray(MEAN, jnp.float32)
    std = jnp.asarray(STD, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std



def train_batch_spec(batch_size: int, img_size: int, num_classes: int, augmented: bool,
                     sharding: NamedSharding) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The shapes, dtypes and sharding of one global training batch as the train step takes it: images uint8
    [B, S, S, 3] and labels int32 [B], or with the official augmentation images float32, labels and soft targets
    float32 [B, num_classes] (shared_data.batches, shared_data.augment)."""
    images = jax.ShapeDtypeStruct((batch_size, img_size, img_size, 3), jnp.float32 if augmented else jnp.uint8,
                                  sharding=sharding)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)
    if not augmented:
        return images, labels
    return images, labels, jax.ShapeDtypeStruct((batch_size, num_classes), jnp.float32, sharding=sharding)
