"""A data folder, archive, image or log folder that cannot work: one line naming the path, the same exit code in both
stacks, no traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import prepare_data as prepare_script
from shared_data.errors import USAGE_EXIT_CODE, DataError
from shared_data.prepare import prepare_data
from shared_data.registry import get_spec

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"lightning": REPO / "scripts" / "train_lightning.py", "flax": REPO / "scripts" / "train_flax.py"}
STACKS = tuple(SCRIPTS)
RUN_TIMEOUT_S = 300


def _train(stack: str, data_dir: Path, logdir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS[stack]), "--preset", "smoke", "--synthetic-size", "tiny", "--num-workers", "1",
         "--data-dir", str(data_dir), "--logdir", str(logdir), "--run-name", "r", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))


def _assert_one_line_error(result: subprocess.CompletedProcess, stack: str, flag: str, path: Path) -> None:
    """Exit 2 (a flag value that cannot work), and stderr ends in one line naming the flag and the path."""
    assert "Traceback" not in result.stderr, f"{stack}:\n{result.stderr[-3000:]}"
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == USAGE_EXIT_CODE, f"{stack}: exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert last.startswith(f"{SCRIPTS[stack].name}: error: {flag}") and str(path) in last, last


@pytest.mark.parametrize("stack", STACKS)
def test_data_dir_that_is_a_file_is_one_line_naming_it(stack, tmp_path):
    (tmp_path / "file").write_text("")
    result = _train(stack, tmp_path / "file", tmp_path / "runs")
    _assert_one_line_error(result, stack, "--data-dir", tmp_path / "file")


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("fault", ["size", "checksum"])
def test_local_archive_with_wrong_size_or_checksum_is_one_line_naming_it(stack, fault, tmp_path):
    spec = get_spec("imagenette-160")
    archive = tmp_path / spec.archive_name
    with open(archive, "wb") as handle:  # sparse: the release's size in zeros, or one byte short
        handle.truncate(spec.size_bytes - (fault == "size"))
    result = _train(stack, tmp_path, tmp_path / "runs", "--dataset", "imagenette-160")
    _assert_one_line_error(result, stack, "--data-dir", archive)
    assert ("expected" if fault == "size" else "checksum mismatch") in result.stderr


@pytest.mark.parametrize("stack", STACKS)
def test_strict_meeting_a_bad_image_is_one_line_naming_it(stack, synthetic_data_dir, tmp_path):
    shutil.copytree(synthetic_data_dir / "synthetic-tiny-seed0", tmp_path / "synthetic-tiny-seed0")
    broken = tmp_path / "synthetic-tiny-seed0" / "train" / "n01440764" / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff not really a JPEG")
    result = _train(stack, tmp_path, tmp_path / "runs", "--strict")
    _assert_one_line_error(result, stack, "--strict", broken)


@pytest.mark.usefixtures("prepared_data")  # the smoke preset's cache is built: the run gets as far as its folder
@pytest.mark.parametrize("stack", STACKS)
def test_logdir_that_cannot_be_written_is_one_line_naming_it(stack, synthetic_data_dir, tmp_path):
    # Below a regular file: no folder can be made there, even by root (whom chmod does not stop).
    (tmp_path / "file").write_text("")
    result = _train(stack, synthetic_data_dir, tmp_path / "file" / "runs")
    _assert_one_line_error(result, stack, "--logdir", tmp_path / "file" / "runs")


def test_data_folder_that_cannot_be_written_is_a_data_error_naming_it(synthetic_data_dir, tmp_path):
    shutil.copytree(synthetic_data_dir / "synthetic-tiny-seed0", tmp_path / "synthetic-tiny-seed0")
    (tmp_path / "cache").write_text("")  # where the decoded cache must go
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'cache'))}: .*--data-dir") as caught:
        prepare_data("synthetic", tmp_path, 16, synthetic_size="tiny", num_workers=1, progress=False)
    assert "\n" not in str(caught.value)


def test_prepare_script_exits_like_the_training_scripts(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as caught:
        prepare_script.main(["--dataset", "synthetic", "--data-dir", str(tmp_path / "file")])
    assert caught.value.code == USAGE_EXIT_CODE
    assert capsys.readouterr().err.strip() == (f"{prepare_script.PROG}: error: --data-dir: {tmp_path / 'file'} "
                                               "exists but is not a folder; point it at a folder")
