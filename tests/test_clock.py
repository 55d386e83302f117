"""The one clock of shared_data.tags on both stacks: each step's time is that step's (planted delays land on the step
that had them), the same training from the same start, resumed epochs measured right, and --step-timing off."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_data import batches, tags
from tests import stacks

STEPS_PER_EPOCH = 6  # the tiny set's 200 images at the smoke preset's batch of 32
SAME_TRAINING_BOUND = 1e-3  # largest |loss difference| allowed between the stacks from the same start


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory) -> Path:
    """Random official-format weights of the nano model, the start both stacks are given."""
    from lightning_swin.model import create_model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("init") / "init.pth"
    torch.save(create_model("swinv2_nano_window4_64", num_classes=10, img_size=64).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def same_init_runs(tmp_path_factory, synthetic_data_dir, compilation_cache, init_weights) -> dict[str, Path]:
    """Two epochs of each stack from the same weights (float32, no drop path: the smoke preset)."""
    logdir = tmp_path_factory.mktemp("same-init")
    with stacks.torch_threads(1):
        for stack in stacks.STACKS:
            stacks.train(stack, logdir, synthetic_data_dir, "--epochs", "2", "--pretrained", str(init_weights))
    return {stack: logdir / stack / "run" for stack in stacks.STACKS}


def test_same_start_trains_the_same_in_both_stacks(same_init_runs):
    lightning, flax = (stacks.scalars(same_init_runs[stack]) for stack in ("lightning", "flax"))
    steps = [step for step, _ in flax[tags.TRAIN_LOSS]]
    assert steps == [step for step, _ in lightning[tags.TRAIN_LOSS]] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    loss_difference = np.abs(np.array([v for _, v in flax[tags.TRAIN_LOSS]]) -
                             np.array([v for _, v in lightning[tags.TRAIN_LOSS]]))
    assert loss_difference.max() <= SAME_TRAINING_BOUND, loss_difference
    np.testing.assert_allclose([v for _, v in flax[tags.TRAIN_LR]], [v for _, v in lightning[tags.TRAIN_LR]],
                               rtol=1e-6)
    np.testing.assert_allclose([v for _, v in flax[tags.VAL_LOSS]], [v for _, v in lightning[tags.VAL_LOSS]],
                               atol=SAME_TRAINING_BOUND)


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_step_times_follow_the_one_clock(same_init_runs, stack):
    scalars = stacks.scalars(same_init_runs[stack])
    step_s, wait_s, compute_s = (dict(scalars[tag]) for tag in (tags.STEP_TIME, tags.DATA_WAIT_TIME, tags.COMPUTE_TIME))
    assert sorted(step_s) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for step in step_s:
        # Event files hold float32: a 26 s first step (compilation on a busy machine) is stored to within 2e-6 s.
        assert wait_s[step] >= 0 and compute_s[step] == pytest.approx(step_s[step] - wait_s[step], rel=1e-6, abs=1e-6)
    assert dict(scalars[tags.FIRST_STEP_TIME]) == {1: step_s[1]}
    # Step times are intervals between consecutive completions, so an epoch's steps tile its train time.
    train_time = dict(scalars[tags.EPOCH_TRAIN_TIME])
    for epoch in (1, 2):
        steps = range((epoch - 1) * STEPS_PER_EPOCH + 1, epoch * STEPS_PER_EPOCH + 1)
        assert sum(step_s[s] for s in steps) == pytest.approx(train_time[epoch], rel=0.05, abs=0.02)
    assert dict(scalars[tags.EPOCH_STEPS_TIMED]) == {1: STEPS_PER_EPOCH, 2: STEPS_PER_EPOCH}
    # Each stamp is its own step's completion, so no step (epoch edges included) looks shorter than a step can be.
    median = statistics.median(step_s.values())
    assert min(step_s.values()) > median / 3, step_s


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_each_steps_tags_are_written_as_one_event(same_init_runs, stack):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    step_tags = [tags.TRAIN_LOSS, tags.TRAIN_ACCURACY, tags.TRAIN_LR, tags.STEP_TIME, tags.DATA_WAIT_TIME,
                 tags.COMPUTE_TIME]
    events = [event for path in sorted(same_init_runs[stack].glob("events.out.tfevents.*"))
              for event in EventFileLoader(str(path)).Load()]
    written = {}
    for event in events:
        for tag in {value.tag for value in event.summary.value} & set(step_tags):
            written.setdefault(tag, []).append((event.step, id(event)))
    # Every step tag at every step, and each step's tags in the one event (shared_data.event_files.step_summary).
    assert {tag: [step for step, _ in points] for tag, points in written.items()} == {
        tag: list(range(1, 2 * STEPS_PER_EPOCH + 1)) for tag in step_tags}
    assert all(len({event for _, event in points}) == 2 * STEPS_PER_EPOCH for points in written.values())
    assert len({tuple(event for _, event in points) for points in written.values()}) == 1


# ------------------------------------------------------------------------------------------------
# Planted delays: the step that had the delay, and only it, carries it.

DELAY_S = 1.5  # far above a nano step on a busy 2-core machine (0.05-0.4 s)
DELAYED_STEP = 4  # global step, 1-based: training batch index 3 of epoch 0


def _slow_batch(monkeypatch) -> None:
    """Assembling training batch DELAYED_STEP - 1 of epoch 0 takes DELAY_S longer, in both stacks' loaders."""
    real = batches.train_batch

    def slow(split, *, epoch, index, **kwargs):
        if (epoch, index) == (0, DELAYED_STEP - 1):
            time.sleep(DELAY_S)
        return real(split, epoch=epoch, index=index, **kwargs)

    monkeypatch.setattr(batches, "train_batch", slow)


