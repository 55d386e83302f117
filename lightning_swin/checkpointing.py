"""Lightning checkpoint files: atomic trash-safe IO with checksums, the best-and-latest ModelCheckpoints, pruning,
list/verify."""

from __future__ import annotations

import functools
import hashlib
import io
import re
from pathlib import Path
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from shared_data import checkpoint_folder, checksums, errors, retention, tags
from shared_data.checkpoint_folder import checkpoint_dir
from shared_data.clock import Sections
from shared_data.errors import CheckpointDamagedError, CheckpointError, CheckpointSaveError
from shared_data.retention import CheckpointInfo
from shared_data.trash_safe import atomic_write_bytes, partial_write_target, remove_path

STACK = "lightning"
SUFFIX = ".ckpt"
# File names (1-based epoch, global step): the best by val accuracy, and the latest (after a validation, or of the
# every-N-steps saves, which never save a step a validation follows, so the two never share a name).
BEST_NAME = "best-epoch={epoch:03d}-step={step:06d}-val_accuracy={" + tags.VAL_ACCURACY + ":.4f}"
LATEST_NAME = "last-epoch={epoch:03d}-step={step:06d}"
# best-epoch=003-step=000120-val_accuracy=0.4563.ckpt / last-epoch=003-step=000120.ckpt, and "-v1" where
# ModelCheckpoint's version counter kept a save from overwriting a file of the same name.
_NAME = re.compile(
    r"^(?P<role>best|last)-epoch=(?P<epoch>\d+)-step=(?P<step>\d+)"
    r"(?:-val_accuracy=(?P<acc>[0-9.]+))?(?:-v(?P<version>\d+))?\.ckpt$"
)
# What a checkpoint must hold for Trainer.fit(ckpt_path=...) to continue from it.
_REQUIRED_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step", "epoch")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written whole or not at all, each with its SHA-256 sidecar (checksums.sidecar), deleted with
    it by truncating them first; every save is timed into the "checkpoint" section of `sections`.

    The sidecar is written first, from the bytes about to be written, so every published checkpoint has its sum
    (as the Flax stack's folders have theirs before Orbax renames them into place); a kill between the two leaves
    a sidecar without its file, a leftover the next start removes.
    """

    def __init__(self, sections: Sections) -> None:
        super().__init__()
        # Every save of every ModelCheckpoint comes through here: the one clock of epoch/checkpoint_time_s.
        self.sections = sections
        self.last_saved: Path | None = None  # the newest complete file this process wrote

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        with self.sections("checkpoint"):
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            try:
                checksums.write_sidecar(path, hashlib.sha256(buffer.getbuffer()).hexdigest())
                try:
                    atomic_write_bytes(path, buffer.getbuffer())
                except OSError:
                    remove_path(checksums.sidecar(path))
                    raise
            except OSError as error:
                raise CheckpointSaveError.at_step(checkpoint.get("global_step"), Path(path).parent, error) from None
            self.last_saved = Path(path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Our own files hold optimiser, loop and RNG states, which the weights-only unpickler refuses.
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=False)

    def remove_checkpoint(self, path: str | Path) -> None:
        checksums.remove_with_sums(path)


class EveryNStepsCheckpoint(ModelCheckpoint):
    """Stock ModelCheckpoint(every_n_train_steps=N), except at the last step of an epoch or of the run.

    Those steps are saved after their validation by the other callbacks; a file from before a validation would
    resume past it (Lightning does not validate again on restoring it).
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        epoch_end = batch_idx + 1 >= trainer.num_training_batches
        run_end = 0 < trainer.max_steps <= trainer.global_step
        if not (epoch_end or run_end):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def checkpoint_callbacks(dirpath: str | Path, keep: int, every_n_steps: int = 0) -> list[ModelCheckpoint]:
    """ModelCheckpoints for the best-and-latest rule: the latest and the keep-1 best by val accuracy, saved after
    each validation, plus the latest of every `every_n_steps` steps when that is > 0.

    Each deletes the files it supersedes through the strategy's CheckpointIO, and none overwrites a file (the
    version counter picks a new name). What they leave beside the rule (the file a run resumed from, the last
    step-save) goes in prune_checkpoints() after the fit.
    """
    common = dict(dirpath=str(dirpath), auto_insert_metric_name=False, save_on_train_epoch_end=False)
    # The highest step is the latest; after validation, not at the train epoch's end, so it holds the epoch's metrics.
    callbacks = [ModelCheckpoint(filename=LATEST_NAME, monitor="step", mode="max", save_top_k=1, every_n_epochs=1,
                                 **common)]
    if keep > 1:
        callbacks.append(ModelCheckpoint(filename=BEST_NAME, monitor=tags.VAL_ACCURACY, mode="max", save_top_k=keep - 1,
                                         every_n_epochs=1, **common))
    if every_n_steps > 0:
        callbacks.append(EveryNStepsCheckpoint(filename=LATEST_NAME, save_top_k=1, every_n_train_steps=every_n_steps,
                                               **common))
    return callbacks


def prune_checkpoints(run_dir: str | Path, keep: int, damaged: Iterable[str | Path] = ()) -> list[Path]:
    """Delete, trash-safely and with their sidecars, the `damaged` files (those resume_point skipped) and the
    checkpoints shared_data.retention does not keep (kept_checkpoints: the newest step's "last" file and the "best"
    file of each of the keep-1 best steps). Returns what was removed."""
    removed = [Path(path) for path in damaged if Path(path).exists()]
    infos = [info for info in list_checkpoints(run_dir) if info.complete and info.path not in removed]
    kept = {info.path for info in retention.kept_checkpoints(infos, keep)}
    removed += [info.path for info in infos if info.path not in kept]
    for path in removed:
        checksums.remove_with_sums(path)
    return removed


def checkpoint_step(path: str | Path) -> int | None:
    """The global step a checkpoint file's name gives."""
    return _info(Path(path), complete=True).step


def _parse(path: Path) -> re.Match[str] | None:
    """The fields of a checkpoint file's name (of the file being written, for an unfinished save)."""
    return _NAME.match(partial_write_target(path) or path.name)


def _info(path: Path, complete: bool) -> CheckpointInfo:
    match = _parse(path)
    size = path.stat().st_size if path.is_file() else 0
    if match is None:
        return CheckpointInfo(path=path, step=None, epoch=None, val_accuracy=None, bytes=size, complete=complete,
                              stack=STACK)
    acc = match.group("acc")
    return CheckpointInfo(
        path=path, step=int(match.group("step")), epoch=int(match.group("epoch")),
        val_accuracy=float(acc) if acc is not None else None, bytes=size, complete=complete, stack=STACK,
        role=match.group("role"),
    )


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint of a run, complete ones and unfinished saves, oldest step first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.is_file() and path.suffix == SUFFIX and not path.name.startswith("."):
            found.append(_info(path, complete=True))
        elif path.is_file() and partial_write_target(path) is not None and not _is_sums(path):
            found.append(_info(path, complete=False))
    return sorted(found, key=_recency)


def _is_sums(path: Path) -> bool:
    """A sidecar of checksums, or a sidecar being written."""
    return (partial_write_target(path) or path.name).endswith(checksums.SIDECAR_SUFFIX)


def _recency(info: CheckpointInfo) -> tuple[int, int, int]:
    """Order by step; at equal steps a "last" checkpoint counts as newer than a "best" one, and of two versions
    of one name the later as newer."""
    match = _parse(info.path)
    if match is None:
        return (-1, -1, 0)
    return (info.step, 1 if info.role == "last" else 0, int(match.group("version") or 0))


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint's sidecar checksum, load it and check it can be resumed from; raise CheckpointError naming
    it otherwise (CheckpointDamagedError when it is proven damaged: it differs from its checksum)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = checksums.read_with_retries(functools.partial(_load_checked, path))
    except CheckpointError:
        raise
    except Exception as error:
        raise checksums.unreadable(path, error) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__})")
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not resumable, missing {', '.join(missing)}")
    bad = [name for name, tensor in checkpoint["state_dict"].items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite weights in {bad[0]} (and {len(bad) - 1} more)")
    return checkpoint


def _load_checked(path: Path) -> Any:
    checksums.check_sums(checksums.sidecar(path), path)
    return torch.load(path, map_location="cpu", weights_only=False)


def leftovers(run_dir: str | Path) -> list[Path]:
    """Unfinished saves, sidecars whose checkpoint is gone, and stray temporary files or folders a killed run left."""
    found = checkpoint_folder.unfinished_writes(run_dir)
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            orphan = path.name.endswith(checksums.SIDECAR_SUFFIX) and not path.with_name(path.stem).exists()
            if path.is_dir() or partial_write_target(path) is not None or orphan:
                found.append(path)
    return sorted(found)


def clean_leftovers(run_dir: str | Path, announce: bool = True) -> list[Path]:
    """Delete (trash-safely) what leftovers() finds, each named in a warning when `announce`; return it."""
    return checkpoint_folder.remove_leftovers(leftovers(run_dir), announce=announce)


def resume_point(run_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint that is not damaged (None when the run has none), and the newer damaged ones
    it skipped, each named in a warning; prune_checkpoints deletes those once the run succeeds.

    Raises CheckpointError, skipping nothing, for a checkpoint that still cannot be read after retries or is not
    resumable for another reason, and when every checkpoint is damaged: a resume never starts again from step 0
    while checkpoints exist.
    """
    damaged = []
    for info in reversed([c for c in list_checkpoints(run_dir) if c.complete]):
        try:
            verify_checkpoint(info.path)
        except CheckpointDamagedError as error:
            errors.warn(f"skipping damaged checkpoint: {error}")
            damaged.append(info.path)
            continue
        return info.path, damaged
    if damaged:
        raise checksums.all_damaged(checkpoint_dir(run_dir), damaged)
    return None, damaged
