"""Pure batch functions: (seed, epoch, index) -> uint8 NHWC images and int32 labels (or augment.py's), for both stacks."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # augment imports timm and torch when used; the crop-and-flip path needs neither
    from shared_data.augment import Augmentation


class Split(Protocol):
    images: np.ndarray  # uint8 [N, R, R, 3]
    labels: np.ndarray  # int32 [N]


def train_steps_per_epoch(n: int, batch_size: int) -> int:
    """Training drops the last partial batch, so every step has the same shape."""
    return n // batch_size


def val_steps(n: int, batch_size: int) -> int:
    """Validation pads the last batch instead, so every image is seen exactly once."""
    return math.ceil(n / batch_size)


@functools.lru_cache(maxsize=8)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's image order; its own stream, so it never depends on how batches are drawn."""
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(n)
    order.flags.writeable = False  # cached and shared between callers
    return order


def _shard_slice(batch_size: int, shard_index: int, shard_count: int) -> slice:
    if shard_count < 1 or not 0 <= shard_index < shard_count or batch_size % shard_count:
        raise ValueError(f"batch_size {batch_size} must split evenly into shard {shard_index} of {shard_count}")
    per_shard = batch_size // shard_count
    return slice(shard_index * per_shard, (shard_index + 1) * per_shard)


def _check_crop(split: Split, img_size: int) -> int:
    resolution = split.images.shape[1]
    if not 0 < img_size <= resolution:
        raise ValueError(f"img_size {img_size} does not fit in the cached resolution {resolution}; "
                         "prepare the data with this --img-size")
    return resolution


def train_batch(split: Split, *, seed: int, epoch: int, index: int, batch_size: int, img_size: int,
                shard_index: int = 0, shard_count: int = 1,
                augment: Augmentation | None = None) -> tuple[np.ndarray, ...]:
    """Shard `shard_index` of the global training batch `index` of `epoch`: random crop and flip, (images uint8,
    labels int32). With `augment` (shared_data.augment's official augmentation) instead: (images float32 normalised,
    labels int32, soft targets float32 [b, classes]), see Augmentation.batch."""
    n = len(split.labels)
    steps = train_steps_per_epoch(n, batch_size)
    if not 0 <= index < steps:
        raise IndexError(f"training batch {index} out of range: {steps} batches of {batch_size} in {n} images")
    resolution = _check_crop(split, img_size)
    shard = _shard_slice(batch_size, shard_index, shard_count)
    chosen = epoch_permutation(n, seed, epoch)[index * batch_size:(index + 1) * batch_size]
    if augment is not None:
        return augment.batch(split, chosen, seed=seed, epoch=epoch, index=index, img_size=img_size, shard=shard)
    # Augmentation is drawn for the whole global batch, then sliced: a shard sees what the full batch has.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))
    tops = rng.integers(0, resolution - img_size + 1, size=batch_size)
    lefts = rng.integers(0, resolution - img_size + 1, size=batch_size)
    flips = rng.random(batch_size) < 0.5
    rows = chosen[shard]
    images = np.empty((len(rows), img_size, img_size, 3), dtype=np.uint8)
    for out, row, top, left, flip in zip(images, rows, tops[shard], lefts[shard], flips[shard]):
        crop = split.images[row, top:top + img_size, left:left + img_size]
        if flip:
            # Per channel, so numpy's inner loop runs along a whole row instead of over 3-byte pixels: ~3x faster.
            for channel in range(3):
                out[:, :, channel] = crop[:, ::-1, channel]
        else:
            out[...] = crop
    return images, np.asarray(split.labels[rows], dtype=np.int32)


def val_batch(split: Split, *, index: int, batch_size: int, img_size: int, shard_index: int = 0,
              shard_count: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shard of validation batch `index`: centre crops, padded to full size with mask 0 past the end."""
    n = len(split.labels)
    steps = val_steps(n, batch_size)
    if not 0 <= index < steps:
        raise IndexError(f"validation batch {index} out of range: {steps} batches of {batch_size} in {n} images")
    resolution = _check_crop(split, img_size)
    shard = _shard_slice(batch_size, shard_index, shard_count)
    offset = (resolution - img_size) // 2
    positions = np.arange(index * batch_size, (index + 1) * batch_size)[shard]
    real = positions[positions < n]
    images = np.zeros((len(positions), img_size, img_size, 3), dtype=np.uint8)
    labels = np.zeros(len(positions), dtype=np.int32)
    mask = np.zeros(len(positions), dtype=np.float32)
    if len(real):
        # Real rows come first and are contiguous, so one slice reads them all.
        images[:len(real)] = split.images[real[0]:real[-1] + 1, offset:offset + img_size, offset:offset + img_size]
        labels[:len(real)] = split.labels[real[0]:real[-1] + 1]
        mask[:len(real)] = 1.0
    return images, labels, mask