def _slow_step(stack: str):
    """What makes step DELAYED_STEP's own computation take DELAY_S longer: a Lightning callback sleeping before that
    step's optimiser update; for Flax a hook whose returned state comes out of a device computation that sleeps, so
    the host dispatches the step at once and only the device is late."""
    if stack == "lightning":
        import pytorch_lightning as pl

        class SlowUpdate(pl.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                if trainer.global_step == DELAYED_STEP - 1:
                    time.sleep(DELAY_S)

        return SlowUpdate()

    import jax

    def sleep_then(value):
        time.sleep(DELAY_S)
        return value

    @jax.jit
    def late(step):
        return jax.pure_callback(sleep_then, jax.ShapeDtypeStruct(step.shape, step.dtype), step)

    def hook(steps_done, state):
        return state.replace(step=late(state.step)) if steps_done == DELAYED_STEP - 1 else state

    return hook


@pytest.mark.parametrize("where", ["batch", "step"])
@pytest.mark.parametrize("stack", stacks.STACKS)
def test_a_planted_delay_lands_on_exactly_the_step_that_had_it(stack, where, tmp_path, synthetic_data_dir,
                                                               compilation_cache, monkeypatch):
    if where == "batch":
        _slow_batch(monkeypatch)
    extras = [_slow_step(stack)] if where == "step" else []
    with stacks.torch_threads(1):
        stacks.train(stack, tmp_path, synthetic_data_dir, "--max-steps", str(STEPS_PER_EPOCH), "--num-workers", "0",
                     extras=extras)
    scalars = stacks.scalars(tmp_path / stack / "run")
    step_s, wait_s = dict(scalars[tags.STEP_TIME]), dict(scalars[tags.DATA_WAIT_TIME])
    assert step_s[DELAYED_STEP] > 0.8 * DELAY_S, step_s
    for step in range(2, STEPS_PER_EPOCH + 1):  # step 1 holds the compilation
        if step != DELAYED_STEP:
            assert step_s[step] < DELAY_S / 2 and wait_s[step] < DELAY_S / 4, (step, step_s, wait_s)
    if where == "batch":  # the wait is the delayed fetch's (less what the previous step's computation hid of it)
        assert wait_s[DELAYED_STEP] > 0.5 * DELAY_S, wait_s
    else:
        assert wait_s[DELAYED_STEP] < DELAY_S / 4, wait_s


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_a_run_resumed_after_an_epoch_end_writes_each_epoch_once(same_init_runs, synthetic_data_dir, init_weights,
                                                                 stack):
    run_dir = same_init_runs[stack]
    stacks.train(stack, run_dir.parent.parent, synthetic_data_dir, "--epochs", "3", "--pretrained", str(init_weights),
                 "--resume")
    scalars = stacks.scalars(run_dir)
    for tag in tags.PER_EPOCH:
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag
    assert all(value > 0 for _, value in scalars[tags.EPOCH_TRAIN_IMAGES_PER_S])
    summary = stacks.summary(run_dir)
    assert summary["epochs_completed"] == 3 and summary["partial_epochs"] == []


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, synthetic_data_dir, compilation_cache) -> Path:
    """Both stacks stopped after step 9 (their last save at step 8, mid-epoch 2), then resumed, in one logdir."""
    logdir = tmp_path_factory.mktemp("split")
    flags = ["--epochs", "2", "--checkpoint-every-steps", "4"]
    for stack in stacks.STACKS:
        with pytest.raises(stacks.Interrupt):
            stacks.train(stack, logdir, synthetic_data_dir, *flags, extras=[stacks.interrupt_after(stack, 9)])
        stacks.train(stack, logdir, synthetic_data_dir, *flags, "--resume")
    return logdir


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_an_epoch_split_by_a_resume_is_marked_partial_and_left_out_of_the_medians(split_runs, stack):
    run_dir = split_runs / stack / "run"
    steps_timed = dict(stacks.scalars(run_dir)[tags.EPOCH_STEPS_TIMED])
    assert steps_timed == {1: STEPS_PER_EPOCH, 2: 2 * STEPS_PER_EPOCH - 8}
    summary = stacks.summary(run_dir)
    assert summary["partial_epochs"] == [2]
    epoch_1 = dict(stacks.scalars(run_dir)[tags.EPOCH_TRAIN_IMAGES_PER_S])[1]
    assert summary["images_per_s"]["train"] == pytest.approx(epoch_1)


def test_the_report_on_resumed_runs_has_no_zero_epoch_and_names_the_split_one(split_runs, tmp_path):
    from report import compare

    report = compare.compare(split_runs, tmp_path / "report", figures=False).read_text()
    assert "`lightning/run` epoch 2 (partial" in report and "`flax/run` epoch 2 (partial" in report
    assert "lightning/run (resumed)" in report and "flax/run (resumed)" in report
    assert " 0.0 |" not in report.split("### Per stack")[1].split("###")[0]  # no zero time or rate


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_step_timing_off_writes_the_epoch_tags_only(tmp_path, synthetic_data_dir, compilation_cache, stack):
    stacks.train(stack, tmp_path, synthetic_data_dir, "--max-steps", "4", "--step-timing", "off")
    written = set(stacks.scalars(tmp_path / stack / "run"))
    assert written & set(tags.PER_STEP + (tags.FIRST_STEP_TIME,)) == set()
    assert set(tags.PER_EPOCH) <= written
    assert not math.isnan(stacks.summary(tmp_path / stack / "run")["images_per_s"]["train"])
