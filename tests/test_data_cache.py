"""The decoded cache: complete or absent after interruption, reused while its source is unchanged."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from shared_data import decode
from shared_data.cache import MANIFEST_FILE, cache_key, list_split, load_cache, load_or_build, source_fingerprint
from shared_data.registry import get_spec
from tests.test_data_staging import staging_of_a_dead_process

CLASS_IDS = get_spec("synthetic").class_ids


@pytest.fixture
def release(synthetic_data_dir, tmp_path):
    """A private copy of the tiny synthetic release, free to modify."""
    return shutil.copytree(synthetic_data_dir / "synthetic-tiny-seed0", tmp_path / "release")


def _build(release, cache_root, num_workers=2):
    files, labels, _ = list_split(release, "val", CLASS_IDS)
    return load_or_build(release, "synthetic", "val", files, labels, 24, cache_root, num_workers=num_workers,
                         progress=False)


def _visible(cache_root):
    return sorted(p.name for p in cache_root.iterdir() if not p.name.startswith("."))


def test_interrupted_cache_build_never_looks_complete_and_is_rebuilt(release, tmp_path, monkeypatch):
    real_decode = decode.try_decode_square
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt  # what Ctrl-C mid-build looks like
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(decode, "try_decode_square", interrupted)
    cache_root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _build(release, cache_root)
    assert list(cache_root.iterdir()) == []
    monkeypatch.setattr(decode, "try_decode_square", real_decode)
    split, skipped, path = _build(release, cache_root)
    assert len(split) == 100 and skipped == [] and path.name.startswith("synthetic-val-r24-v")


def test_build_killed_mid_way_leaves_nothing_that_looks_complete(release, tmp_path):
    cache_root = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from shared_data import decode
        from shared_data.cache import list_split, load_or_build
        from shared_data.registry import get_spec
        real_decode = decode.try_decode_square
        def slow_decode(*args, **kwargs):
            time.sleep(0.05)
            return real_decode(*args, **kwargs)
        decode.try_decode_square = slow_decode
        release, cache_root = Path({str(release)!r}), Path({str(cache_root)!r})
        files, labels, _ = list_split(release, "val", get_spec("synthetic").class_ids)
        load_or_build(release, "synthetic", "val", files, labels, 24, cache_root, num_workers=1, progress=False)
    """)
    builder = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not list(cache_root.glob(".building-*/images.u8")):
        assert builder.poll() is None and time.monotonic() < deadline, "builder never started its build"
        time.sleep(0.05)
    time.sleep(0.5)
    builder.kill()  # SIGKILL: no cleanup code runs
    builder.wait()
    assert _visible(cache_root) == []
    split, _, path = _build(release, cache_root)
    assert len(split) == 100 and sorted(p.name for p in cache_root.iterdir()) == [path.name]


def test_killed_build_leftovers_are_ignored_and_removed(release, tmp_path):
    files, _, _ = list_split(release, "val", CLASS_IDS)
    key = cache_key("synthetic", "val", 24, source_fingerprint(release, files))
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    # A builder killed mid-way leaves its staging folder; another leaves a final-named folder with no manifest.
    staging_of_a_dead_process(cache_root, "building", key)
    (cache_root / key).mkdir()
    (cache_root / key / "images.u8").write_bytes(b"\0" * 100)
    assert load_cache(cache_root / key) is None
    split, _, path = _build(release, cache_root)
    assert len(split) == 100 and (path / MANIFEST_FILE).exists()
    assert sorted(p.name for p in cache_root.iterdir()) == [key]


def test_cache_is_reused_until_its_source_changes(release, tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    first, _, first_path = _build(release, cache_root)
    monkeypatch.setattr(decode, "try_decode_square", lambda *a, **k: pytest.fail("cache not reused"))
    again, _, again_path = _build(release, cache_root)
    assert again_path == first_path and np.array_equal(again.images, first.images)
    monkeypatch.undo()
    extra = release / "val" / CLASS_IDS[0] / "zz_new.JPEG"
    shutil.copy(min((release / "val" / CLASS_IDS[1]).iterdir()), extra)
    changed, _, changed_path = _build(release, cache_root)
    assert changed_path != first_path and len(changed) == 101 and changed.files[10] == f"val/{CLASS_IDS[0]}/zz_new.JPEG"


def test_cache_bytes_do_not_depend_on_thread_count(release, tmp_path):
    one, _, _ = _build(release, tmp_path / "one", num_workers=1)
    three, _, _ = _build(release, tmp_path / "three", num_workers=3)
    assert np.array_equal(one.images, three.images) and np.array_equal(one.labels, three.labels)
    assert one.files == three.files
