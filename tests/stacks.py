"""Run either stack the same way from a test: its own flags parser and config, then train_and_evaluate."""

from __future__ import annotations

import contextlib
import json
import runpy
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from shared_data import run_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
STACKS = ("lightning", "flax")
# The nano model at 64 px on the session's tiny synthetic set (200 train images: 6 steps of 32 per epoch).
SMOKE_TINY = ["--preset", "smoke", "--synthetic-size", "tiny", "--num-workers", "1"]


def script_main(name: str) -> Callable[[list[str] | None], int]:
    """The `main(argv)` of scripts/<name>.py, called in this process as the command line would (scripts/ is not a
    package: it holds entry points only)."""
    return runpy.run_path(str(REPO / "scripts" / f"{name}.py"))["main"]


@contextlib.contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block and restored after it: several test suites share
    two cores, where spinning OpenMP threads slow each step by 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(stack: str, logdir: Path, data_dir: Path, *flags: str, run_name: str = "run",
          extras: Sequence[Any] = ()) -> dict[str, Any]:
    """Train `stack` with the smoke preset on the tiny set plus `flags`; `extras` are Flax hooks or Lightning
    callbacks. Returns the summary."""
    argv = [*SMOKE_TINY, "--data-dir", str(data_dir), "--logdir", str(logdir), "--run-name", run_name, *flags]
    if stack == "flax":
        from flax_swin import train as flax_train
        from flax_swin.configs import default
        parser = run_config.build_parser(default.STACK, default.add_stack_flags)
        config = default.resolve(vars(parser.parse_args(argv)))
        return flax_train.train_and_evaluate(config, config.run_dir, hooks=extras)
    from lightning_swin import train as lightning_train
    from lightning_swin.configs import default
    parser = run_config.build_parser(default.STACK, default.add_stack_flags)
    config = default.resolve(vars(parser.parse_args(argv)))
    return lightning_train.train_and_evaluate(config, config["run_dir"], extras)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's event files, in the order written: tag -> [(step, value)]."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())


class Interrupt(Exception):
    """Stands in for a killed process."""


def interrupt_after(stack: str, step: int, exception: type[BaseException] = Interrupt) -> Any:
    """What stops `stack` once `step` steps are done (their checkpoints saved), as a kill would: a Flax hook or a
    Lightning callback raising `exception` before step + 1."""
    if stack == "flax":
        def hook(steps_done, state):
            if steps_done == step:
                raise exception(f"after step {step}")
            return state
        return hook

    import pytorch_lightning as pl

    class InterruptAfter(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                raise exception(f"after step {step}")

    return InterruptAfter()
