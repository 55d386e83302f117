"""Flax checkpoints: best+latest retention, trash-safe deletion, leftovers, checksums, damaged, unreadable and
mismatched checkpoints, disk-full saves."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_swin import checkpointing
from shared_data import checksums, trash_safe
from shared_data.errors import CheckpointDamagedError, CheckpointError


def _state(step: int) -> dict:
    return {"step": jnp.asarray(step, jnp.int32), "params": {"w": jnp.full((64, 32), step, jnp.float32),
                                                             "b": jnp.arange(32, dtype=jnp.float32) * step}}


def _save_all(run_dir: Path, keep: int, accuracies: dict[int, float | None]) -> None:
    manager = checkpointing.Checkpointer(run_dir, keep=keep)
    for step, accuracy in accuracies.items():
        manager.save(step, _state(step), {"step": step, "epoch": step, checkpointing.VAL_ACCURACY_METRIC: accuracy},
                     accuracy)
    manager.close()


def _abstract(state: dict) -> dict:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _restore_latest(run_dir: Path, state: dict | None = None):
    """(restored state, meta) of the newest checkpoint that restores, as a resume does."""
    manager = checkpointing.Checkpointer(run_dir, keep=3)
    try:
        return manager.restore_latest(_abstract(_state(0) if state is None else state))
    finally:
        manager.close()


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _steps(run_dir: Path) -> list[int]:
    return [info.step for info in checkpointing.list_checkpoints(run_dir)]


# Epoch ends (even steps) carry a validation accuracy; the best is step 4, the latest step 9.
ACCURACIES = {1: None, 2: 0.3, 3: None, 4: 0.8, 5: None, 6: 0.5, 7: None, 8: 0.4, 9: None}


@pytest.mark.parametrize("keep, expected", [(1, [9]), (2, [4, 9]), (3, [4, 6, 9])])
def test_retention_keeps_the_best_by_val_accuracy_and_the_latest(tmp_path, keep, expected):
    _save_all(tmp_path, keep, ACCURACIES)
    infos = checkpointing.list_checkpoints(tmp_path)
    assert [info.step for info in infos] == expected
    assert all(info.complete and info.stack == "flax" and info.bytes > 0 for info in infos)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(map(str, expected))
    assert [info.val_accuracy for info in infos][: len(expected) - 1] == [ACCURACIES[s] for s in expected[:-1]]


def test_retention_deletes_through_trash_safe_leaving_only_empty_files_in_the_trash(tmp_path, monkeypatch):
    trash = tmp_path / "trash"
    trash.mkdir()
    moved = []

    def move_to_trash(path):
        moved.append(Path(path))
        os.rename(path, trash / f"{len(moved)}-{Path(path).name}")

    # Any deletion of an existing file that bypasses trash_safe (Orbax's own unlink, rmtree) is recorded.
    # (Orbax blindly unlinks each file it is about to write; those calls find nothing and delete nothing.)
    bypassed = []
    real_unlink = os.unlink

    def recording_unlink(path, *args, **kwargs):
        if kwargs.get("dir_fd") is not None or os.path.lexists(path):
            bypassed.append(path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(trash_safe, "_unlink", move_to_trash)
    monkeypatch.setattr(os, "unlink", recording_unlink)
    monkeypatch.setattr(os, "remove", recording_unlink)
    _save_all(tmp_path / "run", 2, ACCURACIES)
    assert [info.step for info in checkpointing.list_checkpoints(tmp_path / "run")] == [4, 9]
    files = list(trash.iterdir())
    assert len(files) >= 7 * 3, "seven deleted checkpoints should have sent their files to the trash"
    assert [f.name for f in files if f.stat().st_size] == []
    assert not [p for p in bypassed if "checkpoints" in os.fsdecode(p)]


def test_leftovers_of_interrupted_saves_are_listed_then_removed_on_start(tmp_path, monkeypatch):
    trashed = []
    monkeypatch.setattr(trash_safe, "_unlink", lambda path: (trashed.append(Path(path)), os.unlink(path)))
    _save_all(tmp_path, 2, {1: None, 2: 0.5})
    partial = tmp_path / "checkpoints" / f"3{checkpointing.ORBAX_TMP_MARKER}-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "data").write_bytes(b"x" * 100)
    staged = tmp_path / ".config.json.abcd.tmp"
    staged.write_text("{}")
    assert checkpointing.leftovers(tmp_path) == sorted([partial, staged])
    assert [info.step for info in checkpointing.list_checkpoints(tmp_path)] == [2]

    checkpointing.Checkpointer(tmp_path, keep=2).close()
    assert checkpointing.leftovers(tmp_path) == []
    assert not partial.exists() and not staged.exists()
    assert partial / "state" / "data" in trashed, "leftovers must be deleted through trash_safe"


def test_corrupted_latest_checkpoint_is_refused_with_a_warning_and_the_previous_one_restored(tmp_path, capsys):
    _save_all(tmp_path, 3, {1: 0.5, 2: 0.6})
    corrupted = tmp_path / "checkpoints" / "2"
    for path in (corrupted / "state").rglob("*"):
        if path.is_file() and path.name not in ("_METADATA", "_sharding"):
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointDamagedError, match=r"checkpoints/2 is damaged: state/\S+ differs from what was saved"):
        checkpointing.verify_checkpoint(corrupted)
    assert checkpointing.verify_checkpoint(tmp_path / "checkpoints" / "1")["step"] == 1

    state, meta = _restore_latest(tmp_path)
    assert int(state["step"]) == 1 and meta["step"] == 1
    np.testing.assert_array_equal(state["params"]["w"], np.ones((64, 32), np.float32))
    assert "warning: skipping damaged checkpoint: " in capsys.readouterr().err
    assert _steps(tmp_path) == [1], "a damaged checkpoint is deleted once an earlier one restores"


def test_a_flipped_byte_inside_a_tensor_is_found_by_verify_and_resume_uses_the_previous(tmp_path, capsys):
    manager = checkpointing.Checkpointer(tmp_path, keep=3)
    for step in (1, 2):  # a 1 MiB tensor of random floats each; with accuracies, both are kept
        state = {"step": jnp.asarray(step, jnp.int32), "params": {"w": jax.random.normal(jax.random.key(step), (512, 512))}}
        manager.save(step, state, {"step": step, "epoch": step}, 0.1 * step)
    manager.close()
    victim = _largest_file(tmp_path / "checkpoints" / "2" / "state")
    assert victim.stat().st_size > 100_000, "the largest file should hold the tensor's bytes"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    name = victim.relative_to(tmp_path / "checkpoints" / "2").as_posix()

    with pytest.raises(CheckpointDamagedError, match=f"is damaged: {name} differs from what was saved"):
        checkpointing.verify_checkpoint(tmp_path / "checkpoints" / "2")
    state, meta = _restore_latest(tmp_path, state)
    assert meta["step"] == 1 and int(state["step"]) == 1
    assert name in capsys.readouterr().err


def test_a_checkpoint_whose_checksums_are_missing_stops_the_resume_and_is_kept(tmp_path):
    _save_all(tmp_path, 3, {1: 0.5, 2: 0.6})
    (tmp_path / "checkpoints" / "2" / checksums.FOLDER_SUMS).unlink()
    with pytest.raises(CheckpointError, match=f"checkpoints/2 has no checksums \\({checksums.FOLDER_SUMS} is missing\\)"):
        checkpointing.verify_checkpoint(tmp_path / "checkpoints" / "2")
    with pytest.raises(CheckpointError, match="has no checksums"):
        _restore_latest(tmp_path)
    assert _steps(tmp_path) == [1, 2], "not proven damaged: nothing is skipped or deleted"


def _failing_reads(monkeypatch, failures: int) -> list[Path]:
    """Make the first `failures` file reads of checksums.digest_file fail with EIO, as a flaky disk does."""
    seen = []
    real = checksums.digest_file

    def flaky(path):
        seen.append(Path(path))
        if len(seen) <= failures:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path)

    monkeypatch.setattr(checksums, "digest_file", flaky)
    monkeypatch.setattr(checksums, "RETRY_DELAY_S", 0.0)
    return seen


def test_a_transient_read_error_is_retried_and_the_checkpoint_restored(tmp_path, monkeypatch):
    _save_all(tmp_path, 3, {1: 0.5, 2: 0.6})
    _failing_reads(monkeypatch, failures=checksums.READ_ATTEMPTS - 1)
    state, meta = _restore_latest(tmp_path)
    assert meta["step"] == 2 and int(state["step"]) == 2
    assert _steps(tmp_path) == [1, 2]


def test_a_read_error_that_persists_stops_with_one_line_and_deletes_nothing(tmp_path, monkeypatch):
    _save_all(tmp_path, 3, {1: 0.5, 2: 0.6})
    _failing_reads(monkeypatch, failures=10**6)
    with pytest.raises(CheckpointError) as raised:
        _restore_latest(tmp_path)
    message = str(raised.value)
    assert not isinstance(raised.value, CheckpointDamagedError) and "\n" not in message
    assert "checkpoints/2 could not be read after 3 attempts" in message and "Input/output error" in message
    assert _steps(tmp_path) == [1, 2]


def test_a_state_tree_that_differs_from_the_saved_one_stops_naming_the_keys_and_deletes_nothing(tmp_path):
    _save_all(tmp_path, 3, {1: 0.5, 2: 0.6})
    changed = _state(0)
    changed["params"]["w"] = jnp.zeros((64, 16), jnp.float32)  # a changed shape
    changed["params"].update({f"extra{i}": jnp.zeros(3) for i in range(4)})  # four new parameters
    with pytest.raises(CheckpointError) as raised:
        _restore_latest(tmp_path, changed)
    message = str(raised.value)
    assert message.startswith(f"checkpoint {tmp_path / 'checkpoints' / '2'} does not fit the model")
    assert ("params/extra0 is not in the checkpoint, params/extra1 is not in the checkpoint, "
            "params/extra2 is not in the checkpoint and 2 more;") in message
    assert "\n" not in message
    assert _steps(tmp_path) == [1, 2]


def test_a_truncated_file_is_reported_in_one_line_naming_the_file(tmp_path, capfd):
    _save_all(tmp_path, 3, {1: 0.5, 2: 0.6})
    victim = _largest_file(tmp_path / "checkpoints" / "2" / "state")
    os.truncate(victim, victim.stat().st_size // 2)
    capfd.readouterr()
    state, meta = _restore_latest(tmp_path)
    assert meta["step"] == 1
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, lines[:20]
    assert victim.relative_to(tmp_path / "checkpoints" / "2").as_posix() in lines[0]


def test_when_every_checkpoint_is_damaged_resume_stops_and_deletes_none(tmp_path):
    _save_all(tmp_path, 3, {1: 0.5, 2: 0.6})
    for step in (1, 2):
        victim = _largest_file(tmp_path / "checkpoints" / str(step) / "state")
        os.truncate(victim, 1)
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged \(2, 1\), so none is used or deleted"):
        _restore_latest(tmp_path)
    assert _steps(tmp_path) == [1, 2]


def test_a_half_deleted_step_folder_is_incomplete_and_a_leftover(tmp_path):
    _save_all(tmp_path, 3, {6: 0.5, 7: 0.6})
    # Deletion removes the completeness marker first, so a kill part-way leaves this state.
    folder = tmp_path / "checkpoints" / "7"
    (folder / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(checkpointing.CheckpointError, match=r"7: incomplete save"):
        checkpointing.verify_checkpoint(folder)
    assert [(i.step, i.complete) for i in checkpointing.list_checkpoints(tmp_path)] == [(6, True), (7, False)]
    assert checkpointing.leftovers(tmp_path) == [folder]


@pytest.mark.parametrize("surfaces_at", ["next save", "wait"])
def test_disk_full_during_a_save_names_that_step_and_removes_its_partial_save_trash_safely(tmp_path, monkeypatch,
                                                                                         surfaces_at):
    manager = checkpointing.Checkpointer(tmp_path, keep=2)
    manager.save(1, _state(1), {"step": 1, "epoch": 1}, 0.5)
    manager.wait()
    real_rename, real_unlink = os.rename, os.unlink
    unlinked_sizes = []

    def full_disk_rename(src, dst, *args, **kwargs):
        if "checkpoints" in os.fsdecode(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(dst))
        return real_rename(src, dst, *args, **kwargs)

    def recording_unlink(path, *args, **kwargs):
        if os.path.isfile(path):
            unlinked_sizes.append(os.path.getsize(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "rename", full_disk_rename)
    monkeypatch.setattr(os, "unlink", recording_unlink)
    monkeypatch.setattr(trash_safe, "_unlink", recording_unlink)
    # The save of step 2 fails in the background; whatever call learns of it names step 2, not its own.
    manager.save(2, _state(2), {"step": 2, "epoch": 2}, 0.6)
    with pytest.raises(checkpointing.CheckpointSaveError, match=r"^disk full while saving the checkpoint of step 2 "):
        if surfaces_at == "wait":
            manager.wait()
        else:
            manager.save(3, _state(3), {"step": 3, "epoch": 3}, None)
    monkeypatch.setattr(os, "rename", real_rename)
    manager.close()
    assert checkpointing.leftovers(tmp_path) == [], "the partial save of step 2 is removed at once"
    assert unlinked_sizes and set(unlinked_sizes) == {0}, "partial files are emptied before they are removed"
    assert _steps(tmp_path) == [1]
    assert checkpointing.verify_checkpoint(tmp_path / "checkpoints" / "1")["step"] == 1


def test_orbax_failure_output_holds_only_orbax_errors_and_closed_loop_reports_and_restores_everything(capsys):
    import logging
    import sys

    absl = logging.getLogger("absl")
    handled = []

    class Collect(logging.Handler):
        def emit(self, record):
            handled.append(record.getMessage())

    def record(pathname, level, message):
        return logging.LogRecord("absl", level, pathname, 1, message, None, None)

    collect, hook_before, filters_before = Collect(), sys.unraisablehook, list(absl.filters)
    absl.addHandler(collect)
    reported = []
    sys.unraisablehook = lambda unraisable: reported.append(str(unraisable.exc_value))
    try:
        with checkpointing.OrbaxFailureOutput() as output:
            absl.handle(record("/site-packages/orbax/checkpoint/x.py", logging.ERROR, "orbax failed"))
            absl.handle(record("/site-packages/orbax/checkpoint/x.py", logging.INFO, "orbax info"))
            absl.handle(record("/site-packages/other/y.py", logging.ERROR, "other failed"))
            for value in (RuntimeError("Event loop is closed"), RuntimeError("something else")):
                sys.unraisablehook(type("Unraisable", (), {"exc_value": value})())
            assert handled == ["orbax info", "other failed"] and reported == ["something else"]
            output.saved()  # a save finished well: what was held was not about a failure we report
            assert handled[-1] == "orbax failed"
            absl.handle(record("/site-packages/orbax/checkpoint/x.py", logging.ERROR, "the save failed"))
            output.failed()  # raised as one line by the Checkpointer: Orbax's own words about it are dropped
            absl.handle(record("/site-packages/orbax/checkpoint/x.py", logging.ERROR, "and again on closing"))
        assert "the save failed" not in handled and "and again on closing" not in handled
        assert list(absl.filters) == filters_before and sys.unraisablehook != output._unraisable
        absl.handle(record("/site-packages/orbax/checkpoint/x.py", logging.ERROR, "after it closed"))
        assert handled[-1] == "after it closed"
    finally:
        absl.removeHandler(collect)
        sys.unraisablehook = hook_before


def test_after_a_failed_save_only_its_unawaited_write_coroutines_go_unwarned():
    import warnings

    from flax_swin.checkpointing import OrbaxFailureOutput

    with warnings.catch_warnings(record=True) as caught:  # the filter failed() adds goes with this block
        warnings.simplefilter("always")
        with OrbaxFailureOutput() as output:
            output.failed()
        warnings.warn("coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited", RuntimeWarning)
        warnings.warn("coroutine 'something_else' was never awaited", RuntimeWarning)
    assert [str(warning.message) for warning in caught] == ["coroutine 'something_else' was never awaited"]
