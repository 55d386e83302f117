"""Compare Lightning and Flax runs from their TensorBoard traces: speedups, time breakdown, MFU, report and figures."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from scripts import report_figures
from scripts.model_flops import forward_flops
from shared_data import tags
from shared_data.timing import cpu_description

# Two runs are comparable only when all of these agree (seed and epochs may differ between repeats).
COMPARABLE_FIELDS = ("dataset", "model", "img_size", "batch_size", "precision", "device")
STACKS = ("lightning", "flax")
FLAX, EAGER, COMPILED = "Flax", "Lightning eager", "Lightning compiled"
VARIANT_ORDER = (FLAX, EAGER, COMPILED)
# (faster candidate, other): the comparisons the report makes when both variants ran.
PAIRINGS = ((FLAX, EAGER), (FLAX, COMPILED), (COMPILED, EAGER))
BREAKDOWN_PARTS = (
    "data wait", "compute", "evaluation", "checkpoint", "compilation", "logging/other", "startup/teardown",
)
IMAGENETTE_CLASSES = 10

# Dense peak TFLOP/s per precision (vendor datasheets; fp32 is the non-tensor-core rate, so a run that
# lets the library use TF32 can show an MFU above what fp32 allows). Most specific patterns first.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    (r"h100.*pcie", {"bf16": 756.0, "fp32": 51.2}),
    (r"h100.*nvl", {"bf16": 835.0, "fp32": 60.0}),
    (r"h100|h800", {"bf16": 989.4, "fp32": 66.9}),
    (r"h200", {"bf16": 989.4, "fp32": 66.9}),  # GH200 too
    (r"a100|a800", {"bf16": 312.0, "fp32": 19.5}),
    (r"a10g", {"bf16": 70.0, "fp32": 31.2}),
    (r"\ba10\b", {"bf16": 125.0, "fp32": 31.2}),
    (r"l40s", {"bf16": 362.1, "fp32": 91.6}),
    (r"\bl4\b", {"bf16": 121.0, "fp32": 30.3}),
    (r"rtx a6000|a6000", {"bf16": 154.8, "fp32": 38.7}),
    (r"4090", {"bf16": 165.2, "fp32": 82.6}),
    (r"3090", {"bf16": 71.0, "fp32": 35.6}),
    (r"v100", {"bf16": None, "fp32": 15.7}),  # no bf16 units: an MFU would be meaningless
    (r"\bt4\b", {"bf16": None, "fp32": 8.1}),
)


def same_device(device: str | None) -> str | None:
    """The device string with a trailing single-device count dropped: the Lightning stack writes
    'cuda: <name> x1' where the Flax stack writes 'cuda: <name>' for the same GPU."""
    return re.sub(r"\s+x1$", "", device.strip()) if isinstance(device, str) else device


class NotComparableError(Exception):
    """Runs that cannot be compared; the message is one line naming the runs and what differs."""


@dataclass
class Run:
    """One training run: its folder, config.json, summary.json and every scalar point of its event files."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    scalars: dict[str, list[tuple[int, float]]]

    @property
    def variant(self) -> str:
        if self.config["stack"] == "flax":
            return FLAX
        return COMPILED if self.config.get("compile") else EAGER

    def key(self) -> tuple[Any, ...]:
        return tuple(same_device(self.config.get(name)) if name == "device" else self.config.get(name)
                     for name in COMPARABLE_FIELDS)

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        points = self.scalars.get(tag, [])
        return np.array([p[0] for p in points], dtype=np.int64), np.array([p[1] for p in points], dtype=np.float64)

    def per_epoch(self, tag: str, epochs: int | None = None) -> dict[int, float]:
        return {step: value for step, value in self.scalars.get(tag, []) if epochs is None or step <= epochs}

    def epochs_done(self) -> int:
        return len(self.per_epoch(tags.EPOCH_TRAIN_TIME))


