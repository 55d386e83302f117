"""tools/evaluate.py: the same scores from either stack on the same weights, run folders, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools import evaluate
from tests import weights_fixtures

DATA_FLAGS = ["--dataset", "synthetic", "--synthetic-size", "tiny", "--img-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """Random nano weights with a 10-class head, in the official format."""
    path = tmp_path_factory.mktemp("weights") / "nano.pth"
    weights = weights_fixtures.random_weights(4)
    torch.save({"model": {key: torch.from_numpy(value) for key, value in weights.items()}}, path)
    return path


def _evaluate(source: Path, out: Path, *flags: str) -> dict:
    assert evaluate.main([str(source), "--out", str(out), *flags]) == 0
    assert (out / evaluate.CONFUSION_FILE).read_bytes().startswith(b"\x89PNG")
    return json.loads((out / evaluate.RESULT_FILE).read_text())


def test_both_stacks_give_the_same_accuracy_on_the_same_weights(weights_file, synthetic_data_dir, tmp_path):
    results = {
        stack: _evaluate(weights_file, tmp_path / stack, "--stack", stack, "--model", weights_fixtures.NANO,
                         "--data-dir", str(synthetic_data_dir), *DATA_FLAGS)
        for stack in evaluate.STACKS}
    torch_result, flax_result = results["lightning"], results["flax"]
    assert torch_result["images"] == flax_result["images"] == 100  # every validation image once, padding dropped
    assert sum(sum(row) for row in torch_result["confusion_matrix"]) == 100
    for key in ("top1", "top5", "confusion_matrix", "per_class"):
        assert torch_result[key] == flax_result[key], key
    assert abs(torch_result["loss"] - flax_result["loss"]) <= 1e-4
    assert [entry["class_name"] for entry in torch_result["per_class"]][0] == "tench"


def test_a_run_folder_supplies_the_model_and_data_and_its_checkpoint_is_chosen(synthetic_data_dir, tmp_path):
    config = {"model": weights_fixtures.NANO, "img_size": 64, "dataset": "synthetic", "synthetic_size": "tiny",
              "data_dir": str(synthetic_data_dir), "seed": 0}
    run = weights_fixtures.write_flax_run(tmp_path / "flax" / "run", [(6, weights_fixtures.random_weights(6), 0.5),
                                                               (12, weights_fixtures.random_weights(12), 0.2)], config)
    best = _evaluate(run, tmp_path / "best", "--stack", "lightning", "--no-progress")
    latest = _evaluate(run, tmp_path / "latest", "--stack", "lightning", "--checkpoint", "latest", "--no-progress")
    named = _evaluate(run, tmp_path / "named", "--stack", "lightning", "--checkpoint", "12", "--no-progress")
    assert best["source"] == str(run / "checkpoints" / "6") and best["format"] == "flax"
    assert latest["source"] == named["source"] == str(run / "checkpoints" / "12")
    assert latest["confusion_matrix"] == named["confusion_matrix"] != best["confusion_matrix"]
    assert best["model"] == weights_fixtures.NANO and best["dataset"] == "synthetic" and best["images"] == 100


@pytest.mark.parametrize("problem", ["no-model", "bad-checkpoint", "bad-stack", "head-size"])
def test_bad_flags_and_unfitting_weights_exit_2_with_one_line(problem, weights_file, synthetic_data_dir, tmp_path,
                                                             capsys):
    data = ["--data-dir", str(synthetic_data_dir), *DATA_FLAGS]
    if problem == "head-size":
        imagenet = tmp_path / "imagenet.pth"
        weights = weights_fixtures.random_weights(1, num_classes=1000)
        torch.save({"model": {key: torch.from_numpy(value) for key, value in weights.items()}}, imagenet)
    argv = {
        "no-model": [str(weights_file), *data],
        "bad-checkpoint": [str(weights_file), "--model", weights_fixtures.NANO, "--checkpoint", "worst", *data],
        "bad-stack": [str(weights_file), "--model", weights_fixtures.NANO, "--stack", "jax", *data],
        "head-size": [str(tmp_path / "imagenet.pth"), "--model", weights_fixtures.NANO, *data],
    }[problem]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("evaluate.py: error:"), errors
    expected = {"no-model": "--model", "bad-checkpoint": "--checkpoint", "bad-stack": "--stack",
                "head-size": "1000 classes but synthetic has 10"}[problem]
    assert expected in errors[0]
    assert not (tmp_path / "out").exists()
