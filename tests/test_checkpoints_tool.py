"""scripts/checkpoints.py and tools/checkpoints.py: listing, verifying, pruning and cleaning runs of both stacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from shared_data.clock import Sections
from shared_data.retention import CheckpointInfo
from tools import checkpoints as tool

# ---------------------------------------------------------------------------------------------
# A stand-in backend with the stacks' contract, so the tool's own logic is pinned without training.
# File layout: checkpoints/step=<step>-epoch=<epoch>-acc=<acc|none>.ckpt, and ".tmp" leftovers.


class FakeRestoreError(Exception):
    pass


def _fake_backend(kind: str) -> types.ModuleType:
    module = types.ModuleType(f"fake_{kind}_checkpointing")

    def list_checkpoints(run_dir):
        infos = []
        for path in sorted((Path(run_dir) / "checkpoints").glob("step=*")):
            fields = dict(part.split("=") for part in path.name.removesuffix(".ckpt").removesuffix(".partial").split("-"))
            acc = None if fields["acc"] == "none" else float(fields["acc"])
            infos.append(CheckpointInfo(path, int(fields["step"]), int(fields["epoch"]), acc, path.stat().st_size,
                                  not path.name.endswith(".partial"), kind))
        return infos

    def verify_checkpoint(path):
        if Path(path).read_bytes().startswith(b"corrupt"):
            raise FakeRestoreError(f"{Path(path).name}: truncated archive")

    def leftovers(run_dir):
        return sorted((Path(run_dir) / "checkpoints").glob("*.tmp"))

    module.list_checkpoints, module.verify_checkpoint, module.leftovers = list_checkpoints, verify_checkpoint, leftovers
    return module


@pytest.fixture
def fake_backends(monkeypatch):
    modules = {stack: _fake_backend(stack) for stack in tool.STACKS}
    for stack, module in modules.items():
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(tool.BACKEND_MODULES, stack, module.__name__)
    return modules


def _make_run(logdir: Path, stack: str, name: str, checkpoints: list[tuple[int, int, float | None]],
              leftovers: int = 0, size: int = 1000) -> Path:
    run = logdir / stack / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"stack": stack}))
    for step, epoch, acc in checkpoints:
        tag = "none" if acc is None else f"{acc}"
        (run / "checkpoints" / f"step={step}-epoch={epoch}-acc={tag}.ckpt").write_bytes(b"w" * size)
    for i in range(leftovers):
        (run / "checkpoints" / f".step={100 + i}.ckpt.{i}.tmp").write_bytes(b"p" * size)
    return run


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------


def test_list_shows_step_epoch_accuracy_size_and_completeness(tmp_path, fake_backends, capsys):
    run = _make_run(tmp_path, "lightning", "a", [(2, 0, None), (6, 1, 0.25)], leftovers=1)
    (run / "checkpoints" / "step=8-epoch=1-acc=none.partial").write_bytes(b"x")
    assert tool.main(["list", str(run)]) == 0
    out = capsys.readouterr().out
    assert "lightning/a" in out and "0.2500" in out and "1000 B" in out
    assert "INCOMPLETE" in out and "leftover" in out
    assert "4 entries in 1 run(s)" in out


def test_logdir_target_finds_runs_of_both_stacks(tmp_path, fake_backends):
    _make_run(tmp_path, "lightning", "a", [(2, 0, None)])
    _make_run(tmp_path, "flax", "b", [(2, 0, None)])
    (tmp_path / "flax" / "not-a-run").mkdir()
    runs = tool.find_runs(tmp_path)
    assert [(r.stack, r.path.name) for r in runs] == [("lightning", "a"), ("flax", "b")]
    assert [r.path.name for r in tool.find_runs(tmp_path / "flax")] == ["b"]
    assert tool.find_runs(tmp_path / "flax" / "b" / "checkpoints") == tool.find_runs(tmp_path / "flax" / "b")


def test_missing_path_and_non_run_folder_give_one_line_errors(tmp_path, fake_backends, capsys):
    assert tool.main(["list", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere does not exist" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert tool.main(["verify", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a run folder" in err and "\n" not in err and "Traceback" not in err


def test_run_folder_with_unknown_stack_is_refused(tmp_path, fake_backends, capsys):
    run = tmp_path / "elsewhere" / "r"
    (run / "checkpoints").mkdir(parents=True)
    assert tool.main(["list", str(run)]) == 2
    assert "names no stack" in capsys.readouterr().err


def test_verify_reports_each_failure_with_reason_and_exits_one(tmp_path, fake_backends, capsys):
    run = _make_run(tmp_path, "flax", "a", [(2, 0, None), (4, 0, None), (6, 1, 0.5)])
    (run / "checkpoints" / "step=4-epoch=0-acc=none.ckpt").write_bytes(b"corrupt")
    assert tool.main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "truncated archive" in out
    assert "2 of 3 checkpoints restore; 1 do not" in out


def test_verify_passes_when_all_restore(tmp_path, fake_backends, capsys):
    _make_run(tmp_path, "flax", "a", [(2, 0, None), (6, 1, 0.5)])
    assert tool.main(["verify", str(tmp_path)]) == 0
    assert "2 of 2 checkpoints restore" in capsys.readouterr().out


def test_select_kept_is_the_shared_best_and_latest_rule_or_newest_n():
    def info(step, acc, complete=True):
        return CheckpointInfo(Path(f"s{step}"), step, 0, acc, 1, complete, "flax")

    infos = [info(2, None), info(6, 0.6), info(12, 0.4), info(14, None), info(16, None, complete=False)]
    assert [i.step for i in tool.select_kept(infos)] == [6, 14]
    assert [i.step for i in tool.select_kept(infos, keep=3)] == [6, 12, 14]
    assert [i.step for i in tool.select_kept(infos, keep_newest=3)] == [6, 12, 14]
    # The latest being the best keeps just one; of equal accuracies the earlier step stays, as in both stacks.
    assert [i.step for i in tool.select_kept([info(2, 0.5), info(4, 0.7)])] == [4]
    assert [i.step for i in tool.select_kept([info(2, 0.5), info(4, 0.5), info(6, None)])] == [2, 6]
    assert tool.select_kept([info(2, None, complete=False)]) == []


def test_prune_keeps_best_and_latest_and_reports_bytes_freed(tmp_path, fake_backends, trash, capsys):
    run = _make_run(tmp_path, "lightning", "a", [(2, 0, None), (6, 1, 0.7), (12, 2, 0.3), (14, 2, None)])
    assert tool.main(["prune", str(run)]) == 0
    assert _names(run) == ["step=14-epoch=2-acc=none.ckpt", "step=6-epoch=1-acc=0.7.ckpt"]
    assert "freed 2.0 KiB (2000 bytes)" in capsys.readouterr().out
    trashed = list(trash.iterdir())
    assert len(trashed) == 2 and all(p.stat().st_size == 0 for p in trashed)


def test_prune_keep_newest_across_a_logdir(tmp_path, fake_backends, trash):
    a = _make_run(tmp_path, "lightning", "a", [(2, 0, None), (4, 0, None), (6, 1, 0.9)])
    b = _make_run(tmp_path, "flax", "b", [(2, 0, 0.9), (4, 0, None)])
    assert tool.main(["prune", str(tmp_path), "--keep-newest", "1"]) == 0
    assert _names(a) == ["step=6-epoch=1-acc=0.9.ckpt"]
    assert _names(b) == ["step=4-epoch=0-acc=none.ckpt"]


def test_prune_dry_run_changes_nothing_but_reports_what_it_would_free(tmp_path, fake_backends, trash, capsys):
    run = _make_run(tmp_path, "flax", "a", [(2, 0, None), (4, 0, None), (6, 0, None)])
    before = _names(run)
    assert tool.main(["prune", str(run), "--keep-newest", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _names(run) == before and not list(trash.iterdir())
    assert "would remove 2 item(s); would free 2.0 KiB (2000 bytes)" in out


def test_prune_also_keeps_newest_restorable_when_a_kept_one_is_corrupt(tmp_path, fake_backends, trash, capsys):
    run = _make_run(tmp_path, "flax", "a", [(2, 0, None), (4, 0, None), (6, 0, None)])
    (run / "checkpoints" / "step=6-epoch=0-acc=none.ckpt").write_bytes(b"corrupt")
    assert tool.main(["prune", str(run), "--keep-newest", "1"]) == 0
    assert _names(run) == ["step=4-epoch=0-acc=none.ckpt", "step=6-epoch=0-acc=none.ckpt"]
    assert "also keeping step=4" in capsys.readouterr().out


def test_prune_leaves_incomplete_saves_to_clean(tmp_path, fake_backends, trash):
    run = _make_run(tmp_path, "flax", "a", [(2, 0, None), (4, 0, None)], leftovers=1)
    (run / "checkpoints" / "step=6-epoch=0-acc=none.partial").write_bytes(b"x")
    tool.main(["prune", str(run), "--keep-newest", "1"])
    assert len(_names(run)) == 3
    assert tool.main(["clean", str(run)]) == 0
    assert _names(run) == ["step=4-epoch=0-acc=none.ckpt"]


def test_clean_removes_leftovers_through_trash_safe_deletion(tmp_path, fake_backends, trash, capsys):
    run = _make_run(tmp_path, "lightning", "a", [(2, 0, None)], leftovers=2, size=300)
    assert tool.main(["clean", str(tmp_path), "--dry-run"]) == 0
    assert "would free 600 B (600 bytes)" in capsys.readouterr().out
    assert len(_names(run)) == 3
    assert tool.main(["clean", str(tmp_path)]) == 0
    assert "removed 2 item(s); freed 600 B (600 bytes)" in capsys.readouterr().out
    assert _names(run) == ["step=2-epoch=0-acc=none.ckpt"]
    assert sorted(p.stat().st_size for p in trash.iterdir()) == [0, 0]


def test_missing_backend_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    _make_run(tmp_path, "flax", "a", [(2, 0, None)])
    monkeypatch.setitem(tool.BACKEND_MODULES, "flax", "no_such_package.checkpointing")
    assert tool.main(["list", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_package.checkpointing does not import" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# The same commands on real checkpoints, written by each stack's own saving code.


def _real_lightning_run(logdir: Path) -> Path:
    import torch
    from lightning_swin import checkpointing

    run = logdir / "lightning" / "real"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"stack": "lightning"}))
    io = checkpointing.AtomicCheckpointIO(Sections())
    for name, step, epoch in [("best-epoch=001-step=000006-val_accuracy=0.5000", 6, 1),
                              ("best-epoch=002-step=000012-val_accuracy=0.2500", 12, 2),
                              ("last-epoch=002-step=000012", 12, 2), ("last-epoch=003-step=000014", 14, 3)]:
        checkpoint = {"state_dict": {"w": torch.full((64, 64), float(step))}, "optimizer_states": [],
                      "lr_schedulers": [], "loops": {}, "global_step": step, "epoch": epoch}
        io.save_checkpoint(checkpoint, checkpointing.checkpoint_dir(run) / f"{name}.ckpt")
    # What a save killed mid-write leaves: the staging file of atomic_write_bytes.
    (checkpointing.checkpoint_dir(run) / ".last-epoch=003-step=000016.ckpt.k1ll3d.tmp").write_bytes(b"\0" * 4096)
    return run


def _real_flax_run(logdir: Path) -> Path:
    import jax
    import jax.numpy as jnp
    from flax_swin import checkpointing

    run = logdir / "flax" / "real"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"stack": "flax"}))
    manager = checkpointing.Checkpointer(run, keep=10)
    for step, accuracy in [(2, 0.1), (4, 0.5), (6, 0.3), (8, 0.2)]:
        state = {"step": jnp.asarray(step, jnp.int32), "params": {"w": jax.random.normal(jax.random.key(step), (64, 64))}}
        manager.save(step, state, {"step": step, "epoch": step // 2, checkpointing.VAL_ACCURACY_METRIC: accuracy},
                     accuracy)
    manager.close()
    # What a save killed mid-write leaves: Orbax's temporary step folder.
    partial = checkpointing.checkpoint_dir(run) / f"10{checkpointing.ORBAX_TMP_MARKER}-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "data").write_bytes(b"\0" * 4096)
    return run


def _truncate_largest(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)


@pytest.mark.parametrize("stack", tool.STACKS)
def test_real_checkpoints_list_verify_prune_and_clean(stack, tmp_path, trash, capsys):
    run = {"lightning": _real_lightning_run, "flax": _real_flax_run}[stack](tmp_path)
    backend = tool.backend(stack)
    assert tool.main(["list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{stack}/real") == 5 and ("leftover" in out or "INCOMPLETE" in out)

    assert tool.main(["verify", str(run)]) == 1  # the unfinished save cannot restore
    assert "4 of 5 checkpoints restore" in capsys.readouterr().out

    assert tool.main(["clean", str(run)]) == 0
    assert "freed 4.0 KiB (4096 bytes)" in capsys.readouterr().out
    assert backend.leftovers(run) == []
    assert tool.main(["verify", str(run)]) == 0

    steps_before = sorted(i.step for i in backend.list_checkpoints(run))
    latest = max(backend.list_checkpoints(run), key=lambda i: (i.step, str(i.path)))
    _truncate_largest(Path(latest.path))
    assert tool.main(["verify", str(run)]) == 1
    assert Path(latest.path).name in capsys.readouterr().out

    # Best (by val accuracy) and latest are kept; the latest is damaged, so the newest good one stays too.
    assert tool.main(["prune", str(run)]) == 0
    kept = sorted((i.step, i.val_accuracy) for i in backend.list_checkpoints(run))
    best_step = {"lightning": 6, "flax": 4}[stack]
    assert [s for s, _ in kept] == sorted({best_step, latest.step, steps_before[-2]}), kept
    assert all(p.stat().st_size == 0 for p in trash.rglob("*") if p.is_file())
    assert backend.leftovers(run) == [], "a pruned checkpoint's checksum sidecar goes with it"


@pytest.mark.parametrize("stack", tool.STACKS)
def test_verify_finds_one_flipped_byte_inside_a_tensor_and_names_the_file(stack, tmp_path, capsys):
    run = {"lightning": _real_lightning_run, "flax": _real_flax_run}[stack](tmp_path)
    tool.main(["clean", str(run)])
    latest = Path(max(tool.backend(stack).list_checkpoints(run), key=lambda i: (i.step, str(i.path))).path)
    files = [latest] if latest.is_file() else [p for p in latest.rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10  # the middle of the largest file: inside the 64 x 64 weight tensor
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert tool.main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "3 of 4 checkpoints restore; 1 do not" in out
    assert victim.name in out and "SHA-256 mismatch" in out


@pytest.mark.parametrize("stack", tool.STACKS)
def test_verify_takes_a_relative_run_folder_and_the_default_logdir(stack, tmp_path, monkeypatch, capsys):
    run = {"lightning": _real_lightning_run, "flax": _real_flax_run}[stack](tmp_path / "runs")
    tool.main(["clean", str(run)])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert tool.main(["verify", f"runs/{stack}/real"]) == 0, capsys.readouterr().out
    assert "4 of 4 checkpoints restore" in capsys.readouterr().out
    assert tool.main(["verify"]) == 0  # the default target, "runs"
    assert "4 of 4 checkpoints restore" in capsys.readouterr().out


def test_command_line_prunes_a_logdir_and_reports_errors_in_one_line(tmp_path):
    _real_flax_run(tmp_path)  # one stack: the script imports only the backends it needs
    script = Path(__file__).resolve().parent.parent / "scripts" / "checkpoints.py"
    result = subprocess.run([sys.executable, str(script), "prune", str(tmp_path), "--keep-newest", "1", "--dry-run"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "would remove 3 item(s)" in result.stdout
    missing = subprocess.run([sys.executable, str(script), "list", str(tmp_path / "absent")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
