"""prepare_data: real release layout, class order, fallback to synthetic, noisy labels, argument errors."""

from __future__ import annotations

import csv
import dataclasses
import shutil

import numpy as np
import pytest

from tools import prepare_data as prepare_script
from shared_data import registry
from shared_data.errors import ConfigError
from shared_data.prepare import prepare_data

IMAGENETTE_NAMES = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                    "garbage truck", "gas pump", "golf ball", "parachute"]


def test_classes_are_sorted_wnids_with_human_names(prepared_data):
    assert list(prepared_data.class_ids) == sorted(prepared_data.class_ids)
    assert prepared_data.class_ids[0] == "n01440764" and prepared_data.class_ids[-1] == "n03888605"
    assert list(prepared_data.class_names) == IMAGENETTE_NAMES and prepared_data.num_classes == 10
    woof = registry.get_spec("imagewoof-160")
    assert list(woof.class_ids) == sorted(woof.class_ids) and "golden retriever" in woof.class_names


def test_splits_are_the_release_folders_in_sorted_order(prepared_data):
    for name, split, per_class in (("train", prepared_data.train, 20), ("val", prepared_data.val, 10)):
        assert all(f.startswith(f"{name}/") for f in split.files)
        assert split.files == sorted(split.files)  # class folder, then file name
        assert np.array_equal(split.labels, np.repeat(np.arange(10, dtype=np.int32), per_class))
        assert [prepared_data.class_ids[label] for label in split.labels] == [f.split("/")[1] for f in split.files]
        assert split.images.shape == (len(split.files), 73, 73, 3) and split.images.dtype == np.uint8
    assert prepared_data.dataset == "synthetic" and not prepared_data.fell_back


def test_extracted_real_release_is_used_and_broken_files_reported(synthetic_data_dir, tmp_path):
    release = shutil.copytree(synthetic_data_dir / "synthetic-tiny-seed0", tmp_path / "imagenette2-160")
    (release / "val" / "n03028079" / "broken.JPEG").write_bytes(b"\xff\xd8\xff not really")
    data = prepare_data("imagenette-160", tmp_path, 32, allow_download=False, progress=False)
    assert data.dataset == "imagenette-160" and not data.fell_back and data.root == release
    assert len(data.train) == 200 and len(data.val) == 100
    assert [s.path for s in data.skipped] == ["val/n03028079/broken.JPEG"]
    assert data.report()["skipped"][0]["path"] == "val/n03028079/broken.JPEG"


def test_unavailable_dataset_falls_back_to_synthetic_loudly(synthetic_data_dir, monkeypatch, capsys):
    spec = registry.get_spec("imagenette-320")
    monkeypatch.setitem(registry.DATASETS, "imagenette-320",
                        dataclasses.replace(spec, url="http://127.0.0.1:9/imagenette2-320.tgz"))
    data = prepare_data("imagenette-320", synthetic_data_dir, 64, synthetic_size="tiny", progress=False)
    assert data.fell_back and data.dataset == "synthetic" and len(data.train) == 200
    err = capsys.readouterr().err
    assert "warning: dataset 'imagenette-320' is unavailable, so this run uses the SYNTHETIC dataset" in err
    assert str(synthetic_data_dir / "imagenette2-320.tgz") in err


def test_noisy_labels_come_from_the_release_csv_for_training_only(synthetic_data_dir, prepared_data):
    noisy = prepare_data("synthetic", synthetic_data_dir, 64, synthetic_size="tiny", noisy_labels=50, progress=False)
    with open(synthetic_data_dir / "synthetic-tiny-seed0" / "noisy_imagenette.csv", newline="") as handle:
        listed = {row["path"]: row["noisy_labels_50"] for row in csv.DictReader(handle)}
    assert [noisy.class_ids[label] for label in noisy.train.labels] == [listed[f] for f in noisy.train.files]
    changed = (noisy.train.labels != prepared_data.train.labels).mean()
    assert 0.3 < changed < 0.7
    assert np.array_equal(noisy.val.labels, prepared_data.val.labels)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(dataset="imagenet"), "--dataset"),
    (dict(noisy_labels=3), "--noisy-labels"),
    (dict(synthetic_size="huge"), "--synthetic-size"),
    (dict(img_size=0), "--img-size"),
])
def test_bad_arguments_raise_one_line_errors_naming_the_flag(tmp_path, kwargs, flag):
    arguments = dict(dataset="synthetic", data_dir=tmp_path, progress=False) | kwargs
    with pytest.raises(ConfigError, match=flag) as caught:
        prepare_data(**arguments)
    assert "\n" not in str(caught.value)


def test_data_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--data-dir"):
        prepare_data("synthetic", tmp_path / "file", progress=False)


def test_bad_archive_in_data_dir_is_a_one_line_error_not_a_fallback(tmp_path):
    (tmp_path / "imagenette2-160.tgz").write_bytes(b"not the release")
    with pytest.raises(ConfigError, match="--data-dir: .*imagenette2-160.tgz") as caught:
        prepare_data("imagenette-160", tmp_path, 64, allow_download=False, progress=False)
    assert "\n" not in str(caught.value)


def test_prepare_script_prints_counts_and_skipped(synthetic_data_dir, capsys):
    prepare_script.main(["--dataset", "synthetic", "--data-dir", str(synthetic_data_dir), "--img-size", "64",
                         "--synthetic-size", "tiny"])
    out = capsys.readouterr().out
    assert "n01440764   tench" in out and "total" in out and "skipped 0 file(s)" in out and "MiB" in out