@dataclass
class Group:
    """Runs of one configuration, by variant (repeats sorted by seed then name)."""

    key: dict[str, Any]
    variants: dict[str, list[Run]]
    forced: list[str] = field(default_factory=list)
    slug_suffix: str = ""

    @property
    def title(self) -> str:
        k = self.key
        return (f"{k['model']}, {k['dataset']}, {k['img_size']}px, batch {k['batch_size']}, "
                f"{k['precision']} on {k['device']}")

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", f"bs{self.key['batch_size']}-{self.key['precision']}-"
                      f"{self.key['img_size']}px-{self.key['model']}").strip("-") + self.slug_suffix

    def common_epochs(self) -> int:
        return min(run.epochs_done() for runs in self.variants.values() for run in runs)


@dataclass
class RunStats:
    """The timing figures of one run over its first `epochs` epochs."""

    epochs: int
    train_s: float
    train_excl_first_s: float | None
    val_s: float
    val_excl_first_s: float | None
    median_step_s: float
    warmup_s: float
    train_images_per_s: float | None
    val_accuracy: float | None
    breakdown: dict[str, float]


@dataclass
class Speedup:
    """How much faster `faster` is than `slower`, in percent, once per repeat."""

    faster: str
    slower: str
    percents: list[float]

    def sentence(self) -> str:
        middle = statistics.median(self.percents)
        if round(middle) == 0:
            return f"{self.faster} and {self.slower} take the same time (within 0.5%, {len(self.percents)} repeat(s))"
        spread = f"min {min(self.percents):.0f}%, max {max(self.percents):.0f}%; " if len(self.percents) > 1 else ""
        repeats = len(self.percents)
        return (f"{self.faster} is {middle:.0f}% faster than {self.slower} "
                f"({spread}{repeats} repeat{'s' if repeats > 1 else ''})")


