"""Batches are pure functions of (seed, epoch, index): same bytes in any process, worker count or shard, with either
augmentation."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shared_data.augment import Augmentation
from shared_data.batches import train_batch, train_steps_per_epoch, val_batch, val_steps
from shared_data.loader import BatchLoader
from shared_data.normalize import MEAN, STD, normalize_numpy

IMG = 64
BATCH = 16
PICKS = [(0, 0, 0), (0, 0, 5), (0, 3, 2), (7, 1, 11)]  # (seed, epoch, index)
AUGMENTATIONS = {"basic": None, "official": Augmentation(num_classes=10)}


def _digest(batches) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for array in batch:
            digest.update(array.tobytes())
    return digest.hexdigest()


def _train(data, seed, epoch, index, **kwargs):
    return train_batch(data.train, seed=seed, epoch=epoch, index=index, batch_size=BATCH, img_size=IMG, **kwargs)


@pytest.mark.parametrize("augment", sorted(AUGMENTATIONS))
def test_train_batch_is_bit_identical_in_another_process(prepared_data, synthetic_data_dir, augment):
    here = _digest(_train(prepared_data, *pick, augment=AUGMENTATIONS[augment]) for pick in PICKS)
    script = textwrap.dedent(f"""
        import hashlib
        from shared_data.augment import Augmentation
        from shared_data.batches import train_batch
        from shared_data.prepare import prepare_data
        data = prepare_data("synthetic", {str(synthetic_data_dir)!r}, {IMG}, synthetic_size="tiny", progress=False)
        augment = Augmentation(num_classes=10) if {augment!r} == "official" else None
        digest = hashlib.sha256()
        for seed, epoch, index in {PICKS!r}:
            for array in train_batch(data.train, seed=seed, epoch=epoch, index=index, batch_size={BATCH},
                                     img_size={IMG}, augment=augment):
                digest.update(array.tobytes())
        print(digest.hexdigest())
    """)
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here


@pytest.mark.parametrize("augment", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_loader_yields_identical_batches_at_any_worker_count(prepared_data, workers, augment):
    steps = train_steps_per_epoch(len(prepared_data.train), BATCH)
    indices = range(2 * steps)

    def fetch(i):
        return _train(prepared_data, 0, i // steps, i % steps, augment=AUGMENTATIONS[augment])

    serial = list(BatchLoader(fetch, indices, num_workers=0))
    parallel = list(BatchLoader(fetch, indices, num_workers=workers, prefetch=5))
    assert len(parallel) == len(serial) == 2 * steps
    assert _digest(parallel) == _digest(serial)


def test_loader_stops_cleanly_when_consumer_breaks_early(prepared_data):
    loader = BatchLoader(lambda i: _train(prepared_data, 0, 0, i), range(10), num_workers=2, prefetch=4)
    for count, _ in enumerate(loader):
        if count == 2:
            break
    assert count == 2


def test_shards_concatenate_to_the_global_batch(prepared_data):
    whole = _train(prepared_data, 3, 1, 4)
    shards = [_train(prepared_data, 3, 1, 4, shard_index=s, shard_count=4) for s in range(4)]
    assert np.array_equal(np.concatenate([s[0] for s in shards]), whole[0])
    assert np.array_equal(np.concatenate([s[1] for s in shards]), whole[1])
    val_whole = val_batch(prepared_data.val, index=6, batch_size=BATCH, img_size=IMG)
    val_shards = [val_batch(prepared_data.val, index=6, batch_size=BATCH, img_size=IMG, shard_index=s, shard_count=2)
                  for s in range(2)]
    for part in range(3):
        assert np.array_equal(np.concatenate([s[part] for s in val_shards]), val_whole[part])


def test_epoch_visits_each_training_image_at_most_once_with_its_label(prepared_data):
    split = prepared_data.train
    steps = train_steps_per_epoch(len(split), BATCH)
    assert steps == len(split) // BATCH
    resolution = split.resolution
    seen, crops = [], set()
    for index in range(steps):
        images, labels = _train(prepared_data, 0, 2, index)
        assert images.shape == (BATCH, IMG, IMG, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
        for image, label in zip(images, labels):
            row, crop = _find_source_row(split, image, resolution)
            assert split.labels[row] == label
            seen.append(row)
            crops.add(crop)
    assert len(set(seen)) == len(seen) == steps * BATCH
    assert {flipped for flipped, _, _ in crops} == {False, True}  # augmentation really happens
    assert len({(top, left) for _, top, left in crops}) > 20


def _find_source_row(split, image, resolution):
    """The row whose picture holds `image` as a (possibly mirrored) crop: the crop must come from real pixels."""
    for row in range(len(split)):
        source = np.asarray(split.images[row])
        for flipped, candidate in ((False, image), (True, image[:, ::-1])):
            for top in range(resolution - IMG + 1):
                strip = source[top:top + IMG]
                for left in range(resolution - IMG + 1):
                    if candidate[0, 0, 0] == strip[0, left, 0] and np.array_equal(strip[:, left:left + IMG], candidate):
                        return row, (flipped, top, left)
    raise AssertionError("batch image is not a crop of any cached image")


def test_batches_differ_across_seed_epoch_and_index(prepared_data):
    base = _digest([_train(prepared_data, 0, 0, 0)])
    others = {_digest([_train(prepared_data, *pick)]) for pick in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]}
    assert base not in others and len(others) == 3
    first, second = (_train(prepared_data, 0, 0, 0) for _ in range(2))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


@pytest.mark.parametrize("batch_size", [1, 7, 16, 33, 100, 128])
def test_validation_counts_every_image_exactly_once(prepared_data, batch_size):
    split = prepared_data.val
    offset = (split.resolution - IMG) // 2
    kept_images, kept_labels, total_mask = [], [], 0.0
    for index in range(val_steps(len(split), batch_size)):
        images, labels, mask = val_batch(split, index=index, batch_size=batch_size, img_size=IMG)
        assert images.shape == (batch_size, IMG, IMG, 3) and mask.shape == (batch_size,)
        kept_images.append(images[mask == 1])
        kept_labels.append(labels[mask == 1])
        total_mask += float(mask.sum())
    assert total_mask == len(split)
    centre = np.asarray(split.images[:, offset:offset + IMG, offset:offset + IMG])
    assert np.array_equal(np.concatenate(kept_images), centre)
    assert np.array_equal(np.concatenate(kept_labels), split.labels)


def test_out_of_range_batches_and_uneven_shards_are_refused(prepared_data):
    steps = train_steps_per_epoch(len(prepared_data.train), BATCH)
    with pytest.raises(IndexError):
        _train(prepared_data, 0, 0, steps)
    with pytest.raises(ValueError, match="shard"):
        _train(prepared_data, 0, 0, 0, shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match="img_size"):
        train_batch(prepared_data.train, seed=0, epoch=0, index=0, batch_size=BATCH, img_size=200)


def test_normalisation_uses_imagenet_statistics():
    assert MEAN == (0.485, 0.456, 0.406) and STD == (0.229, 0.224, 0.225)
    pixels = np.array([[[[0, 128, 255]]]], dtype=np.uint8)
    expected = (np.array([0, 128, 255]) / 255 - np.array(MEAN)) / np.array(STD)
    assert np.allclose(normalize_numpy(pixels)[0, 0, 0], expected, atol=1e-6)
    assert normalize_numpy(pixels).dtype == np.float32


def test_loader_raises_the_batch_error_in_order():
    def fetch(i):
        if i == 3:
            raise RuntimeError("batch 3 failed")
        return i

    received = []
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        for value in BatchLoader(fetch, range(8), num_workers=2, prefetch=4):
            received.append(value)
    assert received == [0, 1, 2]
