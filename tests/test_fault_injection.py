"""Fault injection on both stacks: SIGKILL at chosen moments, a full disk, a corrupted checkpoint, 50 saves."""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools import checkpoints as tool
from shared_data import tags
from shared_data.clock import Sections
from tests import stacks

REPO = Path(__file__).resolve().parents[1]
STACKS = ("lightning", "flax")
# The two longest kill tests run for Lightning by default and for Flax with -m slow (50 s and 20 s of the default
# suite's 15 minutes on 2 cores); Flax's resume after a kill is covered by default in tests/test_resume.py.
STACKS_FLAX_SLOW = ("lightning", pytest.param("flax", marks=pytest.mark.slow))
SCRIPTS = {"lightning": REPO / "scripts" / "train_lightning.py", "flax": REPO / "scripts" / "train_flax.py"}
# Tiny synthetic set: 200 training images at batch 32 -> 6 steps an epoch, 100 validation images.
STEPS_PER_EPOCH = 6
MAX_STEPS = 8  # one epoch end (validation, best checkpoint) at step 6, then two more steps
EVERY = 2
RUN_FLAGS = ["--preset", "smoke", "--synthetic-size", "tiny", "--checkpoint-every-steps", str(EVERY)]
# Flags only one stack has. None: both resume bit-identically on CPU with their defaults (Lightning
# needs no --deterministic there), which is the path users take.
STACK_FLAGS: dict[str, list[str]] = {"lightning": [], "flax": []}
ATTEMPT_TIMEOUT_S = 300
# How long the commit hook holds a finished-but-not-renamed save open, so a kill lands inside it.
COMMIT_DELAY_S = 0.4

# Loaded as `sitecustomize` by every Python process of a run under test (PYTHONPATH), so the hooks
# reach the training script, its threads and any worker process without touching the stacks' code.
HOOKS = r'''
"""Test-only fault hooks for a training run: events, slow commits, a full disk, a simulated trash."""
import builtins, errno, itertools, os, threading, time

_EVENTS = os.environ.get("SWIN_TEST_EVENTS")
_WATCH = os.environ.get("SWIN_TEST_WATCH", "").rstrip("/")
_TRASH = os.environ.get("SWIN_TEST_TRASH")
_COMMIT_DELAY = float(os.environ.get("SWIN_TEST_COMMIT_DELAY", "0"))
_FULL_AFTER = int(os.environ.get("SWIN_TEST_DISK_FULL_AFTER_COMMITS", "-1"))
_rename, _replace, _unlink, _remove, _open, _os_open = os.rename, os.replace, os.unlink, os.remove, builtins.open, os.open
_lock = threading.Lock()
_commits = [0]
_trashed = itertools.count()


def _event(text):
    if _EVENTS:
        fd = _os_open(_EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (" ".join(text.split()) + "\n").encode())
        finally:
            os.close(fd)


def _abs(path, dir_fd=None):
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.abspath(path)


def _watched(path, dir_fd=None):
    if not _WATCH or isinstance(path, int):
        return False
    return (_abs(path, dir_fd) + "/").startswith(_WATCH + "/")


def _disk_full():
    return 0 <= _FULL_AFTER <= _commits[0]


def _no_space(path):
    _event(f"enospc {path}")
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))


def _commit_hook(original):
    def hooked(src, dst, *args, **kwargs):
        if not (_watched(dst, kwargs.get("dst_dir_fd")) or _watched(src, kwargs.get("src_dir_fd"))):
            return original(src, dst, *args, **kwargs)
        if _disk_full():
            raise _no_space(dst)
        # Only a rename into the checkpoints folder itself publishes a save; others are inner steps of one, and so
        # is a Lightning checkpoint's checksum sidecar, written just before it.
        target = _abs(dst, kwargs.get("dst_dir_fd"))
        if os.path.dirname(target) != _WATCH or target.endswith(".sha256"):
            return original(src, dst, *args, **kwargs)
        _event(f"commit {os.fsdecode(src)} {os.fsdecode(dst)}")
        if _COMMIT_DELAY:
            time.sleep(_COMMIT_DELAY)
        result = original(src, dst, *args, **kwargs)
        with _lock:
            _commits[0] += 1
        _event(f"committed {os.fsdecode(dst)}")
        return result
    return hooked


def _delete_hook(original):
    def hooked(path, *, dir_fd=None):
        if _TRASH and _watched(path, dir_fd):
            source = _abs(path, dir_fd)
            _event(f"trash {source}")
            return _rename(source, os.path.join(_TRASH, f"{os.getpid()}-{next(_trashed)}-{os.path.basename(source)}"))
        return original(path, dir_fd=dir_fd)
    return hooked


def _hooked_open(file, mode="r", *args, **kwargs):
    if _disk_full() and any(c in mode for c in "wax+") and _watched(file):
        raise _no_space(file)
    return _open(file, mode, *args, **kwargs)


def _hooked_os_open(path, flags, *args, **kwargs):
    if _disk_full() and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _watched(path, kwargs.get("dir_fd")):
        raise _no_space(path)
    return _os_open(path, flags, *args, **kwargs)


if _WATCH:
    os.rename, os.replace = _commit_hook(_rename), _commit_hook(_replace)
    os.unlink, os.remove = _delete_hook(_unlink), _delete_hook(_remove)
    builtins.open, os.open = _hooked_open, _hooked_os_open
    try:
        from shared_data import trash_safe
        trash_safe._unlink = os.unlink
    except Exception as error:
        _event(f"hook-error trash_safe {error!r}")

if _EVENTS:
    try:
        from shared_data import batches

        def _traced(kind, function):
            def traced(*args, **kwargs):
                _event(f"{kind} {kwargs.get('epoch', '-')} {kwargs.get('index', '-')}")
                return function(*args, **kwargs)
            return traced

        batches.train_batch = _traced("train", batches.train_batch)
        batches.val_batch = _traced("val", batches.val_batch)
    except Exception as error:
        _event(f"hook-error batches {error!r}")
'''


