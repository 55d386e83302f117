"""Read training runs from their folders and TensorBoard event files, and group comparable Lightning and Flax runs."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from shared_data import environment, run_config, tags

# Two runs are comparable only when all of these agree (seed and epochs may differ between repeats).
COMPARABLE_FIELDS = ("dataset", "model", "img_size", "batch_size", "precision", "augment", "device")
STACKS = ("lightning", "flax")
FLAX, EAGER, COMPILED = "Flax", "Lightning eager", "Lightning compiled"
VARIANT_ORDER = (FLAX, EAGER, COMPILED)


def same_device(device: str | None) -> str | None:
    """The device string with a trailing single-device count dropped: the Lightning stack writes
    'cuda: <name> x1' where the Flax stack writes 'cuda: <name>' for the same GPU."""
    return re.sub(r"\s+x1$", "", device.strip()) if isinstance(device, str) else device


class NotComparableError(Exception):
    """Runs that cannot be compared; the message is one line naming the runs and what differs."""


@dataclass(frozen=True)
class TraceProblem:
    """One tag whose event files, read in the order they were written, wrote some steps again (`duplicated`)
    or went back to a step lower than one already written (`backwards`): the marks of a resumed or restarted writer."""

    tag: str
    duplicated: tuple[int, ...]
    backwards: tuple[int, ...]


@dataclass
class Run:
    """One training run: its folder, config.json, summary.json, every scalar point of its event files (the last
    value written for a step), what was odd in those files, and benchmark.json's record of the run, if any."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    scalars: dict[str, list[tuple[int, float]]]
    trace_problems: list[TraceProblem] = field(default_factory=list)
    benchmark: dict[str, Any] = field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        """Continued with --resume at least once (both stacks then write config.resume.json beside config.json)."""
        return (self.path / "config.resume.json").is_file()

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

    def steps_per_epoch(self) -> int | None:
        """Optimiser steps in a whole epoch: config.json's, else inferred from the last logged step (older runs)."""
        if self.config.get("steps_per_epoch"):
            return int(self.config["steps_per_epoch"])
        for tag in (tags.TRAIN_LOSS, tags.STEP_TIME):
            steps, _ = self.series(tag)
            if len(steps) and self.epochs_done():
                return int(round(steps.max() / self.epochs_done())) or None
        return None

    def epoch_steps(self, epoch: int) -> int | None:
        """Optimiser steps epoch `epoch` had: a whole epoch's, fewer in a last epoch cut short by --max-steps."""
        per_epoch = self.steps_per_epoch()
        if per_epoch is None:
            return None
        limits = {"epochs": int(self.config.get("epochs") or self.epochs_done()),
                  "max_steps": self.config.get("max_steps")}
        return max(min(per_epoch, run_config.total_steps(limits, per_epoch) - (epoch - 1) * per_epoch), 0)

    def unmeasured_epochs(self, epochs: int | None = None) -> dict[int, str]:
        """Epochs (of the first `epochs`) whose speed says nothing about the stack, with why: an epoch logged with no
        training time (a resume writing again an epoch it did not train), or one whose epoch/steps_timed covers fewer
        steps than the epoch had (split by a resume). Traces without epoch/steps_timed are taken as whole."""
        reasons = {}
        rates = self.per_epoch(tags.EPOCH_TRAIN_IMAGES_PER_S, epochs)
        timed = self.per_epoch(tags.EPOCH_STEPS_TIMED, epochs)
        for epoch, seconds in sorted(self.per_epoch(tags.EPOCH_TRAIN_TIME, epochs).items()):
            had = self.epoch_steps(epoch)
            if seconds <= 0 or rates.get(epoch, 1.0) <= 0:
                reasons[epoch] = "no training time (0 s, 0 img/s): logged again by a resume that did not train it"
            elif epoch in timed and had is not None and timed[epoch] < had:
                reasons[epoch] = f"partial: {timed[epoch]:.0f} of its {had} steps timed (split by a resume)"
        return reasons

    @property
    def contended(self) -> bool:
        """benchmark.py started this run while the host load was above its core count (after waiting)."""
        return bool(self.benchmark.get("contended"))


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

    def runs(self) -> list[Run]:
        return [run for runs in self.variants.values() for run in runs]

    def vector_isas(self) -> dict[str, list[Run]]:
        """CPU vector ISA (shared_data.environment.vector_isa_of) -> the group's runs that ran on it; empty for
        runs on GPUs. More than one key marks a comparison across CPUs whose Flax/PyTorch ratio differs by design."""
        found: dict[str, list[Run]] = defaultdict(list)
        for run in self.runs():
            isa = environment.vector_isa_of(run.config.get("device"))
            if isa is not None:
                found[isa].append(run)
        return dict(found)

    def unmeasured_epochs(self) -> dict[int, list[tuple[Run, str]]]:
        """Epoch -> (run, why) for the common epochs some run cannot time (Run.unmeasured_epochs). Such an epoch is
        left out of every run's speed figures, so that all of them cover the same epochs."""
        unmeasured: dict[int, list[tuple[Run, str]]] = defaultdict(list)
        for run in self.runs():
            for epoch, reason in run.unmeasured_epochs(self.common_epochs()).items():
                unmeasured[epoch].append((run, reason))
        return dict(sorted(unmeasured.items()))

    def same_init_pairs(self) -> list[tuple[Run, Run]]:
        """(Flax run, Lightning eager run) pairs that started from the same --pretrained file with the same seed,
        so that they should train alike; each run in at most one pair."""
        pairs, free = [], list(self.variants.get(EAGER, []))
        for flax in self.variants.get(FLAX, []):
            start = (flax.config.get("pretrained"), flax.config.get("seed"))
            partner = next((eager for eager in free if start[0] is not None
                            and (eager.config.get("pretrained"), eager.config.get("seed")) == start), None)
            if partner is not None:
                free.remove(partner)
                pairs.append((flax, partner))
        return pairs


