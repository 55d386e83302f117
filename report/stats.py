"""Timing figures of runs: medians, time breakdown, per-run totals, speedups, model FLOPs utilisation."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Collection

import numpy as np

from report.flops import forward_flops
from report.peaks import device_peak_flops
from report.runs import Run
from shared_data import tags

BREAKDOWN_PARTS = (
    "data wait", "compute", "evaluation", "checkpoint", "compilation", "logging/other", "startup/teardown",
)
IMAGENETTE_CLASSES = 10
# Each stack's own matmul kernels set its CPU peak.
FRAMEWORK_OF_STACK = {"lightning": "torch", "flax": "jax"}
# The "same training" check: from the same initial weights, without drop path or dropout, the two stacks' training
# losses agree to the bound of their precision over the first steps both logged. float32: the stacks compute the
# same function and differ by rounding only (measured 0.00076 on the smoke preset). bf16 (shared_data.tags): the
# same tensors are bf16 in both, but a few roundings differ (the bias of a linear, XLA's fused excess precision),
# which the 8-bit mantissa makes visible (tests/test_precision.py).
SAME_TRAINING_STEPS = 50
SAME_TRAINING_BOUNDS = {"fp32": 1e-3, "bf16": 1e-2}
# Below this advantage a speedup reads better as a percent ("4% faster") than as a ratio ("1.04x faster").
PERCENT_BELOW = 1.10


@dataclass
class RunStats:
    """The timing figures of one run over its first `epochs` epochs, less the epochs `left_out`."""

    epochs: int
    left_out: tuple[int, ...]
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
    """How much faster `faster` is than `slower`, once per repeat: slower's time / faster's time (a ratio below 1:
    the other was faster in that repeat)."""

    faster: str
    slower: str
    ratios: list[float]

    def sentence(self) -> str:
        middle = statistics.median(self.ratios)
        repeats = len(self.ratios)
        if round(100 * (middle - 1)) == 0:
            return f"{self.faster} and {self.slower} take the same time (within 0.5%, {repeats} repeat(s))"
        # One unit for the median and its spread: a percent while the advantage is small, else a ratio.
        percent = middle < PERCENT_BELOW
        spread = (f"min {_advantage(min(self.ratios), percent)}, max {_advantage(max(self.ratios), percent)}; "
                  if repeats > 1 else "")
        return (f"{self.faster} is {_advantage(middle, percent)} faster than {self.slower} "
                f"({spread}{repeats} repeat{'s' if repeats > 1 else ''})")


def _advantage(ratio: float, percent: bool) -> str:
    """1.04 -> '4%' (percent) or '1.04x'."""
    return f"{100 * (ratio - 1):.0f}%" if percent else f"{ratio:.2f}x"


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
    """Validation accuracy at the end of the run (a fraction), from summary.json or else the last epoch's point."""
    if run.summary.get("final_val_accuracy") is not None:
        return float(run.summary["final_val_accuracy"])
    accuracy = run.per_epoch(tags.VAL_ACCURACY)
    return accuracy[max(accuracy)] if accuracy else None


def measured_epochs(run: Run, tag: str, epochs: int | None = None,
                    left_out: Collection[int] = ()) -> dict[int, float]:
    """The run's per-epoch values of `tag` over its first `epochs` epochs, without the epochs `left_out`."""
    return {epoch: value for epoch, value in run.per_epoch(tag, epochs).items() if epoch not in left_out}


def run_stats(run: Run, epochs: int | None = None, left_out: Collection[int] | None = None) -> RunStats:
    """Totals over the first `epochs` epochs (all by default), with and without the first epoch, leaving out the
    epochs `left_out` (by default the run's own partial and phantom epochs: see Run.unmeasured_epochs)."""
    epochs = epochs or run.epochs_done()
    left_out = tuple(sorted(run.unmeasured_epochs(epochs) if left_out is None else left_out))
    train = measured_epochs(run, tags.EPOCH_TRAIN_TIME, epochs, left_out)
    val = measured_epochs(run, tags.EPOCH_VAL_TIME, epochs, left_out)
    truncated = epochs < run.epochs_done()
    rates = measured_epochs(run, tags.EPOCH_TRAIN_IMAGES_PER_S, epochs, left_out)
    steady = [value for epoch, value in rates.items() if epoch > 1] or list(rates.values())
    return RunStats(
        epochs=epochs,
        left_out=left_out,
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


# ---------------------------------------------------------------- across repeats


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the values that are neither None nor NaN; None when no value is left."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(values)) if values else None


def speedup(times_a: list[float], times_b: list[float], label_a: str, label_b: str) -> Speedup:
    """Repeat i of A against repeat i of B; the faster one is the winner of the median ratio."""
    ratios = [b / a for a, b in zip(times_a, times_b) if a > 0 and b > 0]
    if not ratios:
        raise ValueError(f"no positive times to compare for {label_a} and {label_b}")
    if statistics.median(ratios) >= 1:
        return Speedup(label_a, label_b, ratios)
    return Speedup(label_b, label_a, [1 / r for r in ratios])


def loss_difference(a: Run, b: Run, steps: int = SAME_TRAINING_STEPS) -> tuple[float | None, list[int]]:
    """(largest |train/loss of a - train/loss of b|, the steps compared): the first `steps` steps both runs logged;
    (None, []) when they share no step."""
    loss_a, loss_b = dict(a.scalars.get(tags.TRAIN_LOSS, [])), dict(b.scalars.get(tags.TRAIN_LOSS, []))
    common = sorted(loss_a.keys() & loss_b.keys())[:steps]
    if not common:
        return None, []
    return max(abs(loss_a[step] - loss_b[step]) for step in common), common


# ---------------------------------------------------------------- model FLOPs utilisation


def model_flops_utilisation(run: Run, images_per_s: float | None,
                            peak_override: float | None = None) -> tuple[float, str] | None:
    """(MFU as a fraction, peak source): 3 x forward FLOPs per training image x images/s over the device peak.

    `peak_override` (FLOP/s) replaces the device's table or measured peak; None when either figure is unknown.
    A fraction above 1 means the peak was underestimated, never that the run beat the device.
    """
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
        peak = (peak_override, f"--peak-tflops {peak_override / 1e12:g}")
    else:
        peak = device_peak_flops(config["device"], config["precision"],
                                 framework=FRAMEWORK_OF_STACK.get(config["stack"], "torch"))
    if peak is None:
        return None
    return 3 * flops * images_per_s / peak[0], peak[1]