# ------------------------------------------------------------------------------------------------
# Running a stack as a subprocess, with hooks, and killing it at a chosen moment.


@dataclasses.dataclass(frozen=True)
class Kill:
    """Kill at the `count`-th event of `moment` in one attempt.

    Moments: "step" (a training batch asked for), "val" (a validation batch asked for), "save" (a
    finished save held just before its commit rename), "save-start" (a partial save on disk, after
    count - 1 commits in this attempt).
    """

    moment: str
    count: int = 1
    delay_s: float = 0.0


@dataclasses.dataclass
class Attempt:
    returncode: int | None
    killed_at: str | None
    output: str
    complete_steps_before: list[int]
    first_batch: tuple[int, int] | None  # (epoch, index) of the first training batch asked for


@dataclasses.dataclass
class Harness:
    """One stack's run folder under a private logdir, plus the hooks' event log and trash."""

    stack: str
    root: Path
    data_dir: Path
    max_steps: int = MAX_STEPS
    run_name: str = "run"

    @property
    def xla_cache(self) -> Path:
        # Beside the data folder in the session's temporary root, so other test modules can share it.
        return self.data_dir.parent / "xla-cache"

    @property
    def logdir(self) -> Path:
        return self.root / "runs"

    @property
    def run_dir(self) -> Path:
        return self.logdir / self.stack / self.run_name

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def events_file(self) -> Path:
        return self.root / "events.log"

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    def backend(self):
        return importlib.import_module(tool.BACKEND_MODULES[self.stack])

    def complete_steps(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(i.step for i in self.backend().list_checkpoints(self.run_dir) if i.complete)

    def command(self, resume: bool) -> list[str]:
        return [sys.executable, str(SCRIPTS[self.stack]), *RUN_FLAGS, *STACK_FLAGS[self.stack],
                "--max-steps", str(self.max_steps),
                "--data-dir", str(self.data_dir), "--logdir", str(self.logdir), "--run-name", self.run_name,
                *(["--resume"] if resume else [])]

    def env(self, **hooks: str) -> dict[str, str]:
        hooks_dir = self.root / "hooks"
        hooks_dir.mkdir(parents=True, exist_ok=True)
        (hooks_dir / "sitecustomize.py").write_text(HOOKS)
        self.trash.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks_dir), str(REPO), os.environ.get("PYTHONPATH", "")]),
                   SWIN_TEST_EVENTS=str(self.events_file), SWIN_TEST_WATCH=str(self.checkpoints.resolve()),
                   SWIN_TEST_TRASH=str(self.trash.resolve()), PYTHONUNBUFFERED="1",
                   # Later attempts reuse the first one's XLA programs: the same code, compiled once.
                   JAX_COMPILATION_CACHE_DIR=str(self.xla_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        env.update(hooks)
        return env

    def attempt(self, resume: bool, kill: Kill | None = None, **hooks: str) -> Attempt:
        """Run once; with `kill`, SIGKILL the process when the moment comes (or let it finish if it never does)."""
        before = self.complete_steps()
        self.events_file.write_text("")
        log_path = self.root / f"attempt-{time.monotonic_ns()}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(self.command(resume), cwd=REPO, env=self.env(**hooks), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            killed_at = None
            try:
                killed_at = self._watch(process, kill) if kill else None
                process.wait(timeout=ATTEMPT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise AssertionError(f"{self.stack}: run did not finish in {ATTEMPT_TIMEOUT_S} s; log {log_path}")
        output = log_path.read_text(errors="replace")
        return Attempt(process.returncode, killed_at, output, before, self.first_train_batch())

    def first_train_batch(self) -> tuple[int, int] | None:
        """(epoch, index) of the earliest training batch the last attempt asked for: where it started.

        The earliest, not the first logged: loader threads may log batch 1 before batch 0.
        """
        events = [line.split() for line in self.events_file.read_text().splitlines()]
        return min(((int(e[1]), int(e[2])) for e in events if e[0] == "train"), default=None)

    def _watch(self, process: subprocess.Popen, kill: Kill) -> str | None:
        deadline = time.monotonic() + ATTEMPT_TIMEOUT_S
        leftovers = self.backend().leftovers
        counts: collections.Counter[str] = collections.Counter()
        offset = 0
        while process.poll() is None and time.monotonic() < deadline:
            with open(self.events_file, "rb") as events:
                events.seek(offset)
                chunk = events.read()
            complete = chunk.rfind(b"\n") + 1
            offset += complete
            counts.update(line.split(" ", 1)[0] for line in chunk[:complete].decode().splitlines())
            if kill.moment == "save-start":
                # After the first batch, so not the previous attempt's leftover before start-up removes it.
                seen = counts["train"] > 0 and counts["commit"] >= kill.count - 1 and bool(leftovers(self.run_dir))
            else:
                seen = counts[{"step": "train", "val": "val", "save": "commit"}[kill.moment]] >= kill.count
            if seen:
                time.sleep(kill.delay_s)
                # The whole session: worker processes die with the trainer, as with a power cut.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return f"{kill.moment}#{kill.count}+{kill.delay_s:.2f}s"
            # Coarse enough to leave the two cores to the run, fine enough to land inside a held commit.
            time.sleep(0.01)
        return None

    def run_to_completion(self, kills: list[Kill], **hooks: str) -> list[Attempt]:
        """Start fresh, apply each kill in turn (resuming after each), then resume until the run finishes."""
        attempts = []
        for kill in kills:
            attempts.append(self.attempt(resume=bool(attempts), kill=kill, **hooks))
            self.check_resumed_from_latest(attempts[-1])
            if attempts[-1].killed_at is None:
                break
            self.check_after_kill()
        if not attempts or attempts[-1].killed_at is not None:
            attempts.append(self.attempt(resume=bool(attempts), **hooks))
            self.check_resumed_from_latest(attempts[-1])
        final = attempts[-1]
        assert final.returncode == 0, f"{self.stack}: resumed run failed:\n{final.output[-3000:]}"
        return attempts

    def check_resumed_from_latest(self, attempt: Attempt) -> None:
        """An attempt trains on from the last complete checkpoint before it: never a partial one, never step 0."""
        if attempt.first_batch is not None:
            start = max(attempt.complete_steps_before, default=0)
            assert attempt.first_batch == divmod(start, STEPS_PER_EPOCH), (
                f"{self.stack}: started at batch {attempt.first_batch} with complete checkpoints "
                f"{attempt.complete_steps_before}:\n{attempt.output[-2000:]}")

    def check_after_kill(self) -> None:
        """Every checkpoint listed as complete after a kill must restore."""
        backend = self.backend()
        for info in backend.list_checkpoints(self.run_dir) if self.checkpoints.is_dir() else []:
            if info.complete:
                backend.verify_checkpoint(info.path)


# ------------------------------------------------------------------------------------------------
# Reading the weights a run ended with, for both formats.


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}{i}/"))
        return out
    if hasattr(tree, "detach"):
        return {prefix.rstrip("/"): tree.detach().cpu().numpy()}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return {prefix.rstrip("/"): np.asarray(tree)}
    return {}


def final_arrays(harness: Harness) -> tuple[int, dict[str, np.ndarray]]:
    """(step, every array of the run's latest checkpoint: weights and optimiser state)."""
    infos = [i for i in harness.backend().list_checkpoints(harness.run_dir) if i.complete]
    latest = max(infos, key=lambda info: info.step)
    if harness.stack == "lightning":
        import torch

        checkpoint = torch.load(latest.path, map_location="cpu", weights_only=False)
        return latest.step, _flatten({"state_dict": checkpoint["state_dict"],
                                      "optimizer_states": checkpoint.get("optimizer_states", [])})
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        arrays = _flatten(checkpointer.restore(Path(latest.path) / "state"))
    return latest.step, arrays


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray], stack: str) -> None:
    assert got.keys() == want.keys(), f"{stack}: different checkpoint contents"
    assert len(want) > 10, f"{stack}: found only {len(want)} arrays in the final checkpoint"
    differing = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differing, f"{stack}: {len(differing)} arrays differ from the uninterrupted run, e.g. {differing[:3]}"


