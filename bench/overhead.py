"""The instrumentation overhead of each stack: epoch time with per-step timing against without."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import runner
from bench.runner import SHARED_FLAGS, BenchmarkError, PlannedRun
from report.compare import CONTENDED
from report.runs import EAGER, FLAX, NotComparableError, read_json, read_run
from report.stats import measured_epochs
from shared_data import tags
from shared_data.run_config import DATASETS, PRESETS, STEP_TIMINGS, SYNTHETIC_SIZES
from tools.checkpoints import format_table

# The Lightning rows are eager: --compile is a different program, whose own overhead is not this question.
STACK_VARIANTS = {"flax": FLAX, "lightning": EAGER}
TARGET_PERCENT = 2.0  # per-step timing may cost under 2% of epoch time, on both stacks
FIRST_EPOCH = 1  # left out: it pays for compilation and allocation
RESULT_FILE = "overhead.json"
BOOTSTRAP_SAMPLES = 2000  # resamples of the epoch times for the overhead's standard error
# How this benchmark takes the flags it passes to both training scripts unchanged (runner.SHARED_FLAGS; a flag
# not named here is a string), with this benchmark's defaults: the preset's value applies where none is given.
PASSED_THROUGH: dict[str, dict[str, Any]] = {
    "preset": dict(default="smoke", choices=sorted(PRESETS), help="training preset (default smoke)"),
    "dataset": dict(choices=DATASETS),
    "synthetic_size": dict(default="tiny", choices=SYNTHETIC_SIZES, help="(default tiny)"),
    "epochs": dict(type=int, default=4, help="epochs per run, the first left out (default 4)"),
    **{attribute: dict(type=int) for attribute in ("img_size", "max_steps", "seed", "num_workers")},
}


@dataclass(frozen=True)
class Overhead:
    """One stack's median epoch training time (seconds) with per-step timing on and off, over the epochs after the
    first, and the epoch times themselves, from which the figure's own error follows."""

    stack: str
    on_s: float
    off_s: float
    epochs_on: int
    epochs_off: int
    on_times: tuple[float, ...] = ()
    off_times: tuple[float, ...] = ()

    @property
    def percent(self) -> float:
        return (self.on_s / self.off_s - 1) * 100

    @functools.cached_property  # 2000 resamples: computed once, read by the table, the record and target_met
    def error_percent(self) -> float | None:
        """The standard error of `percent` in percentage points: the spread of the overhead over BOOTSTRAP_SAMPLES
        resamples of the epochs (with replacement, a fixed seed); None with fewer than 2 epochs a side."""
        if min(len(self.on_times), len(self.off_times)) < 2:
            return None
        generator = np.random.default_rng(0)
        on, off = np.asarray(self.on_times), np.asarray(self.off_times)
        samples = [np.median(generator.choice(on, on.size)) / np.median(generator.choice(off, off.size))
                   for _ in range(BOOTSTRAP_SAMPLES)]
        return float(np.std(samples) * 100)

    @property
    def target_met(self) -> bool:
        """Below the target by more than the figure's own error, where it has one, and that error itself below the
        target: a noisy figure shows nothing either way."""
        error = self.error_percent or 0.0
        return self.percent + error < TARGET_PERCENT and error < TARGET_PERCENT


def plan_runs(args: argparse.Namespace, logdir: Path) -> list[PlannedRun]:
    """Each repeat, every stack of --stacks with timing on and off, one after the other: the two runs of a pair are
    neighbours in time, so a slow drift of the machine moves both; odd repeats run off first, so a machine that slows
    or speeds up over a pair favours neither side (an ABBA order)."""
    settings = [part for attribute, flag in SHARED_FLAGS if (value := getattr(args, attribute)) is not None
                for part in (flag, str(value))]
    planned = []
    for repeat in range(args.repeats):
        for stack in args.stacks:
            for timing in (STEP_TIMINGS if repeat % 2 == 0 else tuple(reversed(STEP_TIMINGS))):
                name = f"timing-{timing}-r{repeat}"
                command = (sys.executable, str(runner.TRAINING_SCRIPTS[stack]), *settings, "--step-timing", timing,
                           "--run-name", name, "--logdir", str(logdir))
                planned.append(PlannedRun(stack, name, False, command))
    return planned


def timing_of(item: PlannedRun) -> str:
    """'on' or 'off': the --step-timing a planned run was given."""
    return item.command[item.command.index("--step-timing") + 1]


def epoch_train_times(run_dir: Path) -> list[float]:
    """The run's epoch/train_time_s of every epoch after the first (and after any a resume left partial)."""
    run = read_run(run_dir)
    left_out = {FIRST_EPOCH, *run.unmeasured_epochs()}
    return list(measured_epochs(run, tags.EPOCH_TRAIN_TIME, left_out=left_out).values())


def overheads(logdir: Path, planned: list[PlannedRun]) -> list[Overhead]:
    """Per stack, the medians over the epochs of all its repeats; BenchmarkError when a side has no epoch to use."""
    results = []
    for stack in dict.fromkeys(item.stack for item in planned):
        times: dict[str, list[float]] = {timing: [] for timing in STEP_TIMINGS}
        for item in planned:
            if item.stack == stack:
                times[timing_of(item)] += epoch_train_times(logdir / stack / item.run_name)
        empty = [timing for timing, values in times.items() if not values]
        if empty:
            raise BenchmarkError(f"{stack}: no epoch after the first with step timing {' or '.join(empty)}; "
                                 "give --epochs 2 or more (and a --max-steps that reaches epoch 2)")
        results.append(Overhead(stack, statistics.median(times["on"]), statistics.median(times["off"]),
                                len(times["on"]), len(times["off"]), tuple(times["on"]), tuple(times["off"])))
    return results


