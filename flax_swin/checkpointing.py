"""Orbax checkpoints for the Flax stack: best+latest retention, trash-safe deletion, list/verify helpers."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from shared_data.errors import CheckpointError, CheckpointSaveError
from shared_data.retention import CheckpointInfo, kept_steps
from shared_data.trash_safe import remove_path, tree_size

KIND = "flax"
CHECKPOINTS_SUBDIR = "checkpoints"
STATE_ITEM = "state"  # the TrainState pytree: step, params, optimiser state
META_ITEM = "meta"  # JSON: step, epoch, position in the epoch, val accuracy, epoch history
VAL_ACCURACY_METRIC = "val_accuracy"
# Orbax writes each save into "<step>.orbax-checkpoint-tmp..." and renames it when complete.
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"
_COMPLETE_MARKER = "_CHECKPOINT_METADATA"
# Orbax renames retired step folders into this subfolder (CheckpointManagerOptions.todelete_subdir) instead of
# unlinking their files in place; we then empty and remove it through shared_data.trash_safe.
RETIRED_SUBDIR = ".retired"

log = logging.getLogger(__name__)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_SUBDIR


def _read_meta(step_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((step_dir / META_ITEM / "metadata").read_text())
    except (OSError, ValueError):
        return None


def _is_complete(step_dir: Path) -> bool:
    return ((step_dir / _COMPLETE_MARKER).is_file() and (step_dir / STATE_ITEM).is_dir()
            and _read_meta(step_dir) is not None)


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Every step folder of the run (complete or not), oldest step first; temporary folders are leftovers."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    infos = []
    for path in folder.iterdir():
        if not (path.is_dir() and path.name.isdigit()):
            continue
        meta = _read_meta(path) or {}
        infos.append(CheckpointInfo(
            path=path, step=int(path.name), epoch=meta.get("epoch"), val_accuracy=meta.get(VAL_ACCURACY_METRIC),
            bytes=tree_size(path), complete=_is_complete(path), stack=KIND,
        ))
    return sorted(infos, key=lambda info: info.step)


def leftovers(run_dir: str | Path) -> list[Path]:
    """Partial saves, half-deleted step folders and temporary files a killed run left behind (safe to delete)."""
    run_dir = Path(run_dir)
    found: list[Path] = []
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        found += [path for path in folder.iterdir() if ORBAX_TMP_MARKER in path.name or path.name == RETIRED_SUBDIR]
        for step_dir in folder.iterdir():
            if step_dir.is_dir() and step_dir.name.isdigit():
                if not (step_dir / _COMPLETE_MARKER).is_file():
                    found.append(step_dir)  # a deletion cut short (Orbax renames complete saves into place)
                else:
                    found += [path for path in step_dir.iterdir() if ORBAX_TMP_MARKER in path.name]
    if run_dir.is_dir():
        # shared_data.trash_safe.atomic_write_bytes stages files as ".<name>.<random>.tmp".
        found += [path for path in run_dir.iterdir() if path.name.startswith(".") and path.name.endswith(".tmp")]
    return sorted(found)


def remove_step_dir(path: Path) -> None:
    """Delete a step folder so that a kill half-way leaves a recognisable leftover, never a broken "complete" one."""
    remove_path(path / _COMPLETE_MARKER)
    remove_path(path)


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete (trash-safely) what leftovers() finds and return it."""
    found = leftovers(run_dir)
    for path in found:
        log.warning("removing partial save %s left by an interrupted run", path)
        remove_path(path)
    return found


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint folder fully; return its meta or raise CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if ORBAX_TMP_MARKER in path.name or not _is_complete(path):
        raise CheckpointError(f"{path}: incomplete save (interrupted while writing); delete it")
    meta = _read_meta(path)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path / STATE_ITEM)
        jax.block_until_ready(restored)
    except Exception as error:  # orbax and tensorstore raise many types; all mean "unreadable"
        raise CheckpointError(f"{path}: cannot be restored ({type(error).__name__}: {_first_line(error)})") from None
    if int(restored["step"]) != int(path.name):
        raise CheckpointError(f"{path}: holds step {int(restored['step'])}, not {path.name}")
    return meta or {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


@dataclasses.dataclass
class BestAndLatest(checkpoint_managers.PreservationPolicy):
    """Orbax's side of shared_data.retention.kept_steps: the latest checkpoint and the keep-1 best by val accuracy.

    Orbax's BestN ranks by the metrics passed to save(), which it does not persist: after a restart
    every older checkpoint would look metric-less and the best one be deleted. The accuracy is read
    back from each checkpoint's own meta item instead.
    """

    directory: Path
    keep: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        pairs = []
        for info in checkpoints:
            accuracy = (info.metrics or {}).get(VAL_ACCURACY_METRIC)
            if accuracy is None:
                accuracy = (_read_meta(self.directory / str(info.step)) or {}).get(VAL_ACCURACY_METRIC)
            pairs.append((info.step, None if accuracy is None else float(accuracy)))
        kept = kept_steps(pairs, self.keep)
        return [info.step in kept for info in checkpoints]


def retention_policy(keep: int, directory: Path) -> checkpoint_managers.PreservationPolicy:
    """The best-and-latest policy for a checkpoints folder."""
    return BestAndLatest(directory=directory, keep=keep)


def _is_disk_full(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class _WithoutOrbaxTraceback(logging.Filter):
    """Keeps Orbax's error lines but not their tracebacks: a failed save ends in our one-line CheckpointSaveError."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


class _DropClosedLoopErrors:
    """An unraisable hook that drops one error only: after a failed asynchronous save, TensorStore still completes
    futures into Orbax's closed event loop, and each "Event loop is closed" is reported as unraisable with a
    traceback, before and after the failure reaches us. Installed for a Checkpointer's lifetime."""

    def __init__(self) -> None:
        self.previous = sys.unraisablehook

    def __call__(self, unraisable: Any) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            self.previous(unraisable)

    def uninstall(self) -> None:
        if sys.unraisablehook is self:
            sys.unraisablehook = self.previous


class Checkpointer:
    """An Orbax CheckpointManager with asynchronous saves, best+latest retention and trash-safe deletion."""

    def __init__(self, run_dir: str | Path, keep: int, *, asynchronous: bool = True) -> None:
        self.directory = checkpoint_dir(run_dir).absolute()
        if jax.process_index() == 0:
            remove_leftovers(run_dir)
            self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=retention_policy(keep, self.directory),
            enable_async_checkpointing=asynchronous,
            # Left False: Orbax would rmtree them itself; remove_leftovers() did it trash-safely above.
            cleanup_tmp_directories=False,
            # Retired checkpoints are only renamed by Orbax; empty_retired() deletes them trash-safely.
            todelete_subdir=RETIRED_SUBDIR,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, META_ITEM))
        # Orbax logs a save that fails in its background thread with a traceback through absl, then raises it
        # to us; while this checkpointer lives, its records keep their message only.
        self._log_filter = _WithoutOrbaxTraceback()
        logging.getLogger("absl").addFilter(self._log_filter)
        self._unraisable_hook = _DropClosedLoopErrors()
        sys.unraisablehook = self._unraisable_hook

    def empty_retired(self) -> None:
        """Delete the checkpoints Orbax has retired so far, every file emptied first (process 0 only)."""
        if jax.process_index() == 0:
            remove_path(self.directory / RETIRED_SUBDIR)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], val_accuracy: float | None) -> float:
        """Start an asynchronous save; return the seconds the caller was blocked (waiting for the previous included)."""
        start = time.perf_counter()
        metrics = None if val_accuracy is None else {VAL_ACCURACY_METRIC: float(val_accuracy)}
        try:
            # One asynchronous save at a time (Orbax would wait here anyway); once it is done, nothing is
            # renaming into the retired folder while it is emptied.
            self._manager.wait_until_finished()
            self.empty_retired()
            self._manager.save(
                step, metrics=metrics, args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
            )
        except Exception as error:
            self._raise_save_error(step, error)
        return time.perf_counter() - start

    def wait(self) -> float:
        """Block until the pending save is on disk; return the seconds waited."""
        start = time.perf_counter()
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._raise_save_error(None, error)
        self.empty_retired()
        return time.perf_counter() - start

    def _raise_save_error(self, step: int | None, error: BaseException) -> None:
        which = f"checkpoint of step {step}" if step is not None else "the last checkpoint"
        if _is_disk_full(error):
            raise CheckpointSaveError(
                f"disk full while saving {which} in {self.directory}: free space there or lower "
                "--keep-checkpoints; the previous complete checkpoint is intact"
            ) from None
        raise CheckpointSaveError(f"saving {which} in {self.directory} failed: {_first_line(error)}") from error

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """Restore the newest complete checkpoint into `abstract_state`'s shapes and shardings.

        A checkpoint that fails to load is reported, deleted (it would otherwise block saving that step
        again) and the previous one is tried; None when there is nothing to restore.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            path = self.directory / str(step)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore(),
                }))
                return restored[STATE_ITEM], dict(restored[META_ITEM])
            except Exception as error:  # any failure to read means "corrupted"; fall back to the previous
                log.warning("checkpoint %s cannot be restored (%s); using the previous one", path, _first_line(error))
                print(f"warning: checkpoint {path} cannot be restored ({type(error).__name__}); "
                      "falling back to the previous one", flush=True)
                remove_step_dir(path)
                self._manager.reload()
        return None

    def close(self) -> None:
        """Finish pending saves and deletions."""
        try:
            self._manager.close()
        except Exception as error:
            self._raise_save_error(None, error)
        finally:
            logging.getLogger("absl").removeFilter(self._log_filter)
            self._unraisable_hook.uninstall()
        self.empty_retired()
