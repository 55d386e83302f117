"""Orbax checkpoints for the Flax stack: best+latest retention, checksums, trash-safe deletion, list/verify helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from flax_swin import distributed
from shared_data import checkpoint_folder, checksums, errors
from shared_data.checkpoint_folder import checkpoint_dir
from shared_data.errors import CheckpointDamagedError, CheckpointError, CheckpointSaveError
from shared_data.retention import CheckpointInfo, kept_steps
from shared_data.trash_safe import remove_path, tree_size

STACK = "flax"
STATE_ITEM = "state"  # the TrainState pytree: step, params, optimiser state
META_ITEM = "meta"  # JSON: step, epoch, position in the epoch, val accuracy, epoch history
VAL_ACCURACY_METRIC = "val_accuracy"
# Orbax writes each save into "<step>.orbax-checkpoint-tmp..." and renames it when complete.
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"
_COMPLETE_MARKER = "_CHECKPOINT_METADATA"
# Orbax renames retired step folders into this subfolder (CheckpointManagerOptions.todelete_subdir) instead of
# unlinking their files in place; we then empty and remove it through shared_data.trash_safe.
RETIRED_SUBDIR = ".retired"
# Orbax stamps the commit time into this file of the step folder after our checksums are written: not summed.
_STAMPED_AT_COMMIT = (_COMPLETE_MARKER,)


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
            bytes=tree_size(path), complete=_is_complete(path), stack=STACK,
        ))
    return sorted(infos, key=lambda info: info.step)


def leftovers(run_dir: str | Path) -> list[Path]:
    """Partial saves, half-deleted step folders and unfinished file writes a killed run left behind (safe to delete)."""
    found: list[Path] = checkpoint_folder.unfinished_writes(run_dir)
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        found += [path for path in folder.iterdir() if ORBAX_TMP_MARKER in path.name or path.name == RETIRED_SUBDIR]
        for step_dir in folder.iterdir():
            if step_dir.is_dir() and step_dir.name.isdigit():
                if not (step_dir / _COMPLETE_MARKER).is_file():
                    found.append(step_dir)  # a deletion cut short (Orbax renames complete saves into place)
                else:
                    found += [path for path in step_dir.iterdir() if ORBAX_TMP_MARKER in path.name]
    return sorted(found)


def remove_step_dir(path: Path) -> None:
    """Delete a step folder so that a kill half-way leaves a recognisable leftover, never a broken "complete" one."""
    remove_path(path / _COMPLETE_MARKER)
    remove_path(path)


def clean_leftovers(run_dir: str | Path, announce: bool = True) -> list[Path]:
    """Delete (trash-safely) what leftovers() finds, each named in a warning when `announce`; return it."""
    return checkpoint_folder.remove_leftovers(leftovers(run_dir), announce=announce)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint folder's checksums and read it fully; return its meta or raise CheckpointError with a
    one-line reason (CheckpointDamagedError when it is proven damaged)."""
    path = Path(path).absolute()  # Orbax takes a relative path for one below its own working folder
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if ORBAX_TMP_MARKER in path.name or not _is_complete(path):
        raise CheckpointDamagedError(f"{path}: incomplete save (interrupted while writing); delete it")
    try:
        restored = checksums.read_with_retries(functools.partial(read_state, path))
    except CheckpointError:
        raise
    except Exception as error:  # orbax and tensorstore raise many types
        raise checksums.unreadable(path, error) from None
    if int(restored["step"]) != int(path.name):
        raise CheckpointError(f"{path}: holds step {int(restored['step'])}, not {path.name}")
    return _read_meta(path) or {}


def read_state(path: str | Path) -> Any:
    """The state item of a step folder (step, params, opt_state) as host numpy arrays, read whole after its checksums
    (if it has them) are found to match; raises CheckpointDamagedError for a file that differs from its sum, and
    Orbax's or TensorStore's own errors for an unreadable one."""
    path = Path(path).absolute()  # Orbax takes a relative path for one below its own working folder
    checksums.check_sums(path / checksums.FOLDER_SUMS, path)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(path / STATE_ITEM).tree
        # As host arrays: the saved shardings name the devices of the processes that saved it (every machine of a
        # run on several), which this process may not have.
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return handler.restore(path / STATE_ITEM, args=ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy))
    finally:
        handler.close()


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


