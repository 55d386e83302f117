"""Lightning stack checkpoints: retention, trash-safe deletion, exact mid-epoch resume, NaN and disk-full stops,
checksums, damaged and unreadable checkpoints on resume."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_swin import checkpointing
from lightning_swin.checkpointing import leftovers, list_checkpoints, resume_point, verify_checkpoint
from lightning_swin.configs import default
from lightning_swin.train import train_and_evaluate
from tools import checkpoints as tool
from shared_data import checksums, errors, run_config
from shared_data.errors import CheckpointDamagedError, CheckpointError
from tests import stacks

main = stacks.script_main("train_lightning")  # scripts/train_lightning.py's main(argv)

# The nano model at 64 px on the session's tiny synthetic set: 200 train images, so 6 steps of 32 per epoch.
FAST = ["--dataset", "synthetic", "--synthetic-size", "tiny", "--model", "swinv2_nano_window4_64", "--img-size", "64",
        "--num-workers", "0", "--batch-size", "32", "--lr", "2e-3", "--warmup-epochs", "0.5"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def argv(logdir: Path, data_dir: Path, *flags: str, run_name: str = "run") -> list[str]:
    return [*FAST, "--data-dir", str(data_dir), "--logdir", str(logdir), "--run-name", run_name, *flags]


def run_training(logdir: Path, data_dir: Path, *flags: str, run_name: str = "run", callbacks=()) -> dict:
    parser = run_config.build_parser(default.STACK, default.add_stack_flags)
    config = default.resolve(vars(parser.parse_args(argv(logdir, data_dir, *flags, run_name=run_name))))
    return train_and_evaluate(config, config["run_dir"], callbacks)


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpointing.checkpoint_dir(run_dir).iterdir())


class Interrupt(Exception):
    """Stands in for a killed process."""


class InterruptBeforeStep(pl.Callback):
    def __init__(self, step: int, error: type[BaseException] = Interrupt) -> None:
        self.step = step
        self.error = error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            raise self.error(f"interrupted before step {self.step}")


class NanWeightsBeforeStep(pl.Callback):
    """Fills the weights with NaN just before step `step`, so that step's real loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))


@pytest.mark.parametrize("keep", [1, 3])
def test_retention_keeps_the_best_and_the_latest_only(tmp_path, synthetic_data_dir, keep):
    summary = run_training(tmp_path, synthetic_data_dir, "--epochs", "3", "--keep-checkpoints", str(keep),
                           "--checkpoint-every-steps", "4")
    run_dir = tmp_path / "lightning" / "run"
    infos = list_checkpoints(run_dir)
    assert all(info.complete for info in infos) and not leftovers(run_dir)
    assert [i.path.name for i in infos if i.role == "last"] == ["last-epoch=003-step=000018.ckpt"]
    best = [i for i in infos if i.role == "best"]
    assert len(infos) == keep and len(best) == keep - 1
    if best:
        assert max(i.val_accuracy for i in best) == pytest.approx(summary["best_val_accuracy"], abs=1e-4)


def test_deleted_checkpoints_and_leftovers_leave_only_empty_files_in_the_trash(tmp_path, synthetic_data_dir, trash):
    run_training(tmp_path, synthetic_data_dir, "--max-steps", "6", "--keep-checkpoints", "1",
                 "--checkpoint-every-steps", "1")
    run_dir = tmp_path / "lightning" / "run"
    # A save killed half-way, as a previous process would have left it.
    partial = checkpointing.checkpoint_dir(run_dir) / ".last-epoch=001-step=000007.ckpt.x1y2z3.tmp"
    partial.write_bytes(b"half a checkpoint" * 1000)
    assert leftovers(run_dir) == [partial]
    run_training(tmp_path, synthetic_data_dir, "--max-steps", "6", "--keep-checkpoints", "1",
                 "--checkpoint-every-steps", "1", "--resume")
    trashed = list(trash.iterdir())
    assert len(trashed) >= 5  # five superseded checkpoints and the partial save
    assert [p.name for p in trashed if p.stat().st_size] == []
    assert any(p.name.endswith(partial.name) for p in trashed)
    assert names(run_dir) == ["last-epoch=001-step=000006.ckpt", "last-epoch=001-step=000006.ckpt.sha256"]
    assert not [p for p in run_dir.rglob("*") if p.is_dir() and p.name != "checkpoints"]


