"""Each stack's step clock against a synchronised reference: medians of the stamped step times beside steps each
closed on the host (jax.block_until_ready, torch.cuda.synchronize), and which completion each clock took."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from shared_data import environment, run_config, tags

STACKS = ("flax", "lightning")
TARGET = 0.05  # the clock's median within 5% of the reference's (issue of the GPU run's self-check)
SKIPPED_STEPS = 2  # the first steps compile and warm up: left out of both medians


@dataclasses.dataclass(frozen=True)
class ClockCheck:
    """One stack's check: medians in seconds over the steps after SKIPPED_STEPS, and the clock's completion."""

    stack: str
    clock_median_s: float  # the stack's time/step_s in a plain run (not closed)
    reference_median_s: float  # intervals between host-closed steps in a second run of the same settings
    same_run_median_s: float  # the stack's time/step_s in that second run, whose steps the host closed
    completion: str  # how the clock stamped completion: "cuda event", "host return", "completion thread"
    steps: int

    @property
    def difference(self) -> float:
        """(clock - reference) / reference of the medians over the same steps, those of the run the host closed: how
        far the stack's stamps are from the truth."""
        return self.same_run_median_s / self.reference_median_s - 1

    @property
    def closing_cost(self) -> float:
        """(closed run's clock - plain run's clock) / plain run's clock: what closing every step on the host costs,
        the part of a step that asynchronous dispatch hides in a plain run."""
        return self.same_run_median_s / self.clock_median_s - 1

    @property
    def passed(self) -> bool:
        return abs(self.difference) <= TARGET


def _config(stack: str, flags: Sequence[str], logdir: Path, run_name: str) -> Any:
    if stack == "flax":
        from flax_swin.configs import default
    else:
        from lightning_swin.configs import default
    parser = run_config.build_parser(default.STACK, default.add_stack_flags)
    return default.resolve(vars(parser.parse_args([*flags, "--logdir", str(logdir), "--run-name", run_name])))


def _step_times(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tags.STEP_TIME)}


def _closing_extra(stack: str, stamps: list[float], completions: list[str]) -> Any:
    """What closes every step on the host and stamps the moment: a Flax hook that waits for the state before the next
    step is dispatched; a Lightning callback that synchronises the device when the step returns (and reads which
    completion the stack's clock took)."""
    if stack == "flax":
        import jax

        def hook(steps_done: int, state: Any) -> Any:
            jax.block_until_ready(state)
            stamps.append(time.perf_counter())
            return state

        return hook

    import pytorch_lightning as pl
    import torch

    from lightning_swin.callbacks import TimingAndMetrics

    class Synchronise(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            stamps.append(time.perf_counter())
            timing = next(c for c in trainer.callbacks if isinstance(c, TimingAndMetrics))
            completions.append(timing.completion)

    return Synchronise()


def _train(stack: str, config: Any, extras: Sequence[Any]) -> None:
    if stack == "flax":
        from flax_swin import train

        train.train_and_evaluate(config, config.run_dir, hooks=extras)
    else:
        from lightning_swin import train

        train.train_and_evaluate(config, config["run_dir"], extras)


def check_stack(stack: str, flags: Sequence[str], logdir: Path) -> ClockCheck:
    """Train `stack` twice with `flags` (a plain run, and one whose steps the host closes) and compare the clocks.

    Raises ValueError when the runs have too few steps to leave any after SKIPPED_STEPS.
    """
    plain = _config(stack, flags, logdir, "clock")
    _train(stack, plain, [])
    stamps: list[float] = []
    completions: list[str] = []
    closed = _config(stack, flags, logdir, "reference")
    _train(stack, closed, [_closing_extra(stack, stamps, completions)])
    clock = [seconds for step, seconds in sorted(_step_times(Path(plain["run_dir"])).items())][SKIPPED_STEPS:]
    same_run = [seconds for step, seconds in sorted(_step_times(Path(closed["run_dir"])).items())][SKIPPED_STEPS:]
    # Flax's hook runs before each dispatch, so its stamps close steps 0 (nothing), 1, ..., N-1: intervals from the
    # second on are steps 2..N-1; Lightning's close steps 1..N: intervals are steps 2..N.
    intervals = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    reference = intervals[SKIPPED_STEPS - (1 if stack == "lightning" else 0):]
    if not (clock and reference and same_run):
        raise ValueError(f"{stack}: too few steps for a check; give --max-steps above {SKIPPED_STEPS + 2}")
    completion = completions[-1] if completions else "completion thread"
    return ClockCheck(stack, statistics.median(clock), statistics.median(reference), statistics.median(same_run),
                      completion, len(clock))


def format_checks(checks: Sequence[ClockCheck], flags: Sequence[str], load_before: str) -> str:
    """The printed table: per stack the three medians in ms, the difference and whether it is within TARGET."""
    lines = [f"step clock against host-closed steps, {' '.join(flags)}; {environment.cpu_description()}; "
             f"before: {load_before}, after: {environment.machine_load_text()}",
             f"{'stack':<10}{'completion':<20}{'steps':>6}{'closed ms':>11}{'clock in closed run':>21}"
             f"{'difference':>12}{'plain run clock':>17}{'closing costs':>15}",
             ]
    for check in checks:
        lines.append(f"{check.stack:<10}{check.completion:<20}{check.steps:>6}{check.reference_median_s * 1e3:>11.1f}"
                     f"{check.same_run_median_s * 1e3:>21.1f}{check.difference:>+12.1%}"
                     f"{check.clock_median_s * 1e3:>17.1f}{check.closing_cost:>+15.1%}"
                     f"{'' if check.passed else '  OVER ' + format(TARGET, '.0%')}")
    lines.append("difference: the clock's median against the host-closed steps' own intervals, over the same steps (the "
                 f"check, within {TARGET:.0%}); closing costs: how much slower closing every step made the clock's "
                 "median than in a plain run of the same settings (work a plain run overlaps)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stacks", nargs="+", choices=STACKS, default=list(STACKS))
    parser.add_argument("--logdir", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the checks here")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="training flags after '--' (default: --preset smoke --max-steps 24)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks; exit 0 when every stack is within TARGET, 1 otherwise."""
    args = build_parser().parse_args(argv)
    flags = [flag for flag in args.flags if flag != "--"] or ["--preset", "smoke", "--max-steps", "24"]
    load_before = environment.machine_load_text()
    with tempfile.TemporaryDirectory(prefix="clock-check-") as scratch:
        logdir = args.logdir or Path(scratch)
        checks = [check_stack(stack, flags, logdir / stack) for stack in args.stacks]
    print(format_checks(checks, flags, load_before), flush=True)
    if args.json:
        args.json.write_text(json.dumps([dict(dataclasses.asdict(c), difference=c.difference, passed=c.passed)
                                         for c in checks], indent=2))
    return 0 if all(check.passed for check in checks) else 1
