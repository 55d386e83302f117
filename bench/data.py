"""Measure training-batch throughput (images/s) from the decoded cache at several loader worker counts."""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from shared_data import augment, environment, errors, run_config
from shared_data.batches import train_batch, train_steps_per_epoch
from shared_data.loader import BatchLoader
from shared_data.prepare import prepare_data
from shared_data.registry import DATASET_NAMES
from shared_data.synthetic import SYNTHETIC_SIZES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="synthetic", choices=DATASET_NAMES)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--synthetic-size", default="small", choices=tuple(SYNTHETIC_SIZES))
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=150, help="timed batches per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--prefetch", type=int, default=8)
    parser.add_argument("--augment", default=run_config.DEFAULTS["augment"], choices=augment.AUGMENTS,
                        help="official: the training default (RandAugment, erasing, Mixup/CutMix); basic: crop and flip")
    parser.add_argument("--no-download", action="store_true")
    return parser


def measure(data, *, batch_size: int, img_size: int, batches: int, num_workers: int, prefetch: int,
            augmentation: augment.Augmentation | None = None) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image: this process's threads together) over `batches` training
    batches, augmented by `augmentation` or cropped and flipped; the CPU time hardly depends on other jobs."""
    steps = train_steps_per_epoch(len(data.train), batch_size)
    if steps == 0:
        raise SystemExit(f"--batch-size: {batch_size} exceeds the {len(data.train)} training images")

    def batch(i: int):
        return train_batch(data.train, seed=0, epoch=i // steps, index=i % steps, batch_size=batch_size,
                           img_size=img_size, augment=augmentation)

    batch(0)  # imports and builds what the augmentation needs once, outside the timing
    loader = BatchLoader(batch, range(batches), num_workers=num_workers, prefetch=prefetch)
    images = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in tqdm(loader, desc=f"{num_workers} workers", unit="batch", leave=False):
        images += len(batch[0])
    return images / (time.perf_counter() - start), (time.process_time() - cpu_start) * 1e3 / images


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    data = errors.exit_on_error("benchmark_data.py", lambda: prepare_data(
        args.dataset, args.data_dir, args.img_size, synthetic_size=args.synthetic_size,
        allow_download=not args.no_download))
    # Touch every cached page once, so the numbers measure batch assembly and not the first disk read.
    data.train.images.sum(dtype="uint64")
    settings = run_config.resolve(dict(augment=args.augment), "flax")  # the training defaults for this --augment
    augmentation = augment.from_config(settings, data.num_classes)
    print(f"{data.dataset}: {len(data.train)} train images cached at {data.resolution}px, "
          f"crop {args.img_size}, batch {args.batch_size}, --augment {args.augment}, "
          f"{environment.machine_load_text()}")
    for workers in args.workers:
        rate, cpu_ms = measure(data, batch_size=args.batch_size, img_size=args.img_size, batches=args.batches,
                               num_workers=workers, prefetch=args.prefetch, augmentation=augmentation)
        print(f"workers={workers:<2}  {rate:8.0f} train images/s  {cpu_ms:6.3f} CPU ms/image")