def summarize(logdir: Path, planned: list[PlannedRun], record: dict[str, Any]) -> dict[str, Any]:
    """`record` (runner.run_planned's, which holds the load around each run) with each stack's device and overhead
    added: what overhead.json holds and format_report prints."""
    record["devices"] = {item.stack: read_json(logdir / item.stack / item.run_name / "config.json").get("device")
                         for item in planned}
    record["overhead"] = [{**asdict(result), "overhead_percent": result.percent,
                           "overhead_error_percent": result.error_percent, "target_percent": TARGET_PERCENT,
                           "target_met": result.target_met,
                           "contended": any(run["contended"] for run in record["runs"] if run["stack"] == result.stack)}
                          for result in overheads(logdir, planned)]
    return record


def format_report(record: dict[str, Any]) -> str:
    """The overhead table, the load around each run, the devices and the library versions; a stack with a run started
    under contention is marked in both tables."""
    lines = [format_table(
        ("stack", "timing on s", "timing off s", "epochs on / off", "overhead ± standard error",
         f"target < {TARGET_PERCENT:g}%"),
        [(STACK_VARIANTS[row["stack"]] + (CONTENDED if row["contended"] else ""), f"{row['on_s']:.3f}",
          f"{row['off_s']:.3f}", f"{row['epochs_on']} / {row['epochs_off']}",
          f"{row['overhead_percent']:+.2f}%" + ("" if row["overhead_error_percent"] is None
                                                 else f" ± {row['overhead_error_percent']:.2f}"),
          "met" if row["target_met"] else "not met") for row in record["overhead"]])]
    cores = max((run["cores"] for run in record["runs"]), default=0)
    lines += ["", f"median epoch/train_time_s, epoch {FIRST_EPOCH} (compilation) left out; standard error from "
              f"{BOOTSTRAP_SAMPLES} bootstrap resamples of the epochs; the target is met when overhead + error is "
              "below it",
              "", f"1-minute load before -> after each run ({cores} cores;{CONTENDED} started above them):"]
    lines.append(format_table(
        ("run", "load", "wall s"),
        [(f"{STACK_VARIANTS[run['stack']]} {run['run_name']}" + (CONTENDED if run["contended"] else ""),
          "{:.2f} -> {:.2f}".format(*run["load_average_1m"]), f"{run['wall_s']:.1f}") for run in record["runs"]]))
    environment = record["environment"]
    lines += ["", *(f"device ({STACK_VARIANTS[stack]}): {device}" for stack, device in record["devices"].items()),
              f"host: {environment['host']} ({environment['platform']}), {environment['cpu']}",
              "versions: " + ", ".join(f"{name} {version}" for name, version in environment["versions"].items())]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each stack is run with --step-timing on and off in turn, --repeats times each, one run at a time;\n"
               f"measure on a quiet machine. Results: {RESULT_FILE} in the log folder.")
    for attribute, flag in SHARED_FLAGS:
        parser.add_argument(flag, **PASSED_THROUGH.get(attribute, {}))
    parser.add_argument("--repeats", type=int, default=2, help="runs per stack and timing (default 2)")
    parser.add_argument("--stacks", nargs="+", choices=list(STACK_VARIANTS), default=list(STACK_VARIANTS),
                        help="the stacks to measure (default both)")
    parser.add_argument("--logdir", type=Path, default=None, help="default runs/overhead-<UTC timestamp>/")
    parser.add_argument("--max-wait-s", type=float, default=120.0,
                        help="before each run, wait up to this long for the 1-minute host load to fall to the core "
                             "count (default 120)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = parser.parse_args(argv)
    refused = [message for wrong, message in (
        (args.repeats < 1, "--repeats must be at least 1"),
        (args.epochs < 2, f"--epochs must be at least 2: epoch {FIRST_EPOCH} (compilation) is left out"),
        (args.max_wait_s < 0, "--max-wait-s must be >= 0"),
    ) if wrong]
    if refused:
        parser.error("; ".join(refused))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    logdir = (args.logdir or Path("runs") / f"overhead-{stamp}").resolve()
    planned = plan_runs(args, logdir)
    try:
        prepare = runner.prepare_command(args)
        if args.dry_run:
            print(" ".join(prepare))
            for item in planned:
                caches = runner.compile_cache_dirs(logdir, item, warm=False)
                print(" ".join([*(f"{name}={path}" for name, path in caches.items()), *item.command]))
            return 0
        if (logdir / RESULT_FILE).exists() or (logdir / "benchmark.json").exists():
            raise BenchmarkError(f"--logdir {logdir} already holds a benchmark; choose a new folder")
        given = sys.argv if argv is None else ["benchmark_overhead.py", *argv]
        record = {"created": stamp, "argv": given, "environment": runner.environment(), "runs": []}
        runner.run_planned(planned, logdir, record, [prepare], max_wait_s=args.max_wait_s)
        summarize(logdir, planned, record)
    except (BenchmarkError, NotComparableError) as error:
        raise SystemExit(f"benchmark_overhead.py: {error}") from None
    (logdir / RESULT_FILE).write_text(json.dumps(record, indent=2))
    print(format_report(record))
    print(f"\nruns and {RESULT_FILE}: {logdir}")
    return 0