@pytest.mark.parametrize("interrupt_before", [10, 8], ids=["mid-epoch", "after-epoch-end"])
def test_resume_mid_epoch_matches_uninterrupted(tmp_path, synthetic_data_dir, interrupt_before):
    # Drop path on and a data worker running ahead: the random streams and the data position must both resume.
    flags = ["--epochs", "2", "--checkpoint-every-steps", "2", "--drop-path", "0.1", "--num-workers", "1",
             "--keep-checkpoints", "3"]
    straight_summary = run_training(tmp_path, synthetic_data_dir, *flags, run_name="straight")
    with pytest.raises(Interrupt):
        run_training(tmp_path, synthetic_data_dir, *flags, run_name="cut",
                     callbacks=[InterruptBeforeStep(interrupt_before)])
    cut_dir = tmp_path / "lightning" / "cut"
    resumed_from, _ = resume_point(cut_dir)
    assert resumed_from.name.startswith("last-") and f"step={interrupt_before - 2:06d}" in resumed_from.name
    resumed_summary = run_training(tmp_path, synthetic_data_dir, *flags, "--resume", run_name="cut")
    # The file it resumed from is gone too: the same checkpoints, and the same epochs in the summary.
    assert names(cut_dir) == names(tmp_path / "lightning" / "straight")
    assert resumed_summary["best_val_accuracy"] == straight_summary["best_val_accuracy"]
    assert resumed_summary["final_val_accuracy"] == straight_summary["final_val_accuracy"]
    final = "last-epoch=002-step=000012.ckpt"
    straight = verify_checkpoint(tmp_path / "lightning" / "straight" / "checkpoints" / final)
    resumed = verify_checkpoint(cut_dir / "checkpoints" / final)
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    assert straight["lr_schedulers"][0]["_last_lr"] == resumed["lr_schedulers"][0]["_last_lr"]


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint_loadable(tmp_path, synthetic_data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        errors.exit_on_error("train_lightning.py", lambda: run_training(
            tmp_path, synthetic_data_dir, "--epochs", "2", "--checkpoint-every-steps", "2",
            callbacks=[NanWeightsBeforeStep(5)]))
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "lightning" / "run"
    assert "non-finite training loss (nan) at step 5" in message
    assert "last good checkpoint: " + str(checkpointing.checkpoint_dir(run_dir) / "last-epoch=001-step=000004.ckpt") in message
    infos = [i for i in list_checkpoints(run_dir) if i.complete]
    assert [i.step for i in infos] == [4]
    checkpoint = verify_checkpoint(infos[0].path)
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())
    assert not (run_dir / "summary.json").exists()


def test_ctrl_c_exits_130_with_the_flags_that_continue_the_run(tmp_path, synthetic_data_dir, capsys):
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C while it shuts down
    try:
        with pytest.raises(SystemExit) as exit_info:
            errors.exit_on_error("train_lightning.py", lambda: run_training(
                tmp_path, synthetic_data_dir, "--max-steps", "4", callbacks=[InterruptBeforeStep(3, KeyboardInterrupt)]),
                "run")
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train_lightning.py: interrupted; continue with --resume --run-name run")


def test_damaged_latest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, synthetic_data_dir, capsys):
    run_training(tmp_path, synthetic_data_dir, "--max-steps", "4", "--checkpoint-every-steps", "2",
                 "--keep-checkpoints", "3")
    run_dir = tmp_path / "lightning" / "run"
    newest = list_checkpoints(run_dir)[-1].path
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=newest.name):
        verify_checkpoint(newest)
    chosen, damaged = resume_point(run_dir)
    assert f"warning: skipping damaged checkpoint: {newest}" in capsys.readouterr().err
    assert chosen is not None and chosen != newest and verify_checkpoint(chosen)["global_step"] > 0
    assert damaged == [newest]


def test_disk_full_during_a_save_stops_with_one_line_and_keeps_the_previous(tmp_path, synthetic_data_dir, monkeypatch,
                                                                            capsys):
    real_write = checkpointing.atomic_write_bytes
    saves = []

    def fill_disk_on_second_save(path, data):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(checkpointing, "atomic_write_bytes", fill_disk_on_second_save)
    with pytest.raises(SystemExit) as exit_info:
        main(argv(tmp_path, synthetic_data_dir, "--max-steps", "6", "--checkpoint-every-steps", "2"))
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train_lightning.py: error: disk full while saving the checkpoint of step 4 in ")
    assert "--resume" in message
    infos = list_checkpoints(tmp_path / "lightning" / "run")
    assert [i.step for i in infos] == [2] and all(i.complete for i in infos)
    verify_checkpoint(infos[0].path)


# ------------------------------------------------------------------------------------------------
# Checksums: what a resume does with a damaged, unreadable or older checkpoint.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_data_dir) -> Path:
    """One epoch (6 steps) saved every 2 steps, keeping 3: best and last of step 6, and step 4's step save."""
    logdir = tmp_path_factory.mktemp("finished")
    with stacks.torch_threads(1):
        run_training(logdir, synthetic_data_dir, "--epochs", "1", "--checkpoint-every-steps", "2",
                     "--keep-checkpoints", "3")
    return logdir / "lightning" / "run"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "lightning" / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # the middle of the file: inside the largest tensors' bytes
    path.write_bytes(bytes(data))


def _complete(run_dir: Path) -> list[Path]:
    return [info.path for info in list_checkpoints(run_dir) if info.complete]


def test_each_checkpoint_has_a_checksum_sidecar_written_with_it(finished_run):
    for path in _complete(finished_run):
        assert checksums.sidecar(path).read_text() == f"{checksums.digest_file(path)}  {path.name}\n"
    assert leftovers(finished_run) == []


