"""Run both training stacks with identical settings (PyTorch eager and compiled), then compare their traces."""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import sys
from pathlib import Path

from bench import runner
from bench.runner import BenchmarkError, PlannedRun
from report import compare
from report.runs import NotComparableError
from shared_data import dashboards, registry, run_config
from shared_data.augment import AUGMENTS
from shared_data.run_config import DATASETS, PRECISIONS, PRESETS, SYNTHETIC_SIZES

INIT_WEIGHTS = "init-weights.pth"  # --same-init: in the benchmark's log folder
DEFAULT_PROFILE_STEPS = "5,7"


def _run_name(img_size: int | None, batch_size: int | None, precision: str | None, mode: str | None,
              repeat: int) -> str:
    parts = [f"px{img_size}" if img_size else None, f"bs{batch_size}" if batch_size else None, precision, mode,
             f"r{repeat}"]
    return "-".join(part for part in parts if part)


def plan_runs(args: argparse.Namespace, logdir: Path) -> list[PlannedRun]:
    """Every run, the stacks interleaved and their order rotated each repeat, so that slow drifts of the
    machine and whatever one run leaves warm for the next do not always favour the same stack."""
    shared = []
    for attribute, flag in runner.SHARED_FLAGS:
        value = getattr(args, attribute)
        if value is not None:
            shared += [flag, str(value)]
    if args.same_init:
        shared += ["--pretrained", str(logdir / INIT_WEIGHTS)]
    variants = [("flax", False)]
    if not args.no_eager:
        variants.append(("lightning", False))
    if not args.no_compile:
        variants.append(("lightning", True))
    planned = []
    settings_grid = itertools.product(args.img_sizes or [None], args.batch_sizes or [None], args.precisions or [None])
    for repeat, (img_size, batch_size, precision) in itertools.product(range(args.repeats), list(settings_grid)):
        settings = list(shared)
        settings += ["--img-size", str(img_size)] if img_size else []
        settings += ["--batch-size", str(batch_size)] if batch_size else []
        settings += ["--precision", precision] if precision else []
        turn = repeat % len(variants)
        for stack, compiled in variants[turn:] + variants[:turn]:
            mode = None if stack == "flax" else ("compile" if compiled else "eager")
            name = _run_name(img_size, batch_size, precision, mode, repeat)
            command = [sys.executable, str(runner.TRAINING_SCRIPTS[stack]), *settings,
                       "--run-name", name, "--logdir", str(logdir)]
            command += ["--compile"] if compiled else []
            command += ["--profile-steps", args.profile] if args.profile and repeat == 0 else []
            planned.append(PlannedRun(stack, name, compiled, tuple(command)))
    return planned