def _shapes_by_key(tree: Any) -> dict[str, tuple[int, ...]]:
    """Every array of a state tree (or of Orbax's metadata of one) by its key path, e.g. "opt_state/1/0/mu/w"."""
    # Orbax's metadata holds dicts and lists where the state has dataclasses and named tuples: name keys alike.
    def name(key: Any) -> str:
        return str(next(getattr(key, field) for field in ("key", "name", "idx") if hasattr(key, field)))

    return {"/".join(map(name, path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class OrbaxFailureOutput(logging.Filter):
    """The one context manager the Flax stack needs around a library: while it is open, what Orbax and TensorStore
    print of an asynchronous save that failed is held back, because the Checkpointer raises that failure itself, in
    one line (CheckpointSaveError). Used for a Checkpointer's life; nothing outside it is touched.

    Why a context manager and not a fix where it happens: Orbax logs a failure in its background threads with a
    traceback (absl, `logging.exception` in its _SignalingThread.run) before wait_until_finished raises it to us,
    and offers no option not to; and the save's other background threads go on writing after the failure, so
    TensorStore completes their futures into the event loop the failed thread has closed, each reported as an
    unraisable "Event loop is closed" (a few hundred for a model's arrays). No public API awaits those threads.

    What it holds, and nothing else: Orbax's own records at ERROR or above (released, in order, once a save
    finishes well: they were not about a failure we report; dropped from the first failure on, since the run stops
    with it), unraisable RuntimeErrors saying "Event loop is closed", and, after a failure, the warnings that the failed
    save's unawaited write coroutines were never awaited. `failed()` waits (bounded) for the failed
    save's remaining Orbax threads, so that their output comes while this is open, not at the process's exit.
    """

    LEFTOVER_WAIT_S = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self._releasing = False
        self._failure_told = False  # a failure was raised as CheckpointSaveError: what Orbax says next is about it
        self._previous_hook = sys.unraisablehook

    def __enter__(self) -> "OrbaxFailureOutput":
        logging.getLogger("absl").addFilter(self)  # absl.logging, which Orbax logs through, uses this logger
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.saved()
        logging.getLogger("absl").removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook

    def filter(self, record: logging.LogRecord) -> bool:
        if self._releasing or record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        self.held.append(record)
        return False

    def _unraisable(self, unraisable: Any) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            self._previous_hook(unraisable)

    def saved(self) -> None:
        """The saves so far finished well: let the records held back meanwhile through (unless a failure was told)."""
        held, self.held = ([] if self._failure_told else self.held), []
        self._releasing = True
        try:
            for record in held:
                logging.getLogger(record.name).handle(record)
        finally:
            self._releasing = False

    def failed(self) -> None:
        """A save failed and is reported as one line: drop what Orbax logged of it, after waiting for the save's
        remaining Orbax threads (found by their class's module: Orbax gives no handle on them) to finish."""
        self._failure_told = True
        deadline = time.monotonic() + self.LEFTOVER_WAIT_S
        leftovers = [thread for thread in threading.enumerate()
                     if type(thread).__module__.startswith("orbax.") and thread is not threading.current_thread()]
        # Polled, not joined: Orbax's threads override join() to raise the exception they ended with.
        while any(thread.is_alive() for thread in leftovers) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.held = []
        # The failed save's unfinished writes are coroutines nobody awaits any more; Python warns of each when it is
        # collected, often at the process's exit, after this has closed. Only after a failure we report, and only
        # those coroutines: one filter, for the rest of a process that is stopping.
        warnings.filterwarnings("ignore", message=r"coroutine 'async_serialize_from_host\.<locals>\.write_fragment' "
                                r"was never awaited", category=RuntimeWarning)


class Checkpointer:
    """An Orbax CheckpointManager with asynchronous saves, checksums, best+latest retention and trash-safe deletion.

    Each save's files are summed (checksums.FOLDER_SUMS) once written and before Orbax renames the save into
    place, so every published checkpoint carries its sums; a failed save is named by its own step, whenever it
    surfaces.
    """

    def __init__(self, run_dir: str | Path, keep: int) -> None:
        self.directory = checkpoint_dir(run_dir).absolute()
        if jax.process_index() == 0:
            clean_leftovers(run_dir)
            self.directory.mkdir(parents=True, exist_ok=True)
        distributed.sync("checkpoint leftovers removed")  # before any process's manager lists the folder
        self._pending: int | None = None  # the step of the save in flight
        self._failed = False  # a save failed and was reported: Orbax raising it again at close() is not news
        self._orbax_output = OrbaxFailureOutput().__enter__()  # left in close()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=retention_policy(keep, self.directory),
            enable_async_checkpointing=True,
            # Runs in Orbax's background thread (process 0) after the last file is written, before the commit rename.
            async_options=ocp.AsyncOptions(post_finalization_callback=self._sum_pending_save),
            # Left False: Orbax would rmtree them itself; clean_leftovers() did it trash-safely above.
            cleanup_tmp_directories=False,
            # Retired checkpoints are only renamed by Orbax; empty_retired() deletes them trash-safely.
            todelete_subdir=RETIRED_SUBDIR,
            create=True,
        )
        # Handlers named up front, so a checkpoint's tree can be read (item_metadata) before anything is restored.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()})

    def _partial_saves(self, step: int | None) -> list[Path]:
        return sorted(self.directory.glob(f"{step}{ORBAX_TMP_MARKER}*"))

    def _sum_pending_save(self) -> None:
        (folder,) = self._partial_saves(self._pending)
        checksums.sum_folder(folder, skip=_STAMPED_AT_COMMIT)

    def empty_retired(self) -> None:
        """Delete the checkpoints Orbax has retired so far, every file emptied first (process 0 only)."""
        if jax.process_index() == 0:
            remove_path(self.directory / RETIRED_SUBDIR)

    def save(self, step: int, state: Any, meta: dict[str, Any], val_accuracy: float | None) -> float:
        """Start an asynchronous save; return the seconds the caller was blocked (waiting for the previous included).

        Raises CheckpointSaveError naming the step whose save failed: this one, or the previous one still in flight.
        """
        start = time.perf_counter()
        metrics = None if val_accuracy is None else {VAL_ACCURACY_METRIC: float(val_accuracy)}
        # One asynchronous save at a time (Orbax would wait here anyway); once it is done, nothing is renaming into
        # the retired folder while it is emptied.
        self._finish_pending()
        self._pending = step
        try:
            self._manager.save(
                step, metrics=metrics, args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
            )
        except Exception as error:
            self._save_failed(error)
        return time.perf_counter() - start

    def wait(self) -> float:
        """Block until the pending save is on disk; return the seconds waited."""
        start = time.perf_counter()
        self._finish_pending()
        return time.perf_counter() - start

    def _finish_pending(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._save_failed(error)
        self._pending = None
        self._orbax_output.saved()
        self.empty_retired()

    def _save_failed(self, error: BaseException) -> NoReturn:
        """Remove what the failed save of the pending step wrote (every file emptied first), then raise its error."""
        step, self._pending, self._failed = self._pending, None, True
        self._orbax_output.failed()
        if jax.process_index() == 0:
            for partial in self._partial_saves(step):
                try:
                    remove_path(partial)
                except OSError:  # still being written to: the next start removes it (clean_leftovers)
                    pass
        raise CheckpointSaveError.at_step(step, self.directory, error) from None

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """Restore the newest checkpoint that is not damaged into `abstract_state`'s shapes and shardings; None when
        the run has no checkpoint.

        A checkpoint proven damaged (a file differs from its checksum, or no commit marker) is named in a one-line
        warning and the one before it is tried; the damaged ones are deleted once one restores (they would block
        saving their steps again). Raises CheckpointError, deleting nothing, for a checkpoint that still cannot be
        read after retries, that does not fit `abstract_state`, or that fails to restore for another reason, and when
        every checkpoint is damaged: a resume never starts again from step 0 while checkpoints exist.
        """
        damaged: list[Path] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            path = self.directory / str(step)
            try:
                restored = checksums.read_with_retries(functools.partial(self._restore, step, abstract_state))
            except CheckpointDamagedError as error:
                if jax.process_index() == 0:
                    errors.warn(f"skipping damaged checkpoint: {error}")
                damaged.append(path)
                continue
            except CheckpointError:
                raise
            except Exception as error:  # orbax and tensorstore raise many types
                raise checksums.unreadable(path, error) from None
            if jax.process_index() == 0:
                for damaged_path in damaged:
                    remove_step_dir(damaged_path)
            distributed.sync("damaged checkpoints removed")  # before any process's manager lists the folder again
            self._manager.reload()
            return restored
        if damaged:
            raise checksums.all_damaged(self.directory, damaged)
        return None

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        path = self.directory / str(step)
        if not (path / _COMPLETE_MARKER).is_file():
            raise CheckpointDamagedError(f"{path} is damaged: its save never completed (no commit marker)")
        checksums.check_sums(path / checksums.FOLDER_SUMS, path)
        mismatch = CheckpointError.not_fitting(path, _shapes_by_key(self._manager.item_metadata(step)[STATE_ITEM]),
                                               _shapes_by_key(abstract_state))
        if mismatch is not None:
            raise mismatch
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore(),
        }))
        return restored[STATE_ITEM], dict(restored[META_ITEM])

    def close(self) -> None:
        """Finish the pending save and deletions; raises CheckpointSaveError naming the step when that save failed
        (a failure already raised is not raised again)."""
        try:
            if not self._failed:
                self._finish_pending()
        finally:
            try:
                self._manager.close()
            except Exception:  # Orbax raises a failed save again on closing; it was raised above, or before
                pass
            finally:
                self._orbax_output.__exit__(None, None, None)
        self.empty_retired()
