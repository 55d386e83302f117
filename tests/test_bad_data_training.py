"""Bad files and links in the dataset folder: training runs on, and the run's data report lists each one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from shared_data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"lightning": REPO / "scripts" / "train_lightning.py", "flax": REPO / "scripts" / "train_flax.py"}
TINY_TRAIN_IMAGES = 200
RUN_TIMEOUT_S = 300

# As root, chmod 000 does not stop a read, so an "unreadable" file is also made one by refusing its
# open() with the error a normal user would get (EACCES), in every process of the run.
UNREADABLE_HOOK = r'''
"""Test-only: open() of the file named in SWIN_TEST_UNREADABLE fails with EACCES."""
import builtins, errno, os

_NAME = os.environ.get("SWIN_TEST_UNREADABLE")
_open = builtins.open


def _open_refusing(file, *args, **kwargs):
    if _NAME and not isinstance(file, int) and os.path.basename(os.fsdecode(file)) == _NAME:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))
    return _open(file, *args, **kwargs)


builtins.open = _open_refusing
'''
UNREADABLE_NAME = "unreadable.JPEG"


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    """A tiny synthetic set with bad files added: (data dir, files that must be skipped, files that must load)."""
    data_dir = tmp_path_factory.mktemp("bad-data")
    root = write_synthetic(data_dir, size="tiny", seed=0, progress=False)
    classes = sorted(p.name for p in (root / "train").iterdir())
    a_good_jpeg = sorted((root / "train" / classes[0]).iterdir())[0]
    jpeg = a_good_jpeg.read_bytes()

    def at(split: str, class_index: int, name: str) -> Path:
        return root / split / classes[class_index] / name

    at("train", 1, "zero_bytes.JPEG").write_bytes(b"")
    at("train", 2, "truncated.JPEG").write_bytes(jpeg[: len(jpeg) // 3])
    Image.new("RGB", (120, 90), (200, 30, 30)).save(at("train", 3, "png_inside.JPEG"), format="PNG")
    at("train", 4, "README.txt").write_text("downloaded from somewhere; not an image\n")
    unreadable = at("train", 5, UNREADABLE_NAME)
    shutil.copyfile(a_good_jpeg, unreadable)
    os.chmod(unreadable, 0)
    at("val", 6, "zero_bytes_val.JPEG").write_bytes(b"")
    at("train", 7, "outside_link.JPEG").symlink_to(shutil.copyfile(a_good_jpeg, data_dir / "elsewhere.JPEG"))
    at("train", 8, "dangling_link.JPEG").symlink_to(data_dir / "deleted.JPEG")
    skipped = {f"train/{classes[1]}/zero_bytes.JPEG", f"train/{classes[2]}/truncated.JPEG",
               f"train/{classes[4]}/README.txt", f"train/{classes[5]}/{UNREADABLE_NAME}",
               f"val/{classes[6]}/zero_bytes_val.JPEG", f"train/{classes[7]}/outside_link.JPEG",
               f"train/{classes[8]}/dangling_link.JPEG"}
    return data_dir, skipped, {f"train/{classes[3]}/png_inside.JPEG"}


def _skipped_paths(report: dict) -> dict[str, str]:
    entries = report["skipped"]
    return {entry["path"] if isinstance(entry, dict) else entry[0]: entry["reason"] if isinstance(entry, dict) else entry[1]
            for entry in entries}


# The skipping and the report are shared_data's; one stack in the default suite keeps it quick.
@pytest.mark.parametrize("stack", ["lightning", pytest.param("flax", marks=pytest.mark.slow)])
def test_training_runs_on_past_bad_files_and_report_lists_them(stack, tmp_path, bad_dataset):
    data_dir, must_skip, must_load = bad_dataset
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(UNREADABLE_HOOK)
    env = dict(os.environ, SWIN_TEST_UNREADABLE=UNREADABLE_NAME,
               PYTHONPATH=os.pathsep.join([str(hooks), str(REPO), os.environ.get("PYTHONPATH", "")]),
               # The session's XLA programs, shared with the fault-injection runs (same model and batch).
               JAX_COMPILATION_CACHE_DIR=str(data_dir.parent / "xla-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    logdir = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS[stack]), "--preset", "smoke", "--synthetic-size", "tiny", "--max-steps", "2",
         "--data-dir", str(data_dir), "--logdir", str(logdir), "--run-name", "bad"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{stack}: training stopped on bad data:\n{output[-3000:]}"
    run_dir = logdir / stack / "bad"
    report = json.loads((run_dir / "data_report.json").read_text())
    skipped = _skipped_paths(report)
    assert set(skipped) == must_skip, f"{stack}: report lists {sorted(skipped)}"
    assert all(reason.strip() for reason in skipped.values())
    assert "empty" in skipped[next(p for p in must_skip if p.endswith("zero_bytes.JPEG"))]
    assert not must_load & set(skipped), "a PNG named .JPEG is a valid image and must load"
    if "train_images" in report:  # PreparedData.report() has it; a bare skipped list does not
        assert report["train_images"] == TINY_TRAIN_IMAGES + 1  # the PNG joins, the 4 bad files and 2 links do not
    assert (run_dir / "summary.json").is_file(), f"{stack}: the run did not finish"
