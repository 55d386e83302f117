"""The synthetic stand-in: Imagenette's layout and classes, varied files, deterministic, learnable."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from shared_data.registry import IMAGENETTE_CLASSES
from shared_data.synthetic import SYNTHETIC_SIZES, write_synthetic


def _tree_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_layout_and_class_ids_match_the_real_release(synthetic_data_dir):
    root = synthetic_data_dir / "synthetic-tiny-seed0"
    wnids = [wnid for wnid, _ in IMAGENETTE_CLASSES]
    for split, per_class in (("train", 20), ("val", 10)):
        assert sorted(p.name for p in (root / split).iterdir()) == wnids
        assert all(len(list((root / split / wnid).glob("*.JPEG"))) == per_class for wnid in wnids)
    header = (root / "noisy_imagenette.csv").read_text().splitlines()[0]
    assert header == "path,noisy_labels_0,noisy_labels_1,noisy_labels_5,noisy_labels_25,noisy_labels_50,is_valid"


def test_imagenette_size_has_the_real_counts():
    assert sum(train for train, _ in SYNTHETIC_SIZES["imagenette"]) == 9469
    assert sum(val for _, val in SYNTHETIC_SIZES["imagenette"]) == 3925


def test_files_vary_in_size_aspect_and_colour_mode(synthetic_data_dir):
    modes, sizes = [], []
    for path in (synthetic_data_dir / "synthetic-tiny-seed0").rglob("*.JPEG"):
        with Image.open(path) as image:
            modes.append(image.mode)
            sizes.append(image.size)
    assert {"RGB", "L", "CMYK"} <= set(modes)
    assert 0.04 < modes.count("L") / len(modes) < 0.2 and 0.01 < modes.count("CMYK") / len(modes) < 0.1
    widths, heights = np.array(sizes).T
    aspects = widths / heights
    assert widths.min() >= 80 and heights.max() <= 500 and widths.max() - widths.min() > 200
    assert aspects.min() < 0.8 and aspects.max() > 1.3


def test_same_seed_writes_same_bytes_other_seed_differs(synthetic_data_dir, tmp_path):
    again = write_synthetic(tmp_path, size="tiny", seed=0, num_workers=3, progress=False)
    assert _tree_digest(again) == _tree_digest(synthetic_data_dir / "synthetic-tiny-seed0")
    other = write_synthetic(tmp_path, size="tiny", seed=1, progress=False)
    assert _tree_digest(other) != _tree_digest(again)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_small_model_learns_it_well_above_chance(prepared_data):
    """A nearest-centroid classifier on 8x8 thumbnails: chance is 10%, the class patterns make it easy."""

    def features(split):
        images = np.asarray(split.images, dtype=np.float32)
        n, r = images.shape[:2]
        cut = r - r % 8
        thumbs = images[:, :cut, :cut].reshape(n, 8, cut // 8, 8, cut // 8, 3).mean(axis=(2, 4))
        flat = thumbs.reshape(n, -1)
        return (flat - flat.mean(axis=1, keepdims=True)) / (flat.std(axis=1, keepdims=True) + 1e-6)

    train_x, val_x = features(prepared_data.train), features(prepared_data.val)
    centroids = np.stack([train_x[prepared_data.train.labels == c].mean(axis=0) for c in range(10)])
    predictions = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predictions == prepared_data.val.labels).mean() > 0.5