def test_a_flipped_byte_inside_a_tensor_is_found_by_verify_and_skipped_by_resume(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    newest = _complete(run_dir)[-1]
    _flip_a_byte(newest)
    torch.load(newest, map_location="cpu", weights_only=False)  # still loads: only the checksum tells
    with pytest.raises(CheckpointDamagedError, match=f"{newest.name} is damaged: it differs from what was saved"):
        verify_checkpoint(newest)
    chosen, damaged = resume_point(run_dir)
    assert damaged == [newest] and chosen == _complete(run_dir)[-2]
    assert re.search(f"^warning: skipping damaged checkpoint: .*{newest.name}", capsys.readouterr().err, re.M)


def test_a_damaged_checkpoint_skipped_on_resume_is_gone_once_the_run_succeeds(finished_run, tmp_path,
                                                                              synthetic_data_dir, capsys):
    run_dir = _copy(finished_run, tmp_path)
    newest = _complete(run_dir)[-1]
    _flip_a_byte(newest)
    run_training(tmp_path, synthetic_data_dir, "--epochs", "2", "--checkpoint-every-steps", "2",
                 "--keep-checkpoints", "3", "--resume")
    assert f"skipping damaged checkpoint: {newest}" in capsys.readouterr().err
    assert not newest.exists() and not checksums.sidecar(newest).exists()
    assert len(_complete(run_dir)) == 3 and leftovers(run_dir) == []
    assert tool.main(["verify", str(run_dir)]) == 0


def test_a_checkpoint_whose_checksums_are_missing_stops_the_resume_and_is_kept(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    newest = _complete(run_dir)[-1]
    checksums.sidecar(newest).unlink()
    with pytest.raises(CheckpointError, match=f"{newest.name} has no checksums"):
        verify_checkpoint(newest)
    before = names(run_dir)
    with pytest.raises(CheckpointError, match="has no checksums"):
        resume_point(run_dir)
    assert names(run_dir) == before, "not proven damaged: nothing is skipped or deleted"


def _failing_reads(monkeypatch, failures: int) -> None:
    """The first `failures` file reads of checksums.digest_file fail with EIO, as a flaky disk's do."""
    calls = iter(range(10**9))
    real = checksums.digest_file

    def flaky(path):
        if next(calls) < failures:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path)

    monkeypatch.setattr(checksums, "digest_file", flaky)
    monkeypatch.setattr(checksums, "RETRY_DELAY_S", 0.0)


def test_a_transient_read_error_is_retried_and_the_newest_checkpoint_used(finished_run, tmp_path, monkeypatch):
    run_dir = _copy(finished_run, tmp_path)
    _failing_reads(monkeypatch, failures=checksums.READ_ATTEMPTS - 1)
    assert resume_point(run_dir) == (_complete(run_dir)[-1], [])


def test_a_read_error_that_persists_stops_the_resume_in_one_line_and_skips_nothing(finished_run, tmp_path,
                                                                                   monkeypatch):
    run_dir = _copy(finished_run, tmp_path)
    before = names(run_dir)
    _failing_reads(monkeypatch, failures=10**6)
    with pytest.raises(CheckpointError) as raised:
        resume_point(run_dir)
    message = str(raised.value)
    assert not isinstance(raised.value, CheckpointDamagedError) and "\n" not in message
    assert f"{_complete(run_dir)[-1].name} could not be read after 3 attempts" in message
    assert names(run_dir) == before


def test_when_every_checkpoint_is_damaged_resume_stops_and_deletes_none(finished_run, tmp_path, synthetic_data_dir,
                                                                        capsys):
    run_dir = _copy(finished_run, tmp_path)
    for path in _complete(run_dir):
        _flip_a_byte(path)
    before = names(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(argv(tmp_path, synthetic_data_dir, "--epochs", "2", "--checkpoint-every-steps", "2",
                  "--keep-checkpoints", "3", "--resume"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "every checkpoint in" in err[-1] and any(line.startswith("warning: skipping damaged") for line in err)
    assert names(run_dir) == before


class ChangeTheHead(pl.Callback):
    """Stands in for a code change: before the checkpoint is restored, the model gets a head of another shape."""

    def setup(self, trainer, pl_module, stage):
        pl_module.model.head = torch.nn.Linear(pl_module.model.head.in_features, 7)


def test_a_checkpoint_that_does_not_fit_the_model_stops_the_resume_naming_the_keys(finished_run, tmp_path,
                                                                                     synthetic_data_dir):
    run_dir = _copy(finished_run, tmp_path)
    before = names(run_dir)
    with pytest.raises(CheckpointError, match=r"does not fit the model being trained: model\.head\.bias has shape "
                                              r"\(10,\) in the checkpoint, \(7,\) now, model\.head\.weight has shape"):
        run_training(tmp_path, synthetic_data_dir, "--epochs", "2", "--keep-checkpoints", "3", "--resume",
                     callbacks=[ChangeTheHead()])
    assert names(run_dir) == before

