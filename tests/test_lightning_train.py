"""Lightning stack: smoke training, TensorBoard tags, schedule, determinism, DDP parity, flag checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_swin.checkpointing import list_checkpoints
from lightning_swin.configs import default
from lightning_swin.datamodule import EpochBatchSampler, ResumableLoader, TrainBatches
from lightning_swin.module import learning_rate_schedule
from lightning_swin.train import train_and_evaluate
from shared_data import run_config, tags
from tests import stacks

main = stacks.script_main("train_lightning")  # scripts/train_lightning.py's main(argv)

REPO = Path(__file__).resolve().parents[1]
# Small and fast: the nano model at 64 px on the session's tiny synthetic set (200 train, 100 val images).
FAST = ["--dataset", "synthetic", "--synthetic-size", "tiny", "--model", "swinv2_nano_window4_64", "--img-size", "64",
        "--num-workers", "0", "--lr", "2e-3", "--warmup-epochs", "0.5"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def config_from_flags(argv: list[str]) -> dict:
    """The resolved config scripts/train_lightning.py builds from these flags."""
    return default.resolve(vars(run_config.build_parser(default.STACK, default.add_stack_flags).parse_args(argv)))


def run_training(logdir: Path, data_dir: Path, *flags: str, run_name: str = "run", callbacks=()) -> dict:
    config = config_from_flags([*FAST, "--data-dir", str(data_dir), "--logdir", str(logdir), "--run-name", run_name,
                                *flags])
    return train_and_evaluate(config, config["run_dir"], callbacks)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three epochs of the smoke preset, as a user types it, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("smoke")
    with stacks.torch_threads(1):
        code = main(["--preset", "smoke", "--epochs", "3", "--num-workers", "0", "--data-dir", str(root / "data"),
                     "--logdir", str(root / "runs"), "--run-name", "smoke"])
    assert code == 0
    return root / "runs" / "lightning" / "smoke"


def test_smoke_preset_loss_falls_and_accuracy_is_well_above_chance(smoke_run):
    values = scalars(smoke_run)
    losses = [v for _, v in values[tags.TRAIN_LOSS]]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["final_val_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert summary["epochs_completed"] == 3 and summary["steps"] == 3 * 31
    assert summary["best_val_accuracy"] >= summary["final_val_accuracy"]


def test_every_shared_tag_is_written_on_its_step_axis(smoke_run):
    values = scalars(smoke_run)
    missing = [tag for tag in tags.REQUIRED if tag not in values]
    assert not missing
    for tag in tags.PER_STEP:
        assert [step for step, _ in values[tag]] == list(range(1, 3 * 31 + 1)), tag
    for tag in tags.PER_EPOCH:
        assert [step for step, _ in values[tag]] == [1, 2, 3], tag
    assert values[tags.FIRST_STEP_TIME][0][0] == 1
    for step_time, wait, compute in zip(values[tags.STEP_TIME], values[tags.DATA_WAIT_TIME], values[tags.COMPUTE_TIME]):
        assert step_time[1] == pytest.approx(wait[1] + compute[1], rel=1e-5, abs=1e-6)


def test_run_folder_holds_config_summary_and_best_plus_latest_checkpoints(smoke_run):
    config = json.loads((smoke_run / "config.json").read_text())
    for key in ("dataset", "dataset_requested", "fell_back", "device", "versions", "num_params", "compile",
                "steps_per_epoch", "num_devices", "lr", "model"):
        assert key in config, key
    assert config["stack"] == "lightning" and config["steps_per_epoch"] == 31
    assert (smoke_run / "data_report.json").is_file()
    names = sorted(info.path.name for info in list_checkpoints(smoke_run))
    assert len(names) == 2
    assert names[1] == "last-epoch=003-step=000093.ckpt" and names[0].startswith("best-")


@pytest.mark.slow
def test_smoke_preset_script_finishes_within_two_minutes_well_above_chance(tmp_path):
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_lightning.py"), "--preset", "smoke", "--data-dir",
         str(tmp_path / "data"), "--logdir", str(tmp_path / "runs"), "--run-name", "smoke"],
        capture_output=True, text=True, timeout=600,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "lightning" / "smoke" / "summary.json").read_text())
    assert summary["final_val_accuracy"] > 0.4
    assert elapsed < 120


def test_learning_rate_schedule_matches_the_shared_reference():
    config = run_config.resolve({"model": "swinv2_nano_window4_64", "batch_size": 32, "epochs": 3, "lr": 1e-3,
                                 "warmup_epochs": 1.0}, "lightning")
    steps_per_epoch = 7
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=config["lr"])
    scheduler = learning_rate_schedule(optimizer, config, steps_per_epoch)
    for step in range(run_config.total_steps(config, steps_per_epoch)):
        expected = run_config.learning_rate(step, config, steps_per_epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6), step
        optimizer.step()
        scheduler.step()


def test_loader_state_resumes_after_the_batches_already_taken(prepared_data):
    dataset = TrainBatches(prepared_data.train, seed=0, batch_size=16, img_size=64)
    sampler = EpochBatchSampler(len(dataset))
    sampler.set_epoch(2)
    loader = ResumableLoader(dataset, sampler)
    taken = []
    for i, (images, labels) in enumerate(loader):
        taken.append(labels)
        if i == 4:
            break
    assert loader.state_dict() == {"epoch": 2, "next_index": 5}
    resumed = ResumableLoader(dataset, EpochBatchSampler(len(dataset)))
    resumed.load_state_dict(loader.state_dict())
    resumed.sampler.set_epoch(2)  # Lightning calls this again for the same epoch
    rest = [labels for _, labels in resumed]
    assert len(rest) == len(dataset) - 5
    expected = [labels for _, labels in (dataset[(2, i)] for i in range(5, len(dataset)))]
    assert all(torch.equal(a, b) for a, b in zip(rest, expected))
    resumed.sampler.set_epoch(3)  # the offset belonged to epoch 2 only
    assert len(list(resumed)) == len(dataset)


def test_deterministic_runs_with_the_same_seed_give_identical_losses(tmp_path, synthetic_data_dir):
    flags = ["--deterministic", "--max-steps", "4", "--batch-size", "16", "--drop-path", "0.1"]
    run_training(tmp_path, synthetic_data_dir, *flags, run_name="a")
    run_training(tmp_path, synthetic_data_dir, *flags, run_name="b")
    a = scalars(tmp_path / "lightning" / "a")[tags.TRAIN_LOSS]
    b = scalars(tmp_path / "lightning" / "b")[tags.TRAIN_LOSS]
    assert len(a) == 4 and a == b


def test_bf16_trains_bf16_activations_on_float32_weights(tmp_path, synthetic_data_dir):
    run_training(tmp_path, synthetic_data_dir, "--precision", "bf16", "--max-steps", "2", "--batch-size", "32")
    run_dir = tmp_path / "lightning" / "run"
    losses = [v for _, v in scalars(run_dir)[tags.TRAIN_LOSS]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    last = [i for i in list_checkpoints(run_dir) if i.role == "last"][0]
    weights = torch.load(last.path, map_location="cpu", weights_only=False)["state_dict"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("flags, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--devices", "0"], "--devices"),
    (["--batch-size", "31", "--devices", "2"], "--batch-size"),
    (["--model", "swinv2_giant"], "--model"),
    (["--img-size", "60"], "--img-size"),
])
def test_bad_flag_fails_before_reading_data_and_names_the_flag(tmp_path, capsys, flags, flag):
    data_dir = tmp_path / "data"
    argv = [*FAST, "--data-dir", str(data_dir), "--logdir", str(tmp_path / "runs"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in error_line
    assert not data_dir.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow  # 18 s; tests/test_multi_process.py covers two Lightning nodes by default
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, synthetic_data_dir):
    flags = ["--max-steps", "3", "--batch-size", "16", "--drop-path", "0", "--epochs", "1"]
    argv = [*FAST, "--data-dir", str(synthetic_data_dir), "--logdir", str(tmp_path), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    ddp = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_lightning.py"), *argv, "--run-name", "ddp",
         "--accelerator", "cpu", "--devices", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = config_from_flags([*argv, "--run-name", "single", "--accelerator", "cpu"])
    train_and_evaluate(single, single["run_dir"])
    two = scalars(tmp_path / "lightning" / "ddp")
    one = scalars(tmp_path / "lightning" / "single")
    assert [s for s, _ in two[tags.TRAIN_LOSS]] == [s for s, _ in one[tags.TRAIN_LOSS]] == [1, 2, 3]
    for (_, a), (_, b) in zip(two[tags.TRAIN_LOSS], one[tags.TRAIN_LOSS]):
        assert a == pytest.approx(b, rel=1e-5)
    # The final validation covers every image once even where a shard of the padded last batch is all padding.
    for tag in (tags.VAL_LOSS, tags.VAL_ACCURACY, tags.VAL_ACCURACY_TOP5):
        assert two[tag][-1][1] == pytest.approx(one[tag][-1][1], rel=1e-4), tag
    assert json.loads((tmp_path / "lightning" / "ddp" / "config.json").read_text())["num_devices"] == 2
