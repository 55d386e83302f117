"""Deletions leave only empty files in a trash; atomic writes never leave a partial file."""

import os

import pytest

from shared_data import trash_safe


def test_removing_a_tree_leaves_only_empty_files_in_the_trash(tmp_path, trash):
    tree = tmp_path / "ckpt"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.bin").write_bytes(b"x" * 1000)
    (tree / "sub" / "b.bin").write_bytes(b"y" * 2000)
    (tree / "sub" / "deeper" / "c.bin").write_bytes(b"z" * 3)
    freed = trash_safe.remove_path(tree)
    assert freed == 3003
    assert not tree.exists()
    trashed = list(trash.iterdir())
    assert len(trashed) == 3
    assert all(p.stat().st_size == 0 for p in trashed)


def test_removing_a_link_keeps_its_target(tmp_path, trash):
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    trash_safe.remove_path(link)
    assert target.read_bytes() == b"keep me"


def test_removing_a_missing_path_frees_nothing(tmp_path):
    assert trash_safe.remove_path(tmp_path / "absent") == 0


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    trash_safe.atomic_write_json(path, {"step": 1})

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        trash_safe.atomic_write_json(path, {"step": 2})
    assert '"step": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
