"""Decoded image cache: one uint8 memory-mapped file per split and resolution, built once in parallel."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared_data import decode, staging
from shared_data.decode import PREPROCESS_VERSION, SkippedFile
from shared_data.errors import ConfigError, DataError
from shared_data.trash_safe import atomic_write_json, remove_path

IMAGES_FILE = "images.u8"
LABELS_FILE = "labels.npy"
MANIFEST_FILE = "manifest.json"  # written last: its presence is what marks a cache complete


@dataclasses.dataclass
class SplitArrays:
    """One split, decoded: images uint8 [N, R, R, 3] (memory-mapped), labels int32 [N], relative file paths."""

    images: np.ndarray
    labels: np.ndarray
    files: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])


def list_split(root: Path, split: str,
               class_ids: tuple[str, ...]) -> tuple[list[str], np.ndarray, list[SkippedFile]]:
    """Files of `root/split` in (sorted class, sorted name) order with their class indices, and the entries refused:
    symbolic links that leave the dataset folder or lead nowhere."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ConfigError(f"--data-dir: {split_dir} is missing; the release must have train/ and val/ folders")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    missing = sorted(set(class_ids) - set(found))
    if missing:
        raise ConfigError(f"--data-dir: {split_dir} lacks class folders {', '.join(missing)}; re-extract the release")
    inside = Path(root).resolve()  # the dataset folder may itself be a link (to a bigger disk): its target counts
    files: list[str] = []
    labels: list[int] = []
    refused: list[SkippedFile] = []
    for label, wnid in enumerate(class_ids):
        for name in sorted(p.name for p in (split_dir / wnid).iterdir() if not p.name.startswith(".")):
            rel = f"{split}/{wnid}/{name}"
            reason = _link_refusal(split_dir / wnid / name, inside)
            if reason is not None:
                refused.append(SkippedFile(rel, reason))
            elif (split_dir / wnid / name).is_file():
                files.append(rel)
                labels.append(label)
    return files, np.asarray(labels, dtype=np.int32), refused


def _link_refusal(entry: Path, inside: Path) -> str | None:
    """Why `entry` must not be read because of a symbolic link on its way, or None when it may be read."""
    if entry.is_symlink() and not entry.exists():
        return f"dangling symbolic link to {os.readlink(entry)}; remove it or restore its target"
    target = Path(os.path.realpath(entry))
    if not target.is_relative_to(inside):
        return (f"symbolic link to {target}, outside the dataset folder {inside}: refused; "
                "copy the file into the dataset instead")
    return None


def source_fingerprint(root: Path, files: list[str]) -> str:
    """A short digest of every source file's path, size and modification time: changes rebuild the cache."""
    digest = hashlib.sha256()
    for rel in files:
        stat = (Path(root) / rel).stat()
        digest.update(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_key(dataset: str, split: str, resolution: int, fingerprint: str) -> str:
    return f"{dataset}-{split}-r{resolution}-v{PREPROCESS_VERSION}-{fingerprint}"


def load_cache(cache_dir: Path) -> tuple[SplitArrays, list[SkippedFile]] | None:
    """The cache at `cache_dir` if it is complete and consistent, else None."""
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / MANIFEST_FILE).read_text())
        count, res = manifest["count"], manifest["resolution"]
        if (cache_dir / IMAGES_FILE).stat().st_size != count * res * res * 3:
            return None
        labels = np.load(cache_dir / LABELS_FILE)
    except (OSError, ValueError, KeyError):
        return None
    if len(labels) != count or len(manifest["files"]) != count:
        return None
    images = np.memmap(cache_dir / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(count, res, res, 3))
    skipped = [SkippedFile(path, reason) for path, reason in manifest["skipped"]]
    return SplitArrays(images, labels, list(manifest["files"])), skipped


def load_or_build(root: Path, dataset: str, split: str, files: list[str], labels: np.ndarray, resolution: int,
                  cache_root: Path, *, num_workers: int | None = None, strict: bool = False,
                  progress: bool = True) -> tuple[SplitArrays, list[SkippedFile], Path]:
    """Load the cache for these source files at this resolution, building it first if needed."""
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    key = cache_key(dataset, split, resolution, source_fingerprint(root, files))
    final = cache_root / key
    staging.remove_abandoned(cache_root)
    loaded = load_cache(final)
    if loaded is None:
        if final.exists():  # an incomplete folder under the final name: never trusted, never reused
            remove_path(final)
        _build(root, files, labels, resolution, cache_root, key, num_workers=num_workers, strict=strict,
               progress=progress, desc=f"cache {dataset} {split} r{resolution}")
        loaded = load_cache(final)
        if loaded is None:
            raise DataError(f"{final}: cache build finished but the cache does not load; delete it and retry")
    return loaded[0], loaded[1], final


def _build(root: Path, files: list[str], labels: np.ndarray, resolution: int, cache_root: Path, key: str, *,
           num_workers: int | None, strict: bool, progress: bool, desc: str) -> None:
    if not files:
        raise ConfigError(f"--data-dir: no image files under {root} for {key}")
    folder = staging.make_staging(cache_root, "building", key)
    try:
        images = np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="w+",
                           shape=(len(files), resolution, resolution, 3))

        def decode_into(index: int) -> str | None:
            pixels, reason = decode.try_decode_square(Path(root) / files[index], resolution, strict=strict)
            if pixels is not None:
                images[index] = pixels
            return reason

        # Threads, not processes: Pillow releases the GIL while decoding and resizing, and threads write
        # straight into the shared memmap with no pickling and no fork of a (possibly JAX-threaded) parent.
        workers = max(1, num_workers if num_workers is not None else (os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            try:
                reasons = list(tqdm(pool.map(decode_into, range(len(files))), total=len(files), desc=desc,
                                    unit="img", disable=not progress))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        keep = [i for i, reason in enumerate(reasons) if reason is None]
        if not keep:
            raise ConfigError(f"--data-dir: none of the {len(files)} files under {root} for {key} could be decoded")
        for new, old in enumerate(keep):  # compact in place: later rows only ever move down
            if new != old:
                images[new] = images[old]
        images.flush()
        del images
        row_bytes = resolution * resolution * 3
        os.truncate(folder / IMAGES_FILE, len(keep) * row_bytes)
        np.save(folder / LABELS_FILE, np.asarray(labels, dtype=np.int32)[keep])
        manifest = {
            "key": key, "resolution": resolution, "preprocess_version": PREPROCESS_VERSION, "count": len(keep),
            "files": [files[i] for i in keep],
            "skipped": [[files[i], reason] for i, reason in enumerate(reasons) if reason is not None],
        }
        atomic_write_json(folder / MANIFEST_FILE, manifest)
        try:
            os.replace(folder, cache_root / key)
        except OSError:
            if load_cache(cache_root / key) is None:  # not another builder finishing first: a real failure
                raise
    finally:
        remove_path(folder)

