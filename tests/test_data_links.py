"""Symbolic links in a dataset: those that leave it are refused and reported, dangling ones reported, others read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared_data.decode import CorruptImageError
from shared_data.prepare import prepare_data

WNID = "n01440764"


@pytest.fixture
def release(synthetic_data_dir, tmp_path) -> Path:
    """The tiny synthetic set copied as an extracted imagenette-160 release, free to modify."""
    return shutil.copytree(synthetic_data_dir / "synthetic-tiny-seed0", tmp_path / "data" / "imagenette2-160")


def _prepare(data_dir: Path, **kwargs):
    return prepare_data("imagenette-160", data_dir, 32, allow_download=False, num_workers=2, progress=False, **kwargs)


def test_link_leaving_the_dataset_is_refused_and_dangling_link_reported(release, tmp_path):
    a_class = release / "train" / WNID
    first = min(a_class.iterdir())
    outside = shutil.copy(first, tmp_path / "elsewhere.JPEG")  # a good image: only the link's target is wrong
    (a_class / "outside.JPEG").symlink_to(outside)
    (a_class / "dangling.JPEG").symlink_to(tmp_path / "deleted.JPEG")
    (a_class / "inside.JPEG").symlink_to(first.name)  # to a file of the dataset itself: read like any other
    data = _prepare(release.parent)
    reasons = {entry["path"]: entry["reason"] for entry in data.report()["skipped"]}
    refused, dangling, inside = (f"train/{WNID}/{name}.JPEG" for name in ("outside", "dangling", "inside"))
    assert set(reasons) == {refused, dangling}
    assert "outside the dataset" in reasons[refused] and str(outside) in reasons[refused]
    assert "dangling" in reasons[dangling]
    assert refused not in data.train.files and inside in data.train.files
    assert len(data.train) == 201


def test_dataset_folder_that_is_itself_a_link_is_read_in_full(release, tmp_path):
    bigger_disk = tmp_path / "bigger-disk"
    bigger_disk.mkdir()
    moved = shutil.move(release, bigger_disk / release.name)
    (tmp_path / "data" / release.name).symlink_to(moved, target_is_directory=True)
    data = _prepare(tmp_path / "data")
    assert data.skipped == [] and len(data.train) == 200 and len(data.val) == 100


def test_strict_stops_at_a_link_leaving_the_dataset(release, tmp_path):
    outside = shutil.copy(min((release / "val" / WNID).iterdir()), tmp_path / "elsewhere.JPEG")
    (release / "val" / WNID / "outside.JPEG").symlink_to(outside)
    with pytest.raises(CorruptImageError, match="--strict: .*outside.JPEG.*outside the dataset") as caught:
        _prepare(release.parent, strict=True)
    assert "\n" not in str(caught.value)