# ------------------------------------------------------------------------------------------------
# Fixtures: one data folder and one uninterrupted reference run per stack, for the whole module.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run of a stack (made on first use): (harness, final step, final arrays)."""
    made: dict[tuple[str, int], tuple[Harness, int, dict[str, np.ndarray]]] = {}

    def get(stack: str, max_steps: int = MAX_STEPS):
        if (stack, max_steps) not in made:
            harness = Harness(stack, tmp_path_factory.mktemp(f"reference-{stack}"), data_dir, max_steps)
            attempt = harness.attempt(resume=False)
            assert attempt.returncode == 0, f"{stack}: reference run failed:\n{attempt.output[-3000:]}"
            made[stack, max_steps] = (harness, *final_arrays(harness))
        return made[stack, max_steps]

    return get


def _check_matches_reference(harness: Harness, reference) -> None:
    ref_harness, ref_step, ref_arrays = reference(harness.stack, harness.max_steps)
    step, arrays = final_arrays(harness)
    assert step == ref_step == harness.max_steps
    assert_same_arrays(arrays, ref_arrays, harness.stack)
    # Same kept checkpoints as the uninterrupted run, and nothing half-written left behind.
    assert harness.complete_steps() == ref_harness.complete_steps()
    assert harness.backend().leftovers(harness.run_dir) == []


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS_FLAX_SLOW)
def test_killed_during_save_and_validation_resumes_to_identical_weights(stack, tmp_path, data_dir, reference):
    harness = Harness(stack, tmp_path, data_dir)
    # Second save (step 4) killed before its commit; then killed in the first validation (epoch 1 end).
    attempts = harness.run_to_completion([Kill("save", 2), Kill("val", 2)], SWIN_TEST_COMMIT_DELAY=str(COMMIT_DELAY_S))
    assert [a.killed_at is not None for a in attempts] == [True, True, False], [a.killed_at for a in attempts]
    # The save killed before its commit never counts: resume starts from step 2.
    assert attempts[1].complete_steps_before == [EVERY]
    _check_matches_reference(harness, reference)


