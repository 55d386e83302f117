"""Imagenette-shaped synthetic dataset on disk: real layout and class ids, learnable class patterns."""

from __future__ import annotations

import colorsys
import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from shared_data.errors import ConfigError
from shared_data.registry import IMAGENETTE_CLASSES, IMAGENETTE_COUNTS, NOISY_LABEL_PERCENTS
from shared_data.staging import make_staging, remove_abandoned
from shared_data.trash_safe import atomic_write_json, remove_path

# (train, val) images per class; "imagenette" mirrors the real release: 9,469 and 3,925 images.
SYNTHETIC_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "tiny": ((20, 10),) * 10,
    "small": ((100, 50),) * 10,
    "imagenette": IMAGENETTE_COUNTS,
}
_GRAYSCALE_SHARE, _CMYK_SHARE = 0.10, 0.05
_INFO_FILE = "synthetic.json"  # written last, inside the staging folder, before the atomic rename


def synthetic_folder(size: str, seed: int) -> str:
    return f"synthetic-{size}-seed{seed}"


def _pattern_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Class `label`'s shape in object coordinates (u, v in about [-1, 1]): each class its own pattern."""
    radius2 = u * u + v * v
    box = np.maximum(np.abs(u), np.abs(v)) < 0.9
    cell_u, cell_v = np.floor((u + 1) * 2.5), np.floor((v + 1) * 2.5)
    shapes = (
        lambda: radius2 < 1.0,                                                   # disc
        lambda: np.maximum(np.abs(u), np.abs(v)) < 0.75,                          # square
        lambda: (v > -0.8) & (v < 0.8) & (np.abs(u) < (0.8 - v) * 0.55),          # triangle
        lambda: box & (np.floor((v + 1) * 3) % 2 == 0),                           # horizontal stripes
        lambda: box & (np.floor((u + 1) * 3) % 2 == 0),                           # vertical stripes
        lambda: box & ((cell_u + cell_v) % 2 == 0),                               # checkerboard
        lambda: (radius2 > 0.3) & (radius2 < 1.0),                                # ring
        lambda: ((np.abs(u) < 0.25) | (np.abs(v) < 0.25)) & box,                  # cross
        lambda: (radius2 < 1.0) & (np.floor((u + v + 2) * 2.5) % 2 == 0),         # diagonal stripes
        lambda: box & (((u + 1) * 2.5 % 1 - 0.5) ** 2 + ((v + 1) * 2.5 % 1 - 0.5) ** 2 < 0.09),  # dots
    )
    return shapes[label % len(shapes)]()


def render_image(label: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `label`: a class-coloured class pattern at a random place and scale over noise."""
    width = int(rng.integers(80, 501))
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    height = int(np.clip(round(width / aspect), 80, 500))
    short = min(width, height)
    background = rng.uniform(40, 200, size=3) * 0.5 + 60
    # Integer uniform noise: several times cheaper to draw than Gaussian, and just as good a distraction.
    pixels = background.astype(np.int16) + rng.integers(-30, 31, size=(height, width, 3), dtype=np.int16)
    # The object stays inside the central square, which is what the cache keeps after its centre crop.
    radius = short * rng.uniform(0.22, 0.38)
    cx = width / 2 + rng.uniform(-0.12, 0.12) * short
    cy = height / 2 + rng.uniform(-0.12, 0.12) * short
    ys, xs = np.ogrid[0:height, 0:width]
    u, v = np.broadcast_arrays((xs - cx) / radius, (ys - cy) / radius)
    mask = _pattern_mask(label, u, v)
    hue = (label / 10 + rng.uniform(-0.02, 0.02)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))) * 255
    pixels[mask] = colour.astype(np.int16) + rng.integers(-16, 17, size=(int(mask.sum()), 3), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    mode_draw = rng.random()
    if mode_draw < _GRAYSCALE_SHARE:
        return image.convert("L")
    if mode_draw < _GRAYSCALE_SHARE + _CMYK_SHARE:
        return image.convert("CMYK")
    return image


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_synthetic(data_dir: str | Path, *, size: str = "small", seed: int = 0, num_workers: int | None = None,
                    progress: bool = True) -> Path:
    """Write (once) the synthetic dataset of `size` and `seed` under `data_dir` and return its folder."""
    if size not in SYNTHETIC_SIZES:
        raise ConfigError(f"--synthetic-size: unknown size {size!r}; choose one of {', '.join(SYNTHETIC_SIZES)}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned(data_dir)
    final = data_dir / synthetic_folder(size, seed)
    if (final / _INFO_FILE).exists():
        return final
    staging = make_staging(data_dir, "synthetic", final.name)
    try:
        jobs = []
        for split_id, split in enumerate(("train", "val")):
            for label, ((wnid, _), counts) in enumerate(zip(IMAGENETTE_CLASSES, SYNTHETIC_SIZES[size])):
                (staging / split / wnid).mkdir(parents=True)
                jobs.extend((split_id, split, label, wnid, i) for i in range(counts[split_id]))

        def write_one(job: tuple) -> None:
            split_id, split, label, wnid, i = job
            # One stream per image: the content never depends on the worker count or order of writing.
            rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, label, i]))
            prefix = wnid if split == "train" else f"val_{wnid}"
            (staging / split / wnid / f"{prefix}_{i:05d}.JPEG").write_bytes(_jpeg_bytes(render_image(label, rng)))

        workers = max(1, num_workers if num_workers is not None else (os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for _ in tqdm(pool.map(write_one, jobs), total=len(jobs), desc=f"write {final.name}", unit="img",
                          disable=not progress):
                pass
        _write_noisy_csv(staging, jobs, seed)
        atomic_write_json(staging / _INFO_FILE, {"size": size, "seed": seed, "images": len(jobs)})
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / _INFO_FILE).exists():  # not a concurrent writer that finished first
                raise
    finally:
        remove_path(staging)
    return final


def _write_noisy_csv(root: Path, jobs: list[tuple], seed: int) -> None:
    """The release's noisy_imagenette.csv: each train label replaced by another class with probability p%."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
    class_ids = [wnid for wnid, _ in IMAGENETTE_CLASSES]
    with open(root / "noisy_imagenette.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path"] + [f"noisy_labels_{p}" for p in NOISY_LABEL_PERCENTS] + ["is_valid"])
        for _, split, label, wnid, i in jobs:
            prefix = wnid if split == "train" else f"val_{wnid}"
            draws = rng.random(len(NOISY_LABEL_PERCENTS))
            others = rng.integers(1, len(class_ids), size=len(NOISY_LABEL_PERCENTS))
            noisy = [class_ids[(label + int(o)) % len(class_ids)] if split == "train" and d < p / 100 else wnid
                     for p, d, o in zip(NOISY_LABEL_PERCENTS, draws, others)]
            writer.writerow([f"{split}/{wnid}/{prefix}_{i:05d}.JPEG"] + noisy + [str(split == "val")])
