"""The report's PNG figures: times, throughput, curves, breakdown, operations, same training, how the cost grows."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: the report is written on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator, ScalarFormatter  # noqa: E402

# One colour per variant everywhere, so a reader can match figures at a glance.
VARIANT_COLOURS = {"Flax": "tab:blue", "Lightning eager": "tab:orange", "Lightning compiled": "tab:red"}
BREAKDOWN_COLOURS = {
    "data wait": "tab:gray",
    "compute": "tab:blue",
    "evaluation": "tab:green",
    "checkpoint": "tab:purple",
    "compilation": "tab:red",
    "logging/other": "tab:olive",
    "startup/teardown": "tab:cyan",
}

# label -> one (x, y) series per repeat
Series = Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]
# label -> one {epoch: value} per repeat
EpochValues = Mapping[str, Sequence[Mapping[int, float]]]


def _colour(label: str) -> str | None:
    return VARIANT_COLOURS.get(label)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_step_times(step_times: Series, steps_per_epoch: int | None, epochs: int, path: Path) -> Path:
    """Seconds per training iteration over the first `epochs` epochs (log scale: the first step dwarfs the rest)."""
    figure, axes = plt.subplots(figsize=(9, 4.5))
    last_step = steps_per_epoch * epochs if steps_per_epoch else None
    for label, repeats in step_times.items():
        for repeat, (steps, seconds) in enumerate(repeats):
            keep = steps <= last_step if last_step else slice(None)
            axes.plot(steps[keep], seconds[keep], color=_colour(label), lw=0.8, alpha=0.8,
                      label=label if repeat == 0 else None)
    if steps_per_epoch:
        for epoch in range(1, epochs):
            axes.axvline(epoch * steps_per_epoch + 0.5, color="k", lw=0.5, ls=":")
    axes.set_yscale("log")
    axes.set_xlabel("global step (dotted lines: epoch ends)")
    axes.set_ylabel("seconds per iteration")
    axes.set_title(f"Time per iteration over the first {epochs} epochs")
    axes.legend()
    return _save(figure, path)


def _grouped_bars(axes: plt.Axes, values: EpochValues, title: str, ylabel: str) -> None:
    """Bars per epoch, one per variant side by side, at the median over repeats with min-max whiskers."""
    labels = list(values)
    epochs = sorted({epoch for repeats in values.values() for repeat in repeats for epoch in repeat})
    width = 0.8 / max(len(labels), 1)
    for offset, label in enumerate(labels):
        medians, low, high = [], [], []
        for epoch in epochs:
            samples = [repeat[epoch] for repeat in values[label] if epoch in repeat]
            median = float(np.median(samples)) if samples else np.nan
            medians.append(median)
            low.append(median - min(samples) if samples else 0.0)
            high.append(max(samples) - median if samples else 0.0)
        positions = np.arange(len(epochs)) + (offset - (len(labels) - 1) / 2) * width
        axes.bar(positions, medians, width, yerr=[low, high], capsize=2, color=_colour(label), label=label)
    axes.set_xticks(np.arange(len(epochs)), [str(epoch) for epoch in epochs])
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend()


def plot_epoch_times(train: EpochValues, val: EpochValues, path: Path) -> Path:
    """Training and validation seconds per epoch, the variants side by side."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    _grouped_bars(left, train, "Training time per epoch", "seconds")
    _grouped_bars(right, val, "Validation time per epoch", "seconds")
    return _save(figure, path)