def write_init_weights(args: argparse.Namespace, path: Path) -> Path:
    """--same-init: one set of initial weights for every run, an official-format PyTorch checkpoint of the model the
    runs train (the dataset's classes, the run seed), written once."""
    import torch

    from lightning_swin.model import create_model

    config = runner.resolved_config(args)
    torch.manual_seed(config["seed"])
    model = create_model(config["model"], num_classes=len(registry.get_spec(config["dataset"]).classes),
                         img_size=config["img_size"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="CPU smoke test:  python scripts/benchmark.py --preset smoke\n"
               "Origin's setting (GPU):  python scripts/benchmark.py --preset swinv2_tiny_window8_256 "
               "--dataset synthetic --synthetic-size imagenette --batch-sizes 32 64 --precisions bf16 fp32 "
               "--epochs 5 --repeats 3")
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="training preset (default smoke)")
    parser.add_argument("--dataset", default=None, choices=DATASETS)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--img-sizes", type=int, nargs="+", default=None,
                        help="one run set per image size, instead of --img-size; with several sizes or batch sizes "
                             "the report shows how the cost grows")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="one run set per batch size (default: the preset's; the origin used 32 64); several "
                             "give the report's 'How the cost grows' section")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="one run set per precision (default: the preset's)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="the same seed for every run and repeat")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--synthetic-size", default=None, choices=SYNTHETIC_SIZES,
                        help="'imagenette' for synthetic data of Imagenette's size")
    parser.add_argument("--augment", default=None, choices=AUGMENTS,
                        help="training augmentation of every run (default: the preset's; config.json records it)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, for min/median/max")
    parser.add_argument("--no-compile", action="store_true", help="skip the Lightning --compile runs")
    parser.add_argument("--no-eager", action="store_true", help="skip the Lightning eager runs")
    parser.add_argument("--logdir", type=Path, default=None, help="default runs/benchmark-<UTC timestamp>/")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/<UTC timestamp>/)")
    parser.add_argument("--force", action="store_true", help="passed to compare.py")
    parser.add_argument("--peak-tflops", type=float, default=None, help="passed to compare.py")
    parser.add_argument("--same-init", action="store_true",
                        help=f"write one set of initial weights ({INIT_WEIGHTS} in the log folder: the model, the "
                             "dataset's classes, the seed) and start every run from it (--pretrained), so the report "
                             "can show both stacks train alike")
    parser.add_argument("--warm-caches", action="store_true",
                        help="let every run share one set of TorchInductor, Triton and JAX compile-cache folders "
                             "(default: each run starts with empty folders of its own, compile-caches/ in the log "
                             "folder)")
    parser.add_argument("--max-wait-s", type=float, default=120.0,
                        help="before each run, wait up to this long for the 1-minute host load to fall to the core "
                             "count; a run started above it is marked in the report (default 120)")
    parser.add_argument("--profile", nargs="?", const=DEFAULT_PROFILE_STEPS, metavar="FIRST,LAST",
                        help="trace global steps FIRST..LAST (default 5,7: after the first step's compilation, inside "
                             "the first epoch, which the 'excluding the first epoch' figures leave out) of each "
                             "variant's first repeat with its own profiler (--profile-steps); the report then shows "
                             "the time per kind of operation and the top operations of each stack")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands (with each run's compile-cache variables) and stop")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.no_compile and args.no_eager:
        parser.error("--no-compile with --no-eager leaves no Lightning run to compare with")
    if args.img_size is not None and args.img_sizes:
        parser.error("--img-size and --img-sizes: give one of them")
    if args.max_wait_s < 0:
        parser.error("--max-wait-s must be >= 0")
    try:
        run_config.parse_profile_steps(args.profile)
    except run_config.ConfigError as error:
        parser.error(str(error).replace("--profile-steps", "--profile"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    logdir = args.logdir or Path("runs") / f"benchmark-{stamp}"
    out = args.out or Path("reports") / stamp
    planned = plan_runs(args, logdir.resolve())
    try:
        prepare = [runner.prepare_command(args, img_size) for img_size in args.img_sizes or [None]]
        if args.dry_run:
            for command in prepare:
                print(" ".join(command))
            for item in planned:
                caches = runner.compile_cache_dirs(logdir.resolve(), item, args.warm_caches)
                print(" ".join([*(f"{name}={path}" for name, path in caches.items()), *item.command]))
            return 0
        scripts = (runner.PREPARE_SCRIPT, *runner.TRAINING_SCRIPTS.values())
        missing = [str(path) for path in scripts if not path.exists()]
        if missing:
            raise BenchmarkError(f"script(s) not found: {', '.join(missing)}")
        if (logdir / "benchmark.json").exists():
            raise BenchmarkError(f"--logdir {logdir} already holds a benchmark; choose a new folder")
        record = {"created": stamp, "argv": sys.argv if argv is None else ["benchmark.py", *argv],
                  "environment": runner.environment(), "compile_caches": "warm" if args.warm_caches else "cold",
                  "max_wait_s": args.max_wait_s, "runs": []}
        dashboards.write_layout(logdir.resolve())  # TensorBoard over the runs folder overlays the runs from the start
        if args.same_init:
            record["same_init"] = str(write_init_weights(args, logdir.resolve() / INIT_WEIGHTS))
        runner.run_planned(planned, logdir.resolve(), record, prepare, warm_caches=args.warm_caches,
                           max_wait_s=args.max_wait_s)
        report = compare.compare(logdir.resolve(), out, force=args.force, peak_tflops=args.peak_tflops)
    except (BenchmarkError, NotComparableError) as error:
        raise SystemExit(f"benchmark.py: {error}") from None
    print(f"runs: {logdir}\nreport: {report}")
    return 0