@pytest.mark.slow
@pytest.mark.parametrize("stack", STACKS)
def test_killed_at_ten_random_moments_resumes_to_identical_weights(stack, tmp_path, data_dir, reference):
    rng = random.Random(f"kills-{stack}")
    moments = ["step", "step", "step", "save", "save", "save", "save-start", "save-start", "val", "val"]
    rng.shuffle(moments)
    # Early moments in each attempt, so that ten kills land before the 30 steps (5 epochs) are done.
    kills = {
        "step": lambda: Kill("step", rng.randint(1, 3), rng.uniform(0.0, 0.5)),
        "save": lambda: Kill("save", 1, rng.uniform(0.0, COMMIT_DELAY_S / 2)),
        "save-start": lambda: Kill("save-start", 1),
        "val": lambda: Kill("val", rng.randint(1, 4), rng.uniform(0.0, 0.2)),
    }
    harness = Harness(stack, tmp_path, data_dir, max_steps=5 * STEPS_PER_EPOCH)
    attempts = harness.run_to_completion([kills[m]() for m in moments], SWIN_TEST_COMMIT_DELAY=str(COMMIT_DELAY_S))
    landed = [a.killed_at for a in attempts if a.killed_at]
    assert len(landed) == 10, f"only {len(landed)} kills landed before the run finished: {landed}"
    print(f"{stack}: killed at {', '.join(landed)}")
    _check_matches_reference(harness, reference)