def plot_throughput(train: EpochValues, val: EpochValues, path: Path) -> Path:
    """Training and validation images per second per epoch."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    _grouped_bars(left, train, "Training throughput", "images / s")
    _grouped_bars(right, val, "Validation throughput", "images / s")
    return _save(figure, path)


def plot_curves(train_loss: Series, val_loss: EpochValues, val_accuracy: EpochValues, path: Path) -> Path:
    """Loss and accuracy curves, a sanity check that both stacks learn alike."""
    figure, (loss_axes, val_axes, accuracy_axes) = plt.subplots(1, 3, figsize=(14, 4.2))
    for label, repeats in train_loss.items():
        for repeat, (steps, loss) in enumerate(repeats):
            loss_axes.plot(steps, loss, color=_colour(label), lw=0.8, alpha=0.7, label=label if repeat == 0 else None)
    for axes, values in ((val_axes, val_loss), (accuracy_axes, val_accuracy)):
        for label, repeats in values.items():
            for repeat, per_epoch in enumerate(repeats):
                epochs = sorted(per_epoch)
                axes.plot(epochs, [per_epoch[e] for e in epochs], marker="o", color=_colour(label),
                          label=label if repeat == 0 else None)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set(xlabel="global step", ylabel="loss", title="Training loss")
    val_axes.set(ylabel="loss", title="Validation loss")
    accuracy_axes.set(ylabel="top-1 accuracy", title="Validation accuracy")
    for axes in (loss_axes, val_axes, accuracy_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    return _save(figure, path)


def _stacked_bars(values: Mapping[str, Mapping[str, float]], colours: Mapping[str, str], xlabel: str, title: str,
                  path: Path) -> Path:
    """One stacked horizontal bar per label of `values` (label -> part -> amount), parts in `colours`' order;
    parts that are zero everywhere are left out of the legend."""
    figure, axes = plt.subplots(figsize=(10, 1.5 + 0.6 * len(values)))
    labels = list(values)
    left = np.zeros(len(labels))
    for part, colour in colours.items():
        amounts = np.array([values[label].get(part, 0.0) for label in labels])
        if not amounts.any():
            continue
        axes.barh(labels, amounts, left=left, color=colour, label=part)
        left += amounts
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _save(figure, path)


def plot_breakdown(breakdowns: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Stacked horizontal bar per variant of where its run's seconds went."""
    return _stacked_bars(breakdowns, BREAKDOWN_COLOURS, "seconds (median over repeats)", "Where the time goes", path)


OPERATION_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray")


def plot_operations(kinds: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Stacked horizontal bar per variant of its step's operation time by kind (seconds per step, shown in ms)."""
    milliseconds = {label: {kind: 1000 * seconds for kind, seconds in parts.items()} for label, parts in kinds.items()}
    colours = dict(zip(next(iter(kinds.values())), OPERATION_COLOURS))
    return _stacked_bars(milliseconds, colours, "ms of operation self time per step",
                         "Inside the step: time per kind of operation", path)


def plot_same_training(losses: Mapping[str, tuple[np.ndarray, np.ndarray]], compared_steps: int,
                       bound: float | None, path: Path) -> Path:
    """Two runs started from the same weights: their training losses, and the absolute difference per common step
    against `bound` (None: no bound line) over the first `compared_steps` common steps."""
    figure, (loss_axes, difference_axes) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, (steps, loss) in losses.items():
        loss_axes.plot(steps, loss, color=_colour(label), lw=0.9, alpha=0.8, label=label)
    (steps_a, loss_a), (steps_b, loss_b) = losses.values()
    common, at_a, at_b = np.intersect1d(steps_a, steps_b, return_indices=True)
    difference = np.abs(loss_a[at_a] - loss_b[at_b])
    shown = difference > 0  # a log axis cannot show an exact match
    difference_axes.plot(common[shown], difference[shown], color="k", lw=0.8, marker=".", ms=3)
    if bound is not None:
        difference_axes.axhline(bound, color="tab:red", ls="--", lw=0.8,
                                label=f"bound {bound:.0e}".replace("e-0", "e-"))
    if len(common) > compared_steps:
        difference_axes.axvline(common[compared_steps - 1] + 0.5, color="k", ls=":", lw=0.5,
                                label=f"first {compared_steps} common steps")
    difference_axes.set_yscale("log")
    loss_axes.set(xlabel="global step", ylabel="training loss", title="Training loss from the same initial weights")
    difference_axes.set(xlabel="global step", ylabel="|difference|", title="Absolute difference of the losses")
    for axes in (loss_axes, difference_axes):
        axes.legend()
    return _save(figure, path)


def plot_growth(points: Mapping[str, Sequence[tuple[int, float | None, float | None]]], memory_label: str,
                path: Path) -> Path:
    """How the cost grows: per label (variant, and image size where several), train images/s and peak memory (MiB)
    against the batch size, from (batch size, images/s, memory) points."""
    figure, (rate_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, rows in points.items():
        rows = sorted(rows)
        variant = label.split(",")[0]
        for axes, index in ((rate_axes, 1), (memory_axes, 2)):
            shown = [(row[0], row[index]) for row in rows if row[index] is not None]
            if shown:
                axes.plot(*zip(*shown), marker="o", color=_colour(variant), label=label,
                          ls="-" if label == variant else "--")
    rate_axes.set(xlabel="global batch", ylabel="train images/s", title="Throughput against batch size")
    memory_axes.set(xlabel="global batch", ylabel=f"{memory_label} MiB", title="Peak memory against batch size")
    for axes in (rate_axes, memory_axes):
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_locator(FixedLocator(sorted({p[0] for r in points.values() for p in r})))
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.set_ylim(bottom=0)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        else:
            axes.text(0.5, 0.5, "not recorded", transform=axes.transAxes, ha="center")
    return _save(figure, path)
