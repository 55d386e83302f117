"""Flax checkpoints: best+latest retention, trash-safe deletion, leftovers, corrupted and disk-full saves."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_swin import checkpointing
from shared_data import trash_safe


def _state(step: int) -> dict:
    return {"step": jnp.asarray(step, jnp.int32), "params": {"w": jnp.full((64, 32), step, jnp.float32),
                                                             "b": jnp.arange(32, dtype=jnp.float32) * step}}


def _save_all(run_dir: Path, keep: int, accuracies: dict[int, float | None]) -> None:
    manager = checkpointing.Checkpointer(run_dir, keep=keep)
    for step, accuracy in accuracies.items():
        manager.save(step, _state(step), {"step": step, "epoch": step, checkpointing.VAL_ACCURACY_METRIC: accuracy},
                     accuracy)
    manager.close()


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


# A failed TensorStore read still completes futures into Orbax's closed event loop (reported as unraisable).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_checkpoint_is_refused_with_a_warning_and_the_previous_one_restored(tmp_path, capsys):
    _save_all(tmp_path, 3, {1: 0.5, 2: 0.6})
    corrupted = tmp_path / "checkpoints" / "2"
    for path in (corrupted / "state").rglob("*"):
        if path.is_file() and path.name not in ("_METADATA", "_sharding"):
            path.write_bytes(b"garbage")
    with pytest.raises(checkpointing.CheckpointError, match=r"checkpoints/2: cannot be restored"):
        checkpointing.verify_checkpoint(corrupted)
    assert checkpointing.verify_checkpoint(tmp_path / "checkpoints" / "1")["step"] == 1

    manager = checkpointing.Checkpointer(tmp_path, keep=3)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
    state, meta = manager.restore_latest(abstract)
    manager.close()
    assert int(state["step"]) == 1 and meta["step"] == 1
    np.testing.assert_array_equal(state["params"]["w"], np.ones((64, 32), np.float32))
    assert "checkpoints/2 cannot be restored" in capsys.readouterr().out


def test_a_half_deleted_step_folder_is_incomplete_and_a_leftover(tmp_path):
    _save_all(tmp_path, 3, {6: 0.5, 7: 0.6})
    # Deletion removes the completeness marker first, so a kill part-way leaves this state.
    folder = tmp_path / "checkpoints" / "7"
    (folder / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(checkpointing.CheckpointError, match=r"7: incomplete save"):
        checkpointing.verify_checkpoint(folder)
    assert [(i.step, i.complete) for i in checkpointing.list_checkpoints(tmp_path)] == [(6, True), (7, False)]
    assert checkpointing.leftovers(tmp_path) == [folder]


def test_disk_full_during_a_save_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    manager = checkpointing.Checkpointer(tmp_path, keep=2)
    manager.save(1, _state(1), {"step": 1, "epoch": 1}, 0.5)
    manager.wait()
    real_rename = os.rename

    def full_disk_rename(src, dst, *args, **kwargs):
        if "checkpoints" in os.fsdecode(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(dst))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", full_disk_rename)
    with pytest.raises(checkpointing.CheckpointSaveError, match=r"^disk full while saving") as raised:
        manager.save(2, _state(2), {"step": 2, "epoch": 2}, 0.6)
        manager.wait()
    assert "\n" not in str(raised.value)
    monkeypatch.setattr(os, "rename", real_rename)
    assert checkpointing.verify_checkpoint(tmp_path / "checkpoints" / "1")["step"] == 1
