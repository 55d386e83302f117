"""Download, verify and cache a dataset once, then print a summary: counts, skipped files, cache size."""

from __future__ import annotations

import argparse
import collections

from shared_data.errors import exit_on_error
from shared_data.prepare import PreparedData, prepare_data
from shared_data.registry import DATASET_NAMES, NOISY_LABEL_PERCENTS
from shared_data.synthetic import SYNTHETIC_SIZES
from shared_data.trash_safe import tree_size

PROG = "prepare_data.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="imagenette-320", choices=DATASET_NAMES)
    parser.add_argument("--data-dir", default="data", help="where releases, archives and the cache live")
    parser.add_argument("--img-size", type=int, default=256, help="training crop; the cache stores img_size*292/256")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--synthetic-size", default="small", choices=tuple(SYNTHETIC_SIZES))
    parser.add_argument("--noisy-labels", type=int, default=0, choices=NOISY_LABEL_PERCENTS)
    parser.add_argument("--num-workers", type=int, default=None, help="decode threads (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--no-download", action="store_true", help="never download; fall back to synthetic")
    return parser


def summary(data: PreparedData) -> str:
    lines = [f"dataset {data.dataset}" + (" (FALLBACK: real dataset unavailable)" if data.fell_back else ""),
             f"source  {data.root}",
             f"cache   {data.cache_dir}  ({tree_size(data.cache_dir) / 2**20:.1f} MiB, "
             f"{data.resolution}x{data.resolution} stored for {data.img_size} crops)",
             f"{'class':<11} {'name':<22} {'train':>6} {'val':>6}"]
    train_counts = collections.Counter(data.train.labels.tolist())
    val_counts = collections.Counter(data.val.labels.tolist())
    for label, (wnid, name) in enumerate(zip(data.class_ids, data.class_names)):
        lines.append(f"{wnid:<11} {name:<22} {train_counts[label]:>6} {val_counts[label]:>6}")
    lines.append(f"{'total':<34} {len(data.train):>6} {len(data.val):>6}")
    lines.append(f"skipped {len(data.skipped)} file(s)")
    lines.extend(f"  {skipped.path}: {skipped.reason}" for skipped in data.skipped)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Prepare and summarise; on an error one line and the training scripts' exit code (2: a flag, 1: the data)."""
    args = build_parser().parse_args(argv)
    data = exit_on_error(PROG, lambda: prepare_data(
        args.dataset, args.data_dir, args.img_size, seed=args.seed, strict=args.strict,
        synthetic_size=args.synthetic_size, noisy_labels=args.noisy_labels, num_workers=args.num_workers,
        allow_download=not args.no_download))
    print(summary(data))