# Words that mark a line of output as a report of trouble (progress bars share the terminal, so lines are split on
# carriage returns too).
_TROUBLE = re.compile(r"error|warning|traceback|exception|failed|no space|disk full", re.IGNORECASE)


@pytest.mark.parametrize("stack", STACKS)
def test_disk_full_during_save_stops_with_one_line_naming_the_step_and_keeps_previous_checkpoint(stack, tmp_path,
                                                                                              data_dir):
    harness = Harness(stack, tmp_path, data_dir)
    # The disk fills up right after the first checkpoint (step 2) is committed: the save of step 4 fails.
    attempt = harness.attempt(resume=False, SWIN_TEST_DISK_FULL_AFTER_COMMITS="1")
    assert "enospc" in harness.events_file.read_text(), "the simulated full disk was never written to"
    assert attempt.returncode not in (0, None), f"{stack}: run went on with a full disk"
    trouble = [line.strip() for line in re.split(r"[\r\n]+", attempt.output) if _TROUBLE.search(line)]
    assert len(trouble) == 1, f"{stack}: more than the one line:\n" + "\n".join(trouble[:40])
    message = trouble[0].lower()
    # One wording in both stacks (shared_data.errors.CheckpointSaveError.at_step).
    assert "disk full while saving the checkpoint of step 4 in " in message and "intact" in message, message
    assert harness.complete_steps() == [EVERY]
    harness.check_after_kill()
    # The partial save of step 4 is gone already, every file emptied before it was removed.
    assert harness.backend().leftovers(harness.run_dir) == []
    assert [p.name for p in harness.trash.iterdir() if p.stat().st_size] == []


