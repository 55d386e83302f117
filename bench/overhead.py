"""The instrumentation overhead of each stack: epoch time with per-step timing against without."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
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
BOOTSTRAP_SAMPLES = 2000  # resamples of the runs for the overhead's standard error
QUIET_QUANTILE = 0.1  # the epochs compared: each side's fastest tenth (see Overhead)
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
    """One stack's epoch training times (seconds) with per-step timing on and off: one tuple per run, of the epochs
    after the first.

    The overhead compares the QUIET_QUANTILE of each side's epochs: on a shared host, interference only ever adds
    time, and it comes in spells of several epochs (on the 2-core VM of docs/performance.md whole epochs run 25-30%
    slow, plain torch loops too), while per-step timing costs every epoch the same; so the fastest epochs show the
    stacks' own time, as timeit's documentation argues for the minimum of repeated timings. The medians' overhead is
    given beside it. Errors come from resampling whole runs, not epochs: epochs of one run share its spells.
    """

    stack: str
    on_runs: tuple[tuple[float, ...], ...]
    off_runs: tuple[tuple[float, ...], ...]

    @property
    def epochs_on(self) -> int:
        return sum(map(len, self.on_runs))

    @property
    def epochs_off(self) -> int:
        return sum(map(len, self.off_runs))

    @property
    def on_s(self) -> float:
        """The QUIET_QUANTILE of the epoch times with timing on, seconds."""
        return _quantile(self.on_runs, QUIET_QUANTILE)

    @property
    def off_s(self) -> float:
        return _quantile(self.off_runs, QUIET_QUANTILE)

    @property
    def percent(self) -> float:
        """The overhead of timing on: (on_s / off_s - 1) * 100."""
        return _overhead(self.on_runs, self.off_runs, QUIET_QUANTILE)

    @property
    def median_percent(self) -> float:
        return _overhead(self.on_runs, self.off_runs, 0.5)

    @functools.cached_property  # 2000 resamples: computed once, read by the table, the record and target_met
    def error_percent(self) -> float | None:
        """The standard error of `percent` in percentage points (see _run_bootstrap_error)."""
        return _run_bootstrap_error(self.on_runs, self.off_runs, QUIET_QUANTILE)

    @functools.cached_property
    def median_error_percent(self) -> float | None:
        return _run_bootstrap_error(self.on_runs, self.off_runs, 0.5)

    @property
    def target_met(self) -> bool:
        """Below the target by more than the figure's own error, and that error itself below the target: a noisy
        figure, or one with no error (a single run a side), shows nothing either way."""
        error = self.error_percent
        return error is not None and self.percent + error < TARGET_PERCENT and error < TARGET_PERCENT


def _quantile(runs: tuple[tuple[float, ...], ...] | list, q: float) -> float:
    return float(np.quantile(np.concatenate([np.asarray(run, float) for run in runs]), q))


def _overhead(on_runs: tuple | list, off_runs: tuple | list, q: float) -> float:
    return (_quantile(on_runs, q) / _quantile(off_runs, q) - 1) * 100


def _run_bootstrap_error(on_runs: tuple, off_runs: tuple, q: float) -> float | None:
    """The spread (standard deviation, percentage points) of the overhead at quantile `q` over BOOTSTRAP_SAMPLES
    resamples of each side's runs, with replacement, each run with all its epochs (a fixed seed); None with fewer
    than 2 runs a side."""
    if min(len(on_runs), len(off_runs)) < 2:
        return None
    generator = np.random.default_rng(0)
    samples = [_overhead([on_runs[i] for i in generator.integers(0, len(on_runs), len(on_runs))],
                         [off_runs[i] for i in generator.integers(0, len(off_runs), len(off_runs))], q)
               for _ in range(BOOTSTRAP_SAMPLES)]
    return float(np.std(samples))


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
    """Per stack, the epochs of all its repeats, run by run; BenchmarkError when a side has no epoch to use."""
    results = []
    for stack in dict.fromkeys(item.stack for item in planned):
        runs: dict[str, list[tuple[float, ...]]] = {timing: [] for timing in STEP_TIMINGS}
        for item in planned:
            if item.stack == stack and (times := epoch_train_times(logdir / stack / item.run_name)):
                runs[timing_of(item)].append(tuple(times))
        empty = [timing for timing, values in runs.items() if not values]
        if empty:
            raise BenchmarkError(f"{stack}: no epoch after the first with step timing {' or '.join(empty)}; "
                                 "give --epochs 2 or more (and a --max-steps that reaches epoch 2)")
        results.append(Overhead(stack, tuple(runs["on"]), tuple(runs["off"])))
    return results


def summarize(logdir: Path, planned: list[PlannedRun], record: dict[str, Any]) -> dict[str, Any]:
    """`record` (runner.run_planned's, which holds the load around each run) with each stack's device and overhead
    added: what overhead.json holds and format_report prints."""
    record["devices"] = {item.stack: read_json(logdir / item.stack / item.run_name / "config.json").get("device")
                         for item in planned}
    record["overhead"] = [{**asdict(result), "quantile": QUIET_QUANTILE, "on_s": result.on_s, "off_s": result.off_s,
                           "epochs_on": result.epochs_on, "epochs_off": result.epochs_off,
                           "overhead_percent": result.percent, "overhead_error_percent": result.error_percent,
                           "median_overhead_percent": result.median_percent,
                           "median_overhead_error_percent": result.median_error_percent,
                           "target_percent": TARGET_PERCENT, "target_met": result.target_met,
                           "contended": any(run["contended"] for run in record["runs"] if run["stack"] == result.stack)}
                          for result in overheads(logdir, planned)]
    return record


def format_report(record: dict[str, Any]) -> str:
    """The overhead table, the load around each run, the devices and the library versions; a stack with a run started
    under contention is marked in both tables."""
    def plus_minus(percent: float, error: float | None) -> str:
        return f"{percent:+.2f}%" + ("" if error is None else f" ± {error:.2f}")

    lines = [format_table(
        ("stack", "runs on / off", "epochs on / off", "fastest tenth on s", "off s", "overhead ± standard error",
         "medians' overhead", f"target < {TARGET_PERCENT:g}%"),
        [(STACK_VARIANTS[row["stack"]] + (CONTENDED if row["contended"] else ""),
          f"{len(row['on_runs'])} / {len(row['off_runs'])}", f"{row['epochs_on']} / {row['epochs_off']}",
          f"{row['on_s']:.3f}", f"{row['off_s']:.3f}",
          plus_minus(row["overhead_percent"], row["overhead_error_percent"]),
          plus_minus(row["median_overhead_percent"], row["median_overhead_error_percent"]),
          "met" if row["target_met"] else "not met") for row in record["overhead"]])]
    cores = max((run["cores"] for run in record["runs"]), default=0)
    lines += ["", f"epoch/train_time_s, epoch {FIRST_EPOCH} (compilation) left out; the overhead compares each "
              f"side's fastest tenth of epochs ({QUIET_QUANTILE:g} quantile: host interference only adds time), the "
              "medians' beside it; standard errors from "
              f"{BOOTSTRAP_SAMPLES} bootstrap resamples of whole runs; the target is met when overhead + error is "
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
