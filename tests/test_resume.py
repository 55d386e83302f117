"""Resuming either stack: the event files hold every step once, a --resume with nothing to continue starts the run
with a warning, and an extended run follows its own learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboardX import SummaryWriter

from shared_data import event_files, run_config, tags
from tests import stacks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

STEPS_PER_EPOCH = 6  # the tiny set's 200 images at the smoke preset's batch of 32
NO_CHECKPOINT = "has no checkpoint yet; starting from step 0"


def assert_each_step_once(run_dir: Path, last_step: int, epochs: int) -> dict[str, list[tuple[int, float]]]:
    """Read the event files in order as TensorBoard does (purges applied): every tag holds each step once."""
    scalars = stacks.scalars(run_dir)
    for tag in tags.PER_STEP:
        assert [step for step, _ in scalars[tag]] == list(range(1, last_step + 1)), tag
    for tag in tags.PER_EPOCH:
        assert [step for step, _ in scalars[tag]] == list(range(1, epochs + 1)), tag
    return scalars


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_a_run_killed_after_a_checkpoint_and_resumed_writes_every_step_once(tmp_path, synthetic_data_dir,
                                                                            compilation_cache, stack):
    flags = ["--epochs", "2", "--checkpoint-every-steps", "4"]
    with pytest.raises(stacks.Interrupt):  # step 9 is written, then the run stops; it resumes from the step-8 checkpoint
        stacks.train(stack, tmp_path, synthetic_data_dir, *flags, extras=[stacks.interrupt_after(stack, 10)])
    run_dir = tmp_path / stack / "run"
    assert 9 in dict(stacks.scalars(run_dir)[tags.TRAIN_LOSS])
    stacks.train(stack, tmp_path, synthetic_data_dir, *flags, "--resume")
    assert_each_step_once(run_dir, 2 * STEPS_PER_EPOCH, epochs=2)


def test_an_epoch_whose_checkpoint_was_never_published_is_purged_and_the_steps_before_it_written_again(tmp_path):
    # A killed run flushed epoch 2's tags (step 12), then died before publishing its checkpoint; the latest
    # checkpoint is the step save of step 8, so epoch 1 is the last one it completes.
    # Suffixes keep the two files apart (and in this order) although both are opened within one second.
    with SummaryWriter(str(tmp_path), filename_suffix=".1-killed") as killed:
        for step in range(1, 13):
            killed.add_scalar(tags.TRAIN_LOSS, 100.0 + step, step)
        for epoch in (1, 2):
            killed.add_scalar(tags.VAL_ACCURACY, 0.1 * epoch, epoch)
    purge_step, replay = event_files.resume_purge(tmp_path, restored_step=8, steps_per_epoch=STEPS_PER_EPOCH)
    assert purge_step == 2
    assert [(point.tag, point.step) for point in replay] == [(tags.TRAIN_LOSS, step) for step in range(2, 9)]

    with SummaryWriter(str(tmp_path), purge_step=purge_step, filename_suffix=".2-resumed") as resumed:
        event_files.write_points(resumed, replay)
        for step in range(9, 13):
            resumed.add_scalar(tags.TRAIN_LOSS, 200.0 + step, step)
        resumed.add_scalar(tags.VAL_ACCURACY, 0.5, 2)
    scalars = stacks.scalars(tmp_path)
    assert scalars[tags.TRAIN_LOSS] == [(step, 100.0 + step) for step in range(1, 9)] + [
        (step, 200.0 + step) for step in range(9, 13)]
    assert scalars[tags.VAL_ACCURACY] == [(1, pytest.approx(0.1)), (2, 0.5)]
    # Nothing stale: the purge is from the step after the checkpoint, and nothing is written again.
    assert event_files.resume_purge(tmp_path, restored_step=12, steps_per_epoch=STEPS_PER_EPOCH) == (13, [])


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_resume_without_a_run_folder_starts_from_step_0_with_a_warning(tmp_path, synthetic_data_dir,
                                                                       compilation_cache, stack, capsys):
    summary = stacks.train(stack, tmp_path, synthetic_data_dir, "--max-steps", "2", "--resume")
    assert f"warning: --resume: {tmp_path / stack / 'run'} {NO_CHECKPOINT}" in capsys.readouterr().err
    assert summary["steps"] == 2
    assert (tmp_path / stack / "run" / "config.json").is_file()


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_resume_of_a_run_killed_before_its_first_checkpoint_and_config_starts_from_step_0(tmp_path, synthetic_data_dir,
                                                                                          compilation_cache, stack,
                                                                                          capsys):
    with pytest.raises(stacks.Interrupt):
        stacks.train(stack, tmp_path, synthetic_data_dir, "--max-steps", "4", extras=[stacks.interrupt_after(stack, 3)])
    run_dir = tmp_path / stack / "run"
    (run_dir / "config.json").unlink()  # as if killed before writing it
    capsys.readouterr()
    summary = stacks.train(stack, tmp_path, synthetic_data_dir, "--max-steps", "4", "--resume")
    assert NO_CHECKPOINT in capsys.readouterr().err
    assert summary["steps"] == 4
    assert_each_step_once(run_dir, 4, epochs=1)


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_an_extended_run_follows_the_new_schedule_at_every_step(tmp_path, synthetic_data_dir, compilation_cache,
                                                                stack):
    stacks.train(stack, tmp_path, synthetic_data_dir, "--epochs", "1")
    stacks.train(stack, tmp_path, synthetic_data_dir, "--epochs", "2", "--resume")
    learning_rates = assert_each_step_once(tmp_path / stack / "run", 2 * STEPS_PER_EPOCH, epochs=2)[tags.TRAIN_LR]

    def schedule(epochs: int) -> dict:
        return run_config.resolve(dict(preset="smoke", synthetic_size="tiny", epochs=epochs, run_name="r"), stack)

    # Step s used the rate of s - 1 updates done: the first epoch under the 1-epoch run's schedule, the second
    # under the 2-epoch one's (never the saved run's).
    expected = [run_config.learning_rate(step - 1, schedule(1 if step <= STEPS_PER_EPOCH else 2), STEPS_PER_EPOCH)
                for step in range(1, 2 * STEPS_PER_EPOCH + 1)]
    assert [lr for _, lr in learning_rates] == pytest.approx(expected, rel=1e-6)