def _corrupt(path: Path, damage: str) -> Path:
    """Damage the checkpoint's largest file as a failing disk or an interrupted copy does: truncate it to half, or
    flip one bit in its middle (inside the largest tensor's bytes)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    if damage == "truncated":
        os.truncate(victim, victim.stat().st_size // 2)
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    return victim


# The flipped bit, the subtler damage (the file keeps its size), runs by default; the truncated file with -m slow
# (20 s of the default suite on 2 cores).
@pytest.mark.parametrize("damage", [pytest.param("truncated", marks=pytest.mark.slow), "flipped-bit"])
@pytest.mark.parametrize("stack", STACKS)
def test_corrupted_latest_checkpoint_is_refused_by_name_and_resume_falls_back(stack, damage, tmp_path, data_dir,
                                                                              reference, capsys):
    # A finished run whose latest checkpoint (step 8) is damaged; the epoch-end one (step 6) is fine.
    ref_harness = reference(stack)[0]
    harness = Harness(stack, tmp_path, data_dir)
    shutil.copytree(ref_harness.run_dir, harness.run_dir)
    steps = sorted(set(harness.complete_steps()))
    assert steps == [STEPS_PER_EPOCH, MAX_STEPS], steps
    latest = max((i for i in harness.backend().list_checkpoints(harness.run_dir) if i.complete), key=lambda i: i.step)
    victim = _corrupt(Path(latest.path), damage)
    assert tool.main(["verify", str(harness.run_dir)]) == 1
    assert victim.name in capsys.readouterr().out, f"{stack}: verify does not name the damaged file"
    resumed = harness.attempt(resume=True)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert victim.name in resumed.output, f"{stack}: the damaged file is not named:\n{resumed.output[-3000:]}"
    assert resumed.first_batch == divmod(steps[-2], STEPS_PER_EPOCH), "did not resume from the previous checkpoint"
    _check_matches_reference(harness, reference)


@pytest.mark.parametrize("stack", STACKS_FLAX_SLOW)
def test_killed_while_publishing_an_epoch_checkpoint_its_scalars_are_on_disk_and_resume_writes_each_step_once(
        stack, tmp_path, data_dir):
    harness = Harness(stack, tmp_path, data_dir)
    # The epoch-end checkpoint (step 6, the third save after steps 2 and 4) is killed held before its commit rename.
    killed = harness.attempt(resume=False, kill=Kill("save", 3), SWIN_TEST_COMMIT_DELAY=str(COMMIT_DELAY_S))
    assert killed.killed_at is not None and harness.complete_steps() == [4], harness.complete_steps()
    scalars = stacks.scalars(harness.run_dir)
    # All but the checkpoint and wall times, which include the save and so follow it. The Flax loop saves
    # asynchronously and trains on meanwhile: epoch 2's tags may be on disk too (the resume purges them).
    for tag in set(tags.PER_EPOCH) - {tags.EPOCH_CHECKPOINT_TIME, tags.EPOCH_WALL_TIME}:
        assert [epoch for epoch, _ in scalars[tag]][:1] == [1], f"{stack}: {tag} of epoch 1 is not on disk"

    resumed = harness.attempt(resume=True)  # from step 4: epoch 1's tags on disk are stale, and purged
    assert resumed.returncode == 0, resumed.output[-3000:]
    scalars = stacks.scalars(harness.run_dir)  # read in order, as TensorBoard does: purges applied
    for tag in tags.PER_STEP:
        assert [step for step, _ in scalars[tag]] == list(range(1, MAX_STEPS + 1)), (stack, tag)
    for tag in tags.PER_EPOCH:
        assert [epoch for epoch, _ in scalars[tag]] == [1, 2], (stack, tag)


# ------------------------------------------------------------------------------------------------
# Retention over many saves, driving each stack's checkpoint manager in-process.


class CloudTrash:
    """A cloud drive mounted at `watched`: every file deleted there, by any route, lands in `folder`."""

    def __init__(self, watched: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from shared_data import trash_safe

        self.watched, self.folder = watched.resolve(), folder
        folder.mkdir(parents=True, exist_ok=True)
        self._rename = os.rename
        self._count = 0
        for name in ("unlink", "remove"):
            monkeypatch.setattr(os, name, self._hook(getattr(os, name)))
        monkeypatch.setattr(trash_safe, "_unlink", os.unlink)

    def _hook(self, original):
        def deleted(path, *, dir_fd=None):
            source = Path(os.fsdecode(path))
            if dir_fd is not None and not source.is_absolute():
                source = Path(os.readlink(f"/proc/self/fd/{dir_fd}")) / source
            source = source.absolute()
            if self.watched in source.parents:
                self._count += 1
                return self._rename(source, self.folder / f"{self._count}-{source.name}")
            return original(path, dir_fd=dir_fd)
        return deleted

    def files(self) -> list[Path]:
        return [p for p in self.folder.iterdir() if p.is_file()]


def _accuracies(saves: int) -> dict[int, float | None]:
    """Validation accuracy at every fifth save (epoch ends), None between; the best is mid-run."""
    return {step: (0.1 + 0.8 * (1 - abs(step - 23) / 50)) if step % 5 == 0 else None for step in range(1, saves + 1)}


def test_fifty_flax_saves_keep_best_and_latest_and_trash_only_empty_files(tmp_path, monkeypatch):
    import jax.numpy as jnp
    from flax_swin import checkpointing
    from shared_data.run_config import DEFAULTS

    run_dir = tmp_path / "run"
    trash = CloudTrash(run_dir / "checkpoints", tmp_path / "trash", monkeypatch)
    accuracies = _accuracies(50)
    manager = checkpointing.Checkpointer(run_dir, keep=DEFAULTS["keep_checkpoints"])
    for step, accuracy in accuracies.items():
        state = {"step": jnp.asarray(step, jnp.int32), "params": {"w": jnp.full((128, 64), step, jnp.float32)}}
        meta = {"step": step, "epoch": step // 5, checkpointing.VAL_ACCURACY_METRIC: accuracy}
        manager.save(step, state, meta, accuracy)
    manager.close()
    best = max((s for s, a in accuracies.items() if a is not None), key=lambda s: accuracies[s])
    infos = checkpointing.list_checkpoints(run_dir)
    assert [i.step for i in infos] == [best, 50] and all(i.complete for i in infos)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [str(best), "50"]
    assert checkpointing.leftovers(run_dir) == []
    trashed = trash.files()
    assert len(trashed) >= 48, "deleted checkpoints never reached the trash: deletion bypassed the drive?"
    assert [p.name for p in trashed if p.stat().st_size] == []


def test_fifty_lightning_saves_keep_best_and_latest_and_trash_only_empty_files(tmp_path, monkeypatch):
    import pytorch_lightning as pl
    import torch
    from lightning_swin import checkpointing
    from shared_data import tags
    from shared_data.run_config import DEFAULTS

    steps_per_epoch, epochs = 5, 10
    accuracies = _accuracies(steps_per_epoch * epochs)

    class Tiny(pl.LightningModule):
        """A linear model whose "validation accuracy" follows `accuracies` at each epoch end."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(256, 256)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def validation_step(self, batch, batch_idx):
            self.log(tags.VAL_ACCURACY, accuracies[self.trainer.global_step])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(steps_per_epoch, 256))
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    run_dir = tmp_path / "run"
    trash = CloudTrash(checkpointing.checkpoint_dir(run_dir), tmp_path / "trash", monkeypatch)
    saves = []

    class CountingIO(checkpointing.AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            saves.append(path)
            super().save_checkpoint(checkpoint, path, storage_options)

    callbacks = checkpointing.checkpoint_callbacks(checkpointing.checkpoint_dir(run_dir),
                                                   keep=DEFAULTS["keep_checkpoints"], every_n_steps=1)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, plugins=[CountingIO(Sections())],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accelerator="cpu", default_root_dir=str(run_dir))
    trainer.fit(Tiny(), train_dataloaders=loader, val_dataloaders=loader)
    checkpointing.prune_checkpoints(run_dir, DEFAULTS["keep_checkpoints"])
    assert len(saves) >= 50
    best = max((s for s, a in accuracies.items() if a is not None), key=lambda s: accuracies[s])
    infos = checkpointing.list_checkpoints(run_dir)
    assert [(i.role, i.step) for i in infos] == [("best", best), ("last", 50)] and all(i.complete for i in infos)
    on_disk = sorted(p.name for p in checkpointing.checkpoint_dir(run_dir).iterdir())
    assert on_disk == sorted(name for i in infos for name in (i.path.name, i.path.name + ".sha256"))  # and sidecars
    assert checkpointing.leftovers(run_dir) == []
    trashed = trash.files()
    assert len(trashed) >= len(saves) - 2, "deleted checkpoints never reached the trash: deletion bypassed the drive?"
    assert [p.name for p in trashed if p.stat().st_size] == []
