"""Compare Lightning and Flax runs from their traces and profiles: speedups, breakdowns, MFU, operations, figures."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
from pathlib import Path

from report import plots
from report.runs import (
    COMPILED, EAGER, FLAX, Group, NotComparableError, Run, TraceProblem, find_runs, group_runs, read_benchmark_record,
)
from report.stats import (
    BREAKDOWN_PARTS, SAME_TRAINING_BOUNDS, SAME_TRAINING_STEPS, RunStats, loss_difference, measured_epochs,
    median_or_none, model_flops_utilisation, run_stats, shares, speedup, step_coverage,
)
from shared_data import op_profile, tags

# (faster candidate, other): the comparisons the report makes when both variants ran.
PAIRINGS = ((FLAX, EAGER), (FLAX, COMPILED), (COMPILED, EAGER))
# Marks, in every table, a run benchmark.py started while other work loaded the machine (and a variant holding one).
CONTENDED = " †"
MIXED_ISAS = "MIXED CPU VECTOR ISAS"  # heads the note on a comparison whose runs ran on CPUs of different ISAs
COMPILE_CACHES = {
    "cold": "cold (fresh per run): every run started with empty TorchInductor, Triton and JAX cache folders of its own",
    "warm": "warm: every run shared one set of TorchInductor, Triton and JAX cache folders, kept from run to run, so "
            "later runs can reuse what earlier ones compiled",
}


def _fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}{unit}"


def _spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def _mark(variant: str, runs: list[Run]) -> str:
    """The variant's name, marked when any of its runs was started under contention."""
    return variant + (CONTENDED if any(run.contended for run in runs) else "")


def _contention_note(runs: list[Run]) -> list[str]:
    """The footnote every table with a marked row carries."""
    contended = [run for run in runs if run.contended]
    if not contended:
        return []
    cores = contended[0].benchmark.get("cores", "the")
    return ["", f"{CONTENDED.strip()} Started under contention: the host's 1-minute load was still above its {cores} "
            "cores when benchmark.py started the run (after waiting up to --max-wait-s for it to fall), so its timings "
            "are slower than the stack can do: " + ", ".join(f"`{_run_label(run)}`" for run in contended) + "."]


def _run_label(run: Run) -> str:
    return f"{run.path.parent.name}/{run.path.name}"


def _mfu_cell(fraction: float | None) -> str:
    """An MFU above 100% is no figure: the peak it was divided by is too low."""
    if fraction is None:
        return "n/a"
    return "peak underestimated" if fraction > 1 else f"{100 * fraction:.2f}%"


