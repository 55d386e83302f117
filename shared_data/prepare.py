"""prepare_data: resolve the dataset (download, or fall back to synthetic), then load or build its cache."""

from __future__ import annotations

import csv
import dataclasses
import numbers
import os
import sys
from pathlib import Path

import numpy as np

from shared_data.cache import SplitArrays, list_split, load_or_build
from shared_data.decode import CorruptImageError, SkippedFile, skipped_report, stored_resolution
from shared_data.download import DatasetUnavailable, DownloadError, fetch_dataset
from shared_data import errors
from shared_data.errors import ConfigError, DataError
from shared_data.registry import NOISY_LABEL_PERCENTS, SYNTHETIC, DatasetSpec, get_spec
from shared_data.synthetic import SYNTHETIC_SIZES, write_synthetic

CACHE_FOLDER = "cache"


@dataclasses.dataclass
class PreparedData:
    """Everything a training loop needs from the data: both splits decoded, classes, what was skipped."""

    dataset: str  # the name actually used: "synthetic" after a fallback
    fell_back: bool
    class_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    train: SplitArrays
    val: SplitArrays
    skipped: list[SkippedFile]
    cache_dir: Path
    root: Path
    img_size: int
    noisy_labels: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def resolution(self) -> int:
        return self.train.resolution

    def report(self) -> dict:
        """JSON-ready description for a run's data_report.json and config."""
        return {
            "dataset": self.dataset, "fell_back": self.fell_back, "root": str(self.root),
            "img_size": self.img_size, "resolution": self.resolution, "noisy_labels": self.noisy_labels,
            "train_images": len(self.train), "val_images": len(self.val), "cache_dir": str(self.cache_dir),
            **skipped_report(self.skipped),
        }


def prepare_data(dataset: str, data_dir: str | os.PathLike = "data", img_size: int = 256, *, seed: int = 0,
                 strict: bool = False, synthetic_size: str = "small", noisy_labels: int = 0,
                 num_workers: int | None = None, allow_download: bool = True, progress: bool = True) -> PreparedData:
    """The dataset called `dataset`, decoded and cached at stored resolution round(img_size * 292 / 256).

    Raises ConfigError (naming the flag) for a value or a data folder that cannot work, CorruptImageError (a
    ConfigError) for a file `strict` will not skip, and DataError when the data folder cannot be written or read.
    """
    spec = get_spec(dataset)
    if not isinstance(img_size, numbers.Integral) or img_size < 8:
        raise ConfigError(f"--img-size: must be an integer of at least 8, got {img_size!r}")
    if noisy_labels not in NOISY_LABEL_PERCENTS:
        raise ConfigError(f"--noisy-labels: must be one of {NOISY_LABEL_PERCENTS}, got {noisy_labels!r}")
    if synthetic_size not in SYNTHETIC_SIZES:
        raise ConfigError(f"--synthetic-size: unknown size {synthetic_size!r}; "
                          f"choose one of {', '.join(SYNTHETIC_SIZES)}")
    data_dir = _usable_data_dir(data_dir)
    try:
        return _prepare(spec, data_dir, int(img_size), seed=seed, strict=strict, synthetic_size=synthetic_size,
                        noisy_labels=noisy_labels, num_workers=num_workers, allow_download=allow_download,
                        progress=progress)
    except OSError as error:  # a full disk, an I/O error, a folder made unreadable: no flag value fixes it
        where = error.filename or data_dir
        raise DataError(f"{where}: {error.strerror or error}; free space or fix the data folder, "
                        "or point --data-dir elsewhere") from None


def _prepare(spec: DatasetSpec, data_dir: Path, img_size: int, *, seed: int, strict: bool, synthetic_size: str,
             noisy_labels: int, num_workers: int | None, allow_download: bool, progress: bool) -> PreparedData:
    fell_back = False
    if spec.name == SYNTHETIC:
        root = write_synthetic(data_dir, size=synthetic_size, seed=seed, num_workers=num_workers, progress=progress)
    else:
        try:
            root = fetch_dataset(spec, data_dir, allow_download=allow_download, progress=progress)
        except DownloadError as error:  # an archive that is there but bad: the user must act, not fall back
            raise ConfigError(f"--data-dir: {error}") from None
        except DatasetUnavailable as error:
            _warn_fallback(str(error), spec.name)
            spec, fell_back = get_spec(SYNTHETIC), True
            root = write_synthetic(data_dir, size=synthetic_size, seed=seed, num_workers=num_workers,
                                   progress=progress)
    resolution = stored_resolution(img_size)
    cache_root = data_dir / CACHE_FOLDER
    splits: dict[str, SplitArrays] = {}
    skipped: list[SkippedFile] = []
    for split in ("train", "val"):
        files, labels, refused = list_split(root, split, spec.class_ids)
        if strict and refused:
            raise CorruptImageError(root / refused[0].path, refused[0].reason)
        splits[split], decode_skipped, _ = load_or_build(
            root, spec.name, split, files, labels, resolution, cache_root,
            num_workers=num_workers, strict=strict, progress=progress)
        skipped.extend(sorted(refused + decode_skipped))
    if noisy_labels:
        train = splits["train"]
        splits["train"] = dataclasses.replace(
            train, labels=_noisy_train_labels(root / spec.noisy_csv, train, noisy_labels, spec.class_ids))
    return PreparedData(spec.name, fell_back, spec.class_ids, spec.class_names, splits["train"], splits["val"],
                        skipped, cache_root, root, img_size, noisy_labels)


def _usable_data_dir(data_dir: str | os.PathLike) -> Path:
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--data-dir: {path} exists but is not a folder; point it at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--data-dir: cannot create {path} ({error.strerror}); choose a writable folder") from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"--data-dir: {path} is not readable and writable; fix its permissions or choose another")
    return path


def _warn_fallback(reason: str, wanted: str) -> None:
    """The one warning made loud: a run that trains on synthetic images instead of the data asked for."""
    bar = "!" * 100
    print(f"\n{bar}", file=sys.stderr, flush=True)
    errors.warn(f"dataset {wanted!r} is unavailable, so this run uses the SYNTHETIC dataset instead. Reason: {reason}")
    print(f"{bar}\n", file=sys.stderr, flush=True)


def _noisy_train_labels(csv_path: Path, train: SplitArrays, percent: int, class_ids: tuple[str, ...]) -> np.ndarray:
    """The release's noisy training labels at `percent`; files the list does not name keep their label."""
    if not csv_path.is_file():
        raise ConfigError(f"--noisy-labels: {csv_path} is missing, so noisy labels are unavailable; use 0")
    index_of = {wnid: i for i, wnid in enumerate(class_ids)}
    column = f"noisy_labels_{percent}"
    with open(csv_path, newline="") as handle:
        noisy = {row["path"]: row[column] for row in csv.DictReader(handle)}
    labels = np.array(train.labels, dtype=np.int32)
    for row, rel in enumerate(train.files):
        if rel in noisy:
            labels[row] = index_of[noisy[rel]]
    return labels