# ---------------------------------------------------------------- reading


def read_trace(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[TraceProblem]]:
    """Every scalar point (no reservoir sampling) of the event files directly in `run_dir`, by tag, sorted by step,
    and the tags whose steps were written twice or went backwards (the last value written for a step is kept)."""
    # No purging: TensorBoard would silently drop the points a restarted writer went back over.
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0}, purge_orphaned_data=False)
    accumulator.Reload()
    available = accumulator.Tags()
    written: dict[str, list[tuple[float, int, float]]] = defaultdict(list)  # (wall time, step, value) in file order
    for tag in available.get("scalars", []):
        written[tag] += [(event.wall_time, event.step, float(event.value)) for event in accumulator.Scalars(tag)]
    # Writers on the TF2 summary API store scalars as rank-0 tensors.
    for tag in available.get("tensors", []):
        for event in accumulator.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.size == 1 and np.issubdtype(value.dtype, np.number):
                written[tag].append((event.wall_time, event.step, float(value.reshape(()))))
    scalars, problems = {}, []
    for tag, events in written.items():
        by_step: dict[int, float] = {}
        duplicated, backwards, highest = set(), set(), None
        for _, step, value in sorted(events, key=lambda event: event[0]):  # stable: file order breaks ties
            if step in by_step:
                duplicated.add(step)
            elif highest is not None and step < highest:
                backwards.add(step)
            by_step[step] = value
            highest = step if highest is None else max(highest, step)
        scalars[tag] = sorted(by_step.items())
        if duplicated or backwards:
            problems.append(TraceProblem(tag, tuple(sorted(duplicated)), tuple(sorted(backwards))))
    return scalars, problems


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file the runs left behind; NotComparableError (one line, naming the file) when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise NotComparableError(f"{path}: cannot read JSON ({error}); re-run that training run") from None


def read_run(run_dir: Path, benchmark: dict[str, Any] | None = None) -> Run:
    """Load one run folder `<logdir>/<stack>/<run-name>/`; `benchmark` is benchmark.py's record of it."""
    config = read_json(run_dir / "config.json")
    missing = [name for name in ("stack", *COMPARABLE_FIELDS) if name not in config]
    if missing:
        raise NotComparableError(
            f"{run_dir / 'config.json'}: missing {', '.join(missing)}; was it written by a training script?")
    if config["stack"] not in STACKS:
        raise NotComparableError(
            f"{run_dir / 'config.json'}: unknown stack {config['stack']!r}; expected one of {STACKS}")
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else {}
    scalars, problems = read_trace(run_dir)
    if not scalars.get(tags.EPOCH_TRAIN_TIME):
        raise NotComparableError(
            f"{run_dir}: no {tags.EPOCH_TRAIN_TIME} points in its event files; did the run finish an epoch?")
    return Run(run_dir, config, summary, scalars, problems, benchmark or {})


def read_benchmark_record(logdir: Path) -> dict[str, Any]:
    """benchmark.json of a benchmark's log folder ({} when the runs were not started by benchmark.py)."""
    path = logdir / "benchmark.json"
    return read_json(path) if path.is_file() else {}


def find_runs(logdir: Path) -> list[Run]:
    """Every run folder under `logdir` (config.json in `.../<stack>/<run-name>/`), checkpoints skipped."""
    if not logdir.is_dir():
        raise NotComparableError(
            f"--runs {logdir}: no such folder; run scripts/benchmark.py or point --runs at a log folder")
    folders = sorted(
        path.parent for path in logdir.rglob("config.json")
        if path.parent.parent.name in STACKS and "checkpoints" not in path.relative_to(logdir).parts
    )
    recorded = {logdir / run["stack"] / run["run_name"]: run for run in read_benchmark_record(logdir).get("runs", [])}
    return [read_run(folder, recorded.get(folder)) for folder in folders]


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