def headline_rows(stats: dict[str, list[RunStats]],
                  names: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(comparison, including first epoch, excluding first epoch) for training and validation; `names` labels the
    variants in the first column (a contention mark), their plain names by default."""
    names = names or {}
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
            rows.append((f"{phase}: {names.get(a, a)} vs {names.get(b, b)}", *cells))
    return rows


def _group_section(group: Group, out: Path, peak_override: float | None, figures: bool) -> list[str]:
    epochs = group.common_epochs()
    left_out = group.unmeasured_epochs()
    stats = {variant: [run_stats(run, epochs, set(left_out)) for run in runs]
             for variant, runs in group.variants.items()}
    names = {variant: _mark(variant, runs) for variant, runs in group.variants.items()}
    lines = [f"## {group.title}", ""]
    if group.forced:
        lines += [f"**FORCED: not comparable: {', '.join(group.forced)}**", ""]
    isas = group.vector_isas()
    if len(isas) > 1:
        lines += [f"**{MIXED_ISAS}: these runs come from CPUs of different vector instruction sets ("
                  + "; ".join(f"{isa}: " + ", ".join(f"`{_run_label(run)}`" for run in runs)
                              for isa, runs in sorted(isas.items()))
                  + "). The Flax/PyTorch speed ratio on a CPU changes with the ISA (XLA's CPU kernels use AVX-512, "
                  "torch's mostly do not), so these ratios do not describe one machine.**", ""]
    kept = f", less epoch(s) {', '.join(map(str, left_out))}" if left_out else ""
    lines += [f"Totals over the first {epochs} epoch(s) that every run finished{kept}; repeat i of one stack is "
              "paired with repeat i of the other.", ""]
    if left_out:
        lines += ["Left out of the speed figures (of every run, so that all totals cover the same epochs): "
                  + "; ".join(f"`{_run_label(run)}` epoch {epoch} ({reason})"
                              for epoch, reasons in left_out.items() for run, reason in reasons) + ".", ""]
    lines += ["| comparison | including the first epoch | excluding the first epoch |", "|---|---|---|"]
    lines += [f"| {name} | {incl} | {excl} |" for name, incl, excl in headline_rows(stats, names)]

    lines += ["", "### Per stack (median over repeats)", "",
              "| stack | repeats | train s | train s excl. 1st | val s | val s excl. 1st | median step ms | "
              "compile/warm-up s | train img/s | MFU | val accuracy min / median / max |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    peak_sources: dict[str, list[str]] = {}
    underestimated = []
    for variant, variant_stats in stats.items():
        rate = median_or_none([s.train_images_per_s for s in variant_stats])
        mfu = model_flops_utilisation(group.variants[variant][0], rate, peak_override)
        if mfu:
            peak_sources.setdefault(mfu[1], []).append(variant)
            if mfu[0] > 1:
                underestimated.append(variant)
        step_ms = median_or_none([s.median_step_s for s in variant_stats])
        lines.append(
            f"| {names[variant]} | {len(variant_stats)} | "
            f"{_fmt(median_or_none([s.train_s for s in variant_stats]), 2)} | "
            f"{_fmt(median_or_none([s.train_excl_first_s for s in variant_stats]), 2)} | "
            f"{_fmt(median_or_none([s.val_s for s in variant_stats]), 2)} | "
            f"{_fmt(median_or_none([s.val_excl_first_s for s in variant_stats]), 2)} | "
            f"{_fmt(step_ms * 1000 if step_ms is not None else None, 1)} | "
            f"{_fmt(median_or_none([s.warmup_s for s in variant_stats]), 2)} | {_fmt(rate, 1)} | "
            f"{_mfu_cell(mfu[0] if mfu else None)} | {_spread([s.val_accuracy for s in variant_stats])} |"
        )
    lines += ["", "Compile/warm-up = first step minus the median step. MFU = 3 x analytic forward FLOPs per "
              "training image (scripts/model_flops.py) x steady-state images/s / device peak"
              + (". Peak: " + "; ".join(f"{', '.join(variants)}: {source}" for source, variants in peak_sources.items())
                 + "." if peak_sources else "; no known peak for this device.")]
    if underestimated:
        lines += ["", f"Peak underestimated for {', '.join(underestimated)}: the run's images/s imply more than 100% "
                  "of that peak, so the peak figure is too low (a matmul slower than the kernels the stack really "
                  "runs); no MFU is given for it."]

    breakdowns = {variant: {part: median_or_none([s.breakdown[part] for s in variant_stats]) or 0.0
                            for part in BREAKDOWN_PARTS}
                  for variant, variant_stats in stats.items()}
    lines += ["", "### Where the time goes (seconds and share of the run, median over repeats)", "",
              "| stack | " + " | ".join(BREAKDOWN_PARTS) + " | total |", "|---" * (len(BREAKDOWN_PARTS) + 2) + "|"]
    for variant, parts in breakdowns.items():
        fractions = shares(parts)
        cells = " | ".join(f"{parts[p]:.2f} s ({100 * fractions[p]:.0f}%)" for p in BREAKDOWN_PARTS)
        lines.append(f"| {names[variant]} | {cells} | {sum(parts.values()):.2f} s |")
    bottleneck = {variant: max(parts, key=parts.get) for variant, parts in breakdowns.items()}
    lines += ["", "Largest part: " + "; ".join(f"{v}: {p}" for v, p in bottleneck.items()) + "."]
    lines += _contention_note(group.runs())

    lines += _operations_section(group, Path(f"{out / group.slug}_operations.png"), figures)
    for index, (flax, eager) in enumerate(group.same_init_pairs()):
        lines += _same_training_section(flax, eager, Path(f"{out / group.slug}_same_training{index or ''}.png"),
                                        figures)
    if figures:
        lines += ["", "### Figures", ""] + [f"![{caption}]({path.name})" for caption, path in
                                            _write_group_figures(group, epochs, set(left_out), breakdowns, out)]
    return lines


TOP_OPERATIONS = 8


def _operations_section(group: Group, figure: Path, figures: bool) -> list[str]:
    """Inside the step, from each variant's first run with a profile (--profile-steps, ops.json): milliseconds per
    step of each kind of operation, the kinds that make the difference, the top operations by self time."""
    profiles = {}
    for variant, runs in group.variants.items():
        for run in runs:
            try:
                profile = op_profile.read_ops(run.path / "profile")
            except ValueError as error:
                raise SystemExit(f"compare.py: {error}") from None
            if profile is not None:
                profiles[variant] = (run, profile)
                break
    if not profiles:
        return []
    kinds = {variant: op_profile.by_kind(profile["ops"]) for variant, (_, profile) in profiles.items()}
    names = list(profiles)
    lines = ["", "### Inside the step (per-operation profiles)", "",
             "Self time of each operation in the profiled steps, per step, summed by kind: each stack's own profiler "
             "(jax.profiler: XLA's operations, fusions named by what they compute; torch.profiler: aten operations). "
             "Clock: " + "; ".join(f"{variant}: steps {profile['first_step']}-{profile['last_step']} of "
                                   f"`{_run_label(run)}`, {_clock_text(profile['clock'])}"
                                   for variant, (run, profile) in profiles.items()) + ".", "",
             "| kind | " + " | ".join(f"{name} ms/step" for name in names) + " |", "|---" * (len(names) + 1) + "|"]
    totals = {variant: sum(values.values()) for variant, values in kinds.items()}
    for kind in op_profile.KINDS:
        cells = " | ".join(f"{1000 * kinds[v][kind]:.1f} ({100 * kinds[v][kind] / (totals[v] or 1):.0f}%)"
                           for v in names)
        lines.append(f"| {kind} | {cells} |")
    lines.append("| **total** | " + " | ".join(f"**{1000 * totals[v]:.1f}**" for v in names) + " |")
    if FLAX in kinds and len(kinds) > 1:
        other = EAGER if EAGER in kinds else next(v for v in names if v != FLAX)
        differences = sorted(((kinds[FLAX][k] - kinds[other][k], k) for k in op_profile.KINDS),
                             key=lambda item: abs(item[0]), reverse=True)
        said = [f"{kind} {1000 * abs(diff):.1f} ms {'more' if diff > 0 else 'less'}"
                for diff, kind in differences[:3] if abs(diff) > 0.0005]
        lines += ["", f"Against {other}, {FLAX} spends " + ", ".join(said) + " per step." if said else
                  f"Against {other}, no kind differs by more than 0.5 ms per step."]
    for variant, (_, profile) in profiles.items():
        lines += ["", f"Top operations of {variant} by self time:", "", "| operation | kind | calls/step | ms/step |",
                  "|---|---|---|---|"]
        lines += [f"| `{op.name}`{f' `{op.detail}`' if op.detail else ''} | {op.kind} | {op.calls:g} | "
                  f"{1000 * op.self_s:.2f} |"
                  for op in profile["ops"][:TOP_OPERATIONS]]
    if figures:
        path = plots.plot_operations({v: kinds[v] for v in names}, figure)
        lines += ["", f"![time per kind of operation]({path.name})"]
    return lines


def _clock_text(clock: str) -> str:
    return ("kernel time on the device" if clock == "device"
            else "host CPU time, summed over the threads XLA or torch computed with")


def _same_training_section(flax: Run, eager: Run, figure: Path, figures: bool) -> list[str]:
    """Two runs from the same initial weights: their loss difference against the bound, accuracies, loss curves."""
    largest, steps = loss_difference(flax, eager)
    config = flax.config
    lines = ["", "### Same training", "",
             f"`{_run_label(flax)}` and `{_run_label(eager)}` started from the same weights "
             f"(`{config['pretrained']}`) with seed {config.get('seed')}, so they should train alike."]
    if largest is None:
        return lines + ["", f"They share no {tags.TRAIN_LOSS} step: nothing to compare."]
    precision = config.get("precision", "fp32")
    bound = SAME_TRAINING_BOUNDS.get(precision)
    if bound is None:
        verdict = f"no bound for precision {precision}"
    elif config.get("drop_path"):
        verdict = f"not applicable (drop path {config['drop_path']}; the bound is for runs without drop path)"
    else:
        verdict = "holds" if largest <= bound else "does not hold"
    lines += ["", f"Largest absolute difference of `{tags.TRAIN_LOSS}` over the first {len(steps)} common steps "
              f"({steps[0]}-{steps[-1]}): {largest:.3g}. Bound in {precision} {_bound_text(bound)} over the first "
              f"{SAME_TRAINING_STEPS} common steps (without drop path or dropout, where two stacks that train alike "
              f"stay within it): {verdict}."]
    if figures:
        plots.plot_same_training({FLAX: flax.series(tags.TRAIN_LOSS), EAGER: eager.series(tags.TRAIN_LOSS)},
                                 SAME_TRAINING_STEPS, bound, figure)
        lines += ["", f"![same training: both loss curves and their difference against the bound]({figure.name})"]
    lines += ["", f"| epoch | {FLAX} val accuracy | {EAGER} val accuracy | difference |", "|---|---|---|---|"]
    accuracy_flax, accuracy_eager = flax.per_epoch(tags.VAL_ACCURACY), eager.per_epoch(tags.VAL_ACCURACY)
    for epoch in sorted(accuracy_flax.keys() | accuracy_eager.keys()):
        a, b = accuracy_flax.get(epoch), accuracy_eager.get(epoch)
        lines.append(f"| {epoch} | {_fmt(a, 4)} | {_fmt(b, 4)} | {_fmt(a - b if None not in (a, b) else None, 4)} |")
    return lines


def _bound_text(bound: float | None) -> str:
    """1e-3, not Python's 1e-03."""
    return "none" if bound is None else format(bound, ".0e").replace("e-0", "e-")


def _write_group_figures(group: Group, epochs: int, left_out: set[int], breakdowns: dict[str, dict[str, float]],
                         out: Path) -> list[tuple[str, Path]]:
    variants = group.variants
    step_times = {v: [r.series(tags.STEP_TIME) for r in runs] for v, runs in variants.items()}
    steps_per_epoch = max((run.steps_per_epoch() or 0 for run in group.runs()), default=0) or None

    def per_epoch(tag: str, skipped: set[int] = frozenset()) -> dict[str, list[dict[int, float]]]:
        return {v: [measured_epochs(r, tag, epochs, skipped) for r in runs] for v, runs in variants.items()}

    prefix = out / group.slug
    return [
        ("time per iteration over the first epochs",
         plots.plot_step_times(step_times, steps_per_epoch, min(5, epochs), Path(f"{prefix}_five_epoch_speed.png"))),
        ("train and validation time per epoch",
         plots.plot_epoch_times(per_epoch(tags.EPOCH_TRAIN_TIME, left_out), per_epoch(tags.EPOCH_VAL_TIME, left_out),
                                Path(f"{prefix}_epoch_speed.png"))),
        ("throughput",
         plots.plot_throughput(per_epoch(tags.EPOCH_TRAIN_IMAGES_PER_S, left_out),
                               per_epoch(tags.EPOCH_VAL_IMAGES_PER_S, left_out), Path(f"{prefix}_throughput.png"))),
        ("loss and accuracy",
         plots.plot_curves({v: [r.series(tags.TRAIN_LOSS) for r in runs] for v, runs in variants.items()},
                           per_epoch(tags.VAL_LOSS), per_epoch(tags.VAL_ACCURACY),
                           Path(f"{prefix}_curves.png"))),
        ("where the time goes", plots.plot_breakdown(breakdowns, Path(f"{prefix}_time_breakdown.png"))),
    ]


def _steps_text(steps: tuple[int, ...]) -> str:
    """(3, 9, 10, 11) -> '3, 9-11'."""
    ranges: list[list[int]] = []
    for step in steps:
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


def _problem_text(problems: list[TraceProblem]) -> str:
    """One run's trace problems, tags with the same steps named together."""
    by_steps: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for problem in problems:
        by_steps.setdefault((problem.duplicated, problem.backwards), []).append(f"`{problem.tag}`")
    parts = []
    for (duplicated, backwards), tag_names in by_steps.items():
        kinds = ([f"step(s) {_steps_text(duplicated)} written more than once (the last value kept)"] if duplicated
                 else []) + ([f"step(s) {_steps_text(backwards)} written after a higher step"] if backwards else [])
        parts.append(f"{' and '.join(kinds)} in {', '.join(tag_names)}")
    return "; ".join(parts)


def _trace_problems_section(runs: list[Run]) -> list[str]:
    """Steps the event files wrote twice or went back to: the trace of a resumed or restarted writer."""
    troubled = [run for run in runs if run.trace_problems]
    if not troubled:
        return []
    lines = ["## Trace problems", "",
             "These event files, read in the order they were written, wrote some steps again or went back to a lower "
             "step (a resumed or restarted run). The report keeps the last value written for each step, and leaves "
             "the epochs whose time is partial or zero out of the speed figures (named in each section above).", ""]
    lines += [f"- `{_run_label(run)}`: {_problem_text(run.trace_problems)}." for run in troubled]
    return lines + [""]


def _peak_memory(run: Run) -> tuple[float | None, float | None]:
    """(host, device) peak MiB of a run over its epochs; device None where the device reports no memory."""
    host, device = (max(run.per_epoch(tag).values(), default=None) for tag in (tags.HOST_PEAK_MB, tags.DEVICE_PEAK_MB))
    return host, device


def _growth_section(groups: list[Group], out: Path, figures: bool) -> list[str]:
    """"How the cost grows": for groups that differ only in batch size or image size, per stack and setting, train
    images/s, median step time and peak memory (device where it reports it, else host), and their figure."""
    families: dict[tuple, list[Group]] = {}
    for group in groups:
        key = tuple(sorted((k, str(v)) for k, v in group.key.items() if k not in ("batch_size", "img_size")))
        families.setdefault(key, []).append(group)
    lines = []
    for index, family in enumerate(families.values()):
        settings = {(group.key["img_size"], group.key["batch_size"]) for group in family}
        if len(settings) < 2:
            continue
        family.sort(key=lambda group: (group.key["img_size"], group.key["batch_size"]))
        image_sizes = {size for size, _ in settings}
        on_device = any(_peak_memory(run)[1] is not None for group in family for run in group.runs())
        memory = "device" if on_device else "host"
        first = family[0].key
        lines += ["## How the cost grows", "",
                  f"{first['model']}, {first['dataset']}, {first['precision']} on {first['device']}: each setting's "
                  f"figures over the epochs of its own comparison above (median over repeats). Peak memory: the "
                  f"{memory}'s, the largest of any epoch{' (the device reports none)' if not on_device else ''}.", "",
                  f"| stack | image size | global batch | train img/s | median step ms | ms per image | "
                  f"peak {memory} MiB |", "|---|---|---|---|---|---|---|"]
        points: dict[str, list[tuple[int, float | None, float | None]]] = {}
        for group in family:
            epochs, left_out = group.common_epochs(), set(group.unmeasured_epochs())
            for variant, runs in group.variants.items():
                stats = [run_stats(run, epochs, left_out) for run in runs]
                rate = median_or_none([s.train_images_per_s for s in stats])
                step = median_or_none([s.median_step_s for s in stats])
                peak = median_or_none([_peak_memory(run)[1 if on_device else 0] for run in runs])
                size, batch = group.key["img_size"], group.key["batch_size"]
                per_image = 1000 * step / batch if step else None
                lines.append(f"| {_mark(variant, runs)} | {size} | {batch} | {_fmt(rate, 1)} | "
                             f"{_fmt(step and 1000 * step, 1)} | {_fmt(per_image, 2)} | {_fmt(peak, 0)} |")
                label = variant if len(image_sizes) == 1 else f"{variant}, {size}px"
                points.setdefault(label, []).append((batch, rate, peak))
        if figures:
            figure = plots.plot_growth(points, memory, out / f"cost_growth{index or ''}.png")
            lines += ["", f"![train images/s and peak {memory} memory against batch size]({figure.name})"]
        lines.append("")
    return lines


def _runs_section(groups: list[Group], unpaired: list[Run], logdir: Path) -> list[str]:
    lines = ["## Runs", "", "| run | stack | compile | seed | pretrained | epochs | device | arithmetic | "
             "host load before / after | threads torch / XLA | versions | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    every = [run for group in groups for run in group.runs()] + unpaired
    for run in every:
        versions = ", ".join(f"{k} {v}" for k, v in sorted((run.config.get("versions") or {}).items()))
        record = run.benchmark
        load = " / ".join(map(str, record.get("load_average_1m") or [])) or "n/a"
        if record.get("waited_s"):
            load += f" (waited {record['waited_s']:.0f} s)"
        threads = record.get("threads") or {}
        pretrained = run.config.get("pretrained")
        lines.append(
            f"| {run.path.relative_to(logdir) if run.path.is_relative_to(logdir) else run.path}"
            f"{CONTENDED if run.contended else ''}{' (resumed)' if run.resumed else ''} | {run.config['stack']} | {bool(run.config.get('compile'))} | "
            f"{run.config.get('seed')} | {Path(pretrained).name if pretrained else 'random'} | {run.epochs_done()} | "
            f"{run.config['device']} | {run.config.get('arithmetic') or run.config.get('precision')} | {load} | "
            f"{threads.get('torch_intra_op', 'n/a')} / {threads.get('xla_cpu', 'n/a')} | "
            f"{versions or 'n/a'} | {_fmt(run.summary.get('wall_time_s'), 1)} |"
        )
    resumed = [run for run in every if run.resumed]
    if resumed:
        lines += ["", "Resumed with --resume: " + ", ".join(str(run.path.name) for run in resumed) + ". Their epochs "
                  "were timed by more than one process; an epoch a resume split is left out of the speed figures "
                  "(named under its group), and their wall time is the last process's only."]
    if unpaired:
        lines += ["", "Not compared (no run of the other stack with the same configuration): "
                  + ", ".join(str(run.path) for run in unpaired) + "."]
    lines += ["", "Each run's full configuration is its `config.json`. Arithmetic: what --precision computed in "
              "that run, as its stack set it up. Host load: the 1-minute load average before and after the run, and "
              "the threads each stack computes with (benchmark.py); a load above the host's cores means other work "
              "competed with the run."]
    if any(run.config.get("precision") == "bf16" for run in every):
        lines += ["", f"Where the stacks' bf16 cannot be the same bit for bit: {tags.BF16_DIFFERENCES}."]
    return lines + _contention_note(every)


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
    caches = read_benchmark_record(logdir).get("compile_caches")
    lines += [f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} from `{logdir}` "
              f"({len(runs)} runs). Speedups: time of the slower / time of the faster, per repeat, as a ratio "
              "(\"1.31x faster\"), or as a percent when under 10% (\"4% faster\"); median first, min and max over "
              "repeats in brackets (below 1x or 0%: the other stack was faster in that repeat). Timings are only as "
              "good as the machine was quiet: see the host load of each run below.", "",
              f"- compile caches: {COMPILE_CACHES.get(caches, 'not recorded (runs not started by benchmark.py)')}", ""]
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
    lines += _growth_section(groups, out, figures)
    lines += _trace_problems_section(runs)
    lines += _runs_section(groups, unpaired, logdir)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Epochs a resume split or logged with no time are left out of the speed figures and named; steps the "
               "event files wrote twice or went back to are listed under 'Trace problems'. On a CPU the MFU peak is "
               "each stack's own float32 matmul rate (torch, JAX) measured once here; an MFU above 100% reads "
               "'peak underestimated'. From benchmark.py's benchmark.json: runs started under contention are marked "
               "with a dagger, and the compile caches are said cold or warm. Flax and Lightning eager runs started "
               "from the same --pretrained file get a 'Same training' section.")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="log folder holding <stack>/<run-name>/ runs")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/<UTC timestamp>/)")
    parser.add_argument("--force", action="store_true",
                        help="compare runs with different settings; marks the report FORCED")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU, overriding the GPU table and the CPU measurement "
                             "(each stack's own float32 matmul rate, measured once per report)")
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