# ---------------------------------------------------------------- reading


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar point (no reservoir sampling) of the event files directly in `run_dir`, by tag, sorted by step."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    available = accumulator.Tags()
    points: dict[str, dict[int, float]] = defaultdict(dict)
    for tag in available.get("scalars", []):
        for event in accumulator.Scalars(tag):
            points[tag][event.step] = float(event.value)  # a resumed run re-logs a step: the last value wins
    # Writers on the TF2 summary API store scalars as rank-0 tensors.
    for tag in available.get("tensors", []):
        for event in accumulator.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.size == 1 and np.issubdtype(value.dtype, np.number):
                points[tag][event.step] = float(value.reshape(()))
    return {tag: sorted(by_step.items()) for tag, by_step in points.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise NotComparableError(f"{path}: cannot read JSON ({error}); re-run that training run") from None


def read_run(run_dir: Path) -> Run:
    """Load one run folder `<logdir>/<stack>/<run-name>/`."""
    config = _read_json(run_dir / "config.json")
    missing = [name for name in ("stack", *COMPARABLE_FIELDS) if name not in config]
    if missing:
        raise NotComparableError(
            f"{run_dir / 'config.json'}: missing {', '.join(missing)}; was it written by a training script?")
    if config["stack"] not in STACKS:
        raise NotComparableError(
            f"{run_dir / 'config.json'}: unknown stack {config['stack']!r}; expected one of {STACKS}")
    summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else {}
    scalars = read_scalars(run_dir)
    if not scalars.get(tags.EPOCH_TRAIN_TIME):
        raise NotComparableError(
            f"{run_dir}: no {tags.EPOCH_TRAIN_TIME} points in its event files; did the run finish an epoch?")
    return Run(run_dir, config, summary, scalars)


def find_runs(logdir: Path) -> list[Run]:
    """Every run folder under `logdir` (config.json in `.../<stack>/<run-name>/`), checkpoints skipped."""
    if not logdir.is_dir():
        raise NotComparableError(
            f"--runs {logdir}: no such folder; run scripts/benchmark.py or point --runs at a log folder")
    folders = sorted(
        path.parent for path in logdir.rglob("config.json")
        if path.parent.parent.name in STACKS and "checkpoints" not in path.relative_to(logdir).parts
    )
    return [read_run(folder) for folder in folders]


# ---------------------------------------------------------------- pairing


def _differences(a: tuple[Any, ...], b: tuple[Any, ...]) -> list[str]:
    return [f"{name} ({x} vs {y})" for name, x, y in zip(COMPARABLE_FIELDS, a, b) if x != y]


def _sorted_variants(runs: Iterable[Run]) -> dict[str, list[Run]]:
    variants: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        variants[run.variant].append(run)
    return {name: sorted(variants[name], key=lambda r: (r.config.get("seed", 0), r.path.name))
            for name in VARIANT_ORDER if name in variants}


def group_runs(runs: list[Run], force: bool = False) -> tuple[list[Group], list[Run]]:
    """Pair Lightning and Flax runs by configuration: (comparable groups, runs left without a counterpart).

    Raises NotComparableError naming the differing fields when a Lightning run and a Flax run differ,
    unless `force`, which pairs them anyway and records the differences on the group.
    """
    by_key: dict[tuple[Any, ...], list[Run]] = defaultdict(list)
    for run in runs:
        by_key[run.key()].append(run)
    groups, lone = [], {stack: [] for stack in STACKS}
    for key, members in by_key.items():
        stacks = {run.config["stack"] for run in members}
        if stacks == set(STACKS):
            groups.append(Group(dict(zip(COMPARABLE_FIELDS, key)), _sorted_variants(members)))
        else:
            lone[stacks.pop()].append(key)
    unpaired: list[Run] = []
    free_flax = list(lone["flax"])
    for key in lone["lightning"]:
        if not free_flax:
            unpaired += by_key[key]
            continue
        nearest = min(free_flax, key=lambda other: len(_differences(key, other)))
        differences = _differences(key, nearest)
        if not force:
            first_lightning, first_flax = by_key[key][0].path, by_key[nearest][0].path
            raise NotComparableError(
                f"not comparable: {first_lightning} and {first_flax} differ in {', '.join(differences)}; "
                "re-run with identical settings or pass --force"
            )
        free_flax.remove(nearest)
        groups.append(Group(dict(zip(COMPARABLE_FIELDS, key)), _sorted_variants(by_key[key] + by_key[nearest]),
                            forced=differences))
    for key in free_flax:
        unpaired += by_key[key]
    if not groups:
        found = ", ".join(f"{len([r for r in runs if r.config['stack'] == s])} {s}" for s in STACKS)
        raise NotComparableError(f"nothing to compare: found {found} run(s); need at least one of each stack")
    return groups, unpaired


# ---------------------------------------------------------------- figures of one run


def _median_step(run: Run) -> float:
    steps, seconds = run.series(tags.STEP_TIME)
    later = seconds[steps > steps.min()] if len(steps) > 1 else seconds
    return float(np.median(later)) if len(later) else math.nan


def warmup_seconds(run: Run) -> float:
    """Compilation / warm-up cost: the first step's excess over the median step."""
    first = run.per_epoch(tags.FIRST_STEP_TIME)
    if first:
        first_step = first[min(first)]
    else:
        steps, seconds = run.series(tags.STEP_TIME)
        first_step = float(seconds[0]) if len(seconds) else math.nan
    return max(first_step - _median_step(run), 0.0)


def time_breakdown(run: Run, epochs: int | None = None) -> dict[str, float]:
    """Seconds per part of the run (BREAKDOWN_PARTS); the parts add up to the run's wall time."""
    last_step = _last_train_step(run, epochs)
    coverage = step_coverage(run)

    def total(tag: str) -> float:
        # A trace that logged every k-th step stands for all of them.
        return float(sum(v for s, v in run.scalars.get(tag, []) if last_step is None or s <= last_step)) / coverage

    def epoch_total(tag: str) -> float:
        return float(sum(run.per_epoch(tag, epochs).values()))

    compilation = warmup_seconds(run)
    parts = {
        "data wait": total(tags.DATA_WAIT_TIME),
        # The first step's excess is compilation, counted once, not again as compute.
        "compute": max(total(tags.COMPUTE_TIME) - compilation, 0.0),
        "evaluation": epoch_total(tags.EPOCH_VAL_TIME),
        "checkpoint": epoch_total(tags.EPOCH_CHECKPOINT_TIME),
        "compilation": compilation,
    }
    epoch_wall = epoch_total(tags.EPOCH_WALL_TIME)
    parts["logging/other"] = max(epoch_wall - sum(parts.values()), 0.0)
    run_wall = run.summary.get("wall_time_s")
    complete = epochs is None or epochs >= run.epochs_done()
    parts["startup/teardown"] = max(float(run_wall) - epoch_wall, 0.0) if run_wall and complete else 0.0
    return parts


def step_coverage(run: Run) -> float:
    """Fraction of the steps between the first and last logged one that have a time/step_s point (1: all)."""
    steps, _ = run.series(tags.STEP_TIME)
    return len(steps) / (steps.max() - steps.min() + 1) if len(steps) else 1.0


def shares(parts: dict[str, float]) -> dict[str, float]:
    """Each part's fraction of the total."""
    whole = sum(parts.values())
    return {name: (value / whole if whole else 0.0) for name, value in parts.items()}


def _last_train_step(run: Run, epochs: int | None) -> int | None:
    """Last global step of epoch `epochs`, from the step count per epoch (None: all steps)."""
    if epochs is None or epochs >= run.epochs_done():
        return None
    steps, _ = run.series(tags.STEP_TIME)
    return int(round(steps.max() * epochs / run.epochs_done())) if len(steps) else None


def final_accuracy(run: Run) -> float | None:
    if run.summary.get("final_val_accuracy") is not None:
        return float(run.summary["final_val_accuracy"])
    accuracy = run.per_epoch(tags.VAL_ACCURACY)
    return accuracy[max(accuracy)] if accuracy else None


def run_stats(run: Run, epochs: int | None = None) -> RunStats:
    """Totals over the first `epochs` epochs (all by default), with and without the first epoch."""
    epochs = epochs or run.epochs_done()
    train, val = run.per_epoch(tags.EPOCH_TRAIN_TIME, epochs), run.per_epoch(tags.EPOCH_VAL_TIME, epochs)
    truncated = epochs < run.epochs_done()
    rates = run.per_epoch(tags.EPOCH_TRAIN_IMAGES_PER_S, epochs)
    steady = [value for epoch, value in rates.items() if epoch > 1] or list(rates.values())
    return RunStats(
        epochs=epochs,
        train_s=sum(train.values()),
        train_excl_first_s=sum(v for e, v in train.items() if e > 1) if epochs > 1 else None,
        val_s=sum(val.values()),
        val_excl_first_s=sum(v for e, v in val.items() if e > 1) if epochs > 1 else None,
        median_step_s=_median_step(run),
        warmup_s=warmup_seconds(run),
        train_images_per_s=float(np.median(steady)) if steady else None,
        val_accuracy=run.per_epoch(tags.VAL_ACCURACY).get(epochs) if truncated else final_accuracy(run),
        breakdown=time_breakdown(run, epochs),
    )


def speedup(times_a: list[float], times_b: list[float], label_a: str, label_b: str) -> Speedup:
    """Repeat i of A against repeat i of B; the faster one is the winner of the median ratio."""
    ratios = [b / a for a, b in zip(times_a, times_b) if a > 0 and b > 0]
    if not ratios:
        raise ValueError(f"no positive times to compare for {label_a} and {label_b}")
    if statistics.median(ratios) >= 1:
        return Speedup(label_a, label_b, [100 * (r - 1) for r in ratios])
    return Speedup(label_b, label_a, [100 * (1 / r - 1) for r in ratios])


# ---------------------------------------------------------------- model FLOPs utilisation

@functools.cache  # measured once per process: every CPU run of a report shares the figure
def measure_cpu_matmul_peak(seconds: float = 2.0, size: int = 1024) -> float:
    """Best float32 matmul FLOP/s numpy reaches on this machine within `seconds`."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, size, size), dtype=np.float32)
    a @ b  # the first call pays for thread start-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def device_peak_flops(device: str, precision: str, cpu_peak: float | None = None) -> tuple[float, str] | None:
    """(peak FLOP/s, where it comes from) for a device string, or None when unknown."""
    name = device.lower()
    if name.startswith("cpu"):
        if cpu_peak is not None:
            return cpu_peak, "given CPU peak"
        if device != cpu_description():
            return None  # a peak measured here says nothing about another machine's CPU
        return measure_cpu_matmul_peak(), "numpy float32 matmul peak measured on this CPU"
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            peak = peaks.get(precision)
            return (peak * 1e12, f"datasheet dense {precision}, pattern {pattern!r}") if peak else None
    return None


def model_flops_utilisation(run: Run, images_per_s: float | None,
                            peak_override: float | None = None) -> tuple[float, str] | None:
    """(MFU, peak source): 3 x forward FLOPs per training image x images/s over the device peak."""
    if not images_per_s:
        return None
    config = run.config
    overrides = {k: config[k] for k in ("window_size",) if config.get(k) is not None}
    try:
        flops = forward_flops(config["model"], img_size=config["img_size"],
                              num_classes=config.get("num_classes") or IMAGENETTE_CLASSES, **overrides)
    except (ValueError, TypeError):
        return None
    if peak_override:
        peak = (peak_override, "--peak-tflops")
    else:
        peak = device_peak_flops(config["device"], config["precision"])
    if peak is None:
        return None
    return 3 * flops * images_per_s / peak[0], peak[1]


# ---------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}{unit}"


def _spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(values)) if values else None


def headline_rows(stats: dict[str, list[RunStats]]) -> list[tuple[str, str, str]]:
    """(comparison, including first epoch, excluding first epoch) for training and validation."""
    rows = []
    phases = (("Training", "train_s", "train_excl_first_s"), ("Validation", "val_s", "val_excl_first_s"))
    for phase, incl, excl in phases:
        for a, b in PAIRINGS:
            if a not in stats or b not in stats:
                continue
            cells = []
            for attribute in (incl, excl):
                times_a = [getattr(s, attribute) for s in stats[a]]
                times_b = [getattr(s, attribute) for s in stats[b]]
                if any(t is None for t in times_a + times_b):
                    cells.append("n/a (one epoch)")
                    continue
                try:
                    cells.append(speedup(times_a, times_b, a, b).sentence())
                except ValueError:
                    cells.append("n/a (no time recorded)")
            rows.append((f"{phase}: {a} vs {b}", *cells))
    return rows


def _group_section(group: Group, out: Path, peak_override: float | None, figures: bool) -> list[str]:
    epochs = group.common_epochs()
    stats = {variant: [run_stats(run, epochs) for run in runs] for variant, runs in group.variants.items()}
    lines = [f"## {group.title}", ""]
    if group.forced:
        lines += [f"**FORCED: not comparable: {', '.join(group.forced)}**", ""]
    lines += [f"Totals over the first {epochs} epoch(s) that every run finished; repeat i of one stack is "
              "paired with repeat i of the other.", "",
              "| comparison | including the first epoch | excluding the first epoch |", "|---|---|---|"]
    lines += [f"| {name} | {incl} | {excl} |" for name, incl, excl in headline_rows(stats)]

    lines += ["", "### Per stack (median over repeats)", "",
              "| stack | repeats | train s | train s excl. 1st | val s | val s excl. 1st | median step ms | "
              "compile/warm-up s | train img/s | MFU | val accuracy min / median / max |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    peak_notes = set()
    for variant, variant_stats in stats.items():
        rate = _median([s.train_images_per_s for s in variant_stats])
        mfu = model_flops_utilisation(group.variants[variant][0], rate, peak_override)
        if mfu:
            peak_notes.add(mfu[1])
        step_ms = _median([s.median_step_s for s in variant_stats])
        lines.append(
            f"| {variant} | {len(variant_stats)} | {_fmt(_median([s.train_s for s in variant_stats]), 2)} | "
            f"{_fmt(_median([s.train_excl_first_s for s in variant_stats]), 2)} | "
            f"{_fmt(_median([s.val_s for s in variant_stats]), 2)} | "
            f"{_fmt(_median([s.val_excl_first_s for s in variant_stats]), 2)} | "
            f"{_fmt(step_ms * 1000 if step_ms is not None else None, 1)} | "
            f"{_fmt(_median([s.warmup_s for s in variant_stats]), 2)} | {_fmt(rate, 1)} | "
            f"{_fmt(mfu[0] * 100 if mfu else None, 2, '%')} | {_spread([s.val_accuracy for s in variant_stats])} |"
        )
    lines += ["", "Compile/warm-up = first step minus the median step. MFU = 3 x analytic forward FLOPs per "
              "training image (scripts/model_flops.py) x steady-state images/s / device peak"
              + (f" ({'; '.join(sorted(peak_notes))})." if peak_notes else "; no known peak for this device.")]

    breakdowns = {variant: {part: _median([s.breakdown[part] for s in variant_stats]) or 0.0
                            for part in BREAKDOWN_PARTS}
                  for variant, variant_stats in stats.items()}
    lines += ["", "### Where the time goes (seconds and share of the run, median over repeats)", "",
              "| stack | " + " | ".join(BREAKDOWN_PARTS) + " | total |", "|---" * (len(BREAKDOWN_PARTS) + 2) + "|"]
    for variant, parts in breakdowns.items():
        fractions = shares(parts)
        cells = " | ".join(f"{parts[p]:.2f} s ({100 * fractions[p]:.0f}%)" for p in BREAKDOWN_PARTS)
        lines.append(f"| {variant} | {cells} | {sum(parts.values()):.2f} s |")
    bottleneck = {variant: max(parts, key=parts.get) for variant, parts in breakdowns.items()}
    lines += ["", "Largest part: " + "; ".join(f"{v}: {p}" for v, p in bottleneck.items()) + "."]

    if figures:
        lines += ["", "### Figures", ""] + [f"![{caption}]({path.name})" for caption, path in
                                            _write_group_figures(group, epochs, breakdowns, out)]
    return lines


def _write_group_figures(group: Group, epochs: int, breakdowns: dict[str, dict[str, float]],
                         out: Path) -> list[tuple[str, Path]]:
    figures = report_figures
    variants = group.variants
    step_times = {v: [r.series(tags.STEP_TIME) for r in runs] for v, runs in variants.items()}
    last_steps = [(r.series(tags.STEP_TIME)[0].max(initial=0), r.epochs_done()) for rs in variants.values() for r in rs]
    steps_per_epoch = int(round(max(step / max(done, 1) for step, done in last_steps))) or None
    def per_epoch(tag: str) -> dict[str, list[dict[int, float]]]:
        return {v: [r.per_epoch(tag, epochs) for r in runs] for v, runs in variants.items()}

    prefix = out / group.slug
    return [
        ("time per iteration over the first epochs",
         figures.plot_step_times(step_times, steps_per_epoch, min(5, epochs), Path(f"{prefix}_five_epoch_speed.png"))),
        ("train and validation time per epoch",
         figures.plot_epoch_times(per_epoch(tags.EPOCH_TRAIN_TIME), per_epoch(tags.EPOCH_VAL_TIME),
                                  Path(f"{prefix}_epoch_speed.png"))),
        ("throughput",
         figures.plot_throughput(per_epoch(tags.EPOCH_TRAIN_IMAGES_PER_S), per_epoch(tags.EPOCH_VAL_IMAGES_PER_S),
                                 Path(f"{prefix}_throughput.png"))),
        ("loss and accuracy",
         figures.plot_curves({v: [r.series(tags.TRAIN_LOSS) for r in runs] for v, runs in variants.items()},
                             per_epoch(tags.VAL_LOSS), per_epoch(tags.VAL_ACCURACY), Path(f"{prefix}_curves.png"))),
        ("where the time goes", figures.plot_breakdown(breakdowns, Path(f"{prefix}_time_breakdown.png"))),
    ]


def _benchmark_loads(logdir: Path) -> dict[tuple[str, str], list[float]]:
    """(stack, run name) -> host load average before and after the run, from benchmark.py's record."""
    record_path = logdir / "benchmark.json"
    if not record_path.is_file():
        return {}
    record = _read_json(record_path)
    return {(run["stack"], run["run_name"]): run["load_average_1m"]
            for run in record.get("runs", []) if "load_average_1m" in run}


def _runs_section(groups: list[Group], unpaired: list[Run], logdir: Path) -> list[str]:
    loads = _benchmark_loads(logdir)
    lines = ["## Runs", "", "| run | stack | compile | seed | epochs | device | host load before / after | "
             "versions | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    every = [run for group in groups for runs in group.variants.values() for run in runs]
    for run in every + unpaired:
        versions = ", ".join(f"{k} {v}" for k, v in sorted((run.config.get("versions") or {}).items()))
        load = loads.get((run.config["stack"], run.path.name))
        lines.append(
            f"| {run.path.relative_to(logdir) if run.path.is_relative_to(logdir) else run.path} | "
            f"{run.config['stack']} | {bool(run.config.get('compile'))} | {run.config.get('seed')} | "
            f"{run.epochs_done()} | {run.config['device']} | {' / '.join(map(str, load)) if load else 'n/a'} | "
            f"{versions or 'n/a'} | {_fmt(run.summary.get('wall_time_s'), 1)} |"
        )
    if unpaired:
        lines += ["", "Not compared (no run of the other stack with the same configuration): "
                  + ", ".join(str(run.path) for run in unpaired) + "."]
    lines += ["", "Each run's full configuration is its `config.json`. Host load: the 1-minute load average "
              f"before and after the run (benchmark.py); above {os.cpu_count()} (this machine's cores) other work "
              "competed with the run and its timings are slower than the stack can do."]
    return lines


def compare(logdir: Path, out: Path, force: bool = False, peak_tflops: float | None = None,
            figures: bool = True) -> Path:
    """Read every run under `logdir`, write report.md (and the figures) into `out`; return the report's path."""
    runs = find_runs(logdir)
    groups, unpaired = group_runs(runs, force=force)
    out.mkdir(parents=True, exist_ok=True)
    forced = [difference for group in groups for difference in group.forced]
    lines = ["# Lightning vs Flax: Swin V2 training speed", ""]
    if forced:
        lines += [f"> **FORCED: not comparable: {', '.join(forced)}**", ""]
    lines += [f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} from `{logdir}` "
              f"({len(runs)} runs). Speedups: time of the slower / time of the faster - 1, per repeat; "
              "median first, min and max over repeats in brackets (a negative one: the other stack was faster in that "
              "repeat). Timings are only as good as the machine was quiet: see the host load of each run below.", ""]
    peak_override = peak_tflops * 1e12 if peak_tflops else None
    seen_slugs: set[str] = set()
    for index, group in enumerate(groups):
        if group.slug in seen_slugs:  # the same setting on another device or dataset
            group.slug_suffix = f"-{index}"
        seen_slugs.add(group.slug)
        lines += _group_section(group, out, peak_override, figures) + [""]
    sparse = [f"{run.path} ({100 * step_coverage(run):.0f}% of steps)" for run in runs if step_coverage(run) < 1]
    if sparse:
        lines += ["Note: these traces logged time/* at only some steps; their step sums are extrapolated: "
                  + ", ".join(sparse) + ".", ""]
    lines += _runs_section(groups, unpaired, logdir)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="log folder holding <stack>/<run-name>/ runs")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/<UTC timestamp>/)")
    parser.add_argument("--force", action="store_true",
                        help="compare runs with different settings; marks the report FORCED")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU, overriding the GPU table and the CPU measurement")
    parser.add_argument("--no-figures", action="store_true", help="write report.md only (faster)")
    args = parser.parse_args(argv)
    out = args.out or Path("reports") / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        report = compare(args.runs, out, force=args.force, peak_tflops=args.peak_tflops,
                         figures=not args.no_figures)
    except NotComparableError as error:
        raise SystemExit(f"compare.py: {error}") from None
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
