"""Atomic, trash-safe Lightning checkpoint files, and the list/verify/leftovers helpers for scripts/checkpoints.py."""

from __future__ import annotations

import errno
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from shared_data.trash_safe import atomic_write_bytes, remove_path

CHECKPOINT_DIR = "checkpoints"
SUFFIX = ".ckpt"
# shared_data.trash_safe.atomic_write_bytes writes to ".<name>.<random>.tmp" and renames it into place,
# so anything with that shape is a save that never finished.
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")
# best-epoch=003-step=000120-val_accuracy=0.4563.ckpt / last-epoch=003-step=000120.ckpt
_NAME = re.compile(
    r"^(?P<role>best|last)-epoch=(?P<epoch>\d+)-step=(?P<step>\d+)"
    r"(?:-val_accuracy=(?P<acc>[0-9.]+))?(?:-v\d+)?\.ckpt$"
)
# What a checkpoint must hold for Trainer.fit(ckpt_path=...) to continue from it.
_REQUIRED_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names the file and the reason in one line."""


class CheckpointDiskFullError(OSError):
    """The disk filled up during a save; the previous checkpoints are untouched."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file as seen on disk (parsed from its name; nothing is loaded)."""

    path: Path
    step: int | None
    epoch: int | None  # 1-based epoch its last optimiser step belongs to
    val_accuracy: float | None  # set for "best" checkpoints, saved right after a validation
    bytes: int
    complete: bool
    kind: str = "lightning"
    role: str | None = None  # "best" or "last"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written whole or not at all, and deleted by truncating them first."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write_bytes(path, buffer.getbuffer())
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise CheckpointDiskFullError(
                    errno.ENOSPC,
                    f"no space left on device while saving {path}; the previous checkpoints are intact: "
                    "free some space, then continue with --resume",
                ) from None
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Our own files hold optimiser, loop and RNG states, which the weights-only unpickler refuses.
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=False)

    def remove_checkpoint(self, path: str | Path) -> None:
        remove_path(path)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / CHECKPOINT_DIR


def _info(path: Path, complete: bool) -> CheckpointInfo:
    name = path.name
    if not complete:
        partial = _PARTIAL.match(name)
        name = partial.group("name") if partial else name
    match = _NAME.match(name)
    size = path.stat().st_size if path.is_file() else 0
    if match is None:
        return CheckpointInfo(path=path, step=None, epoch=None, val_accuracy=None, bytes=size, complete=complete)
    acc = match.group("acc")
    return CheckpointInfo(
        path=path, step=int(match.group("step")), epoch=int(match.group("epoch")),
        val_accuracy=float(acc) if acc is not None else None, bytes=size, complete=complete,
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
        elif path.is_file() and _PARTIAL.match(path.name):
            found.append(_info(path, complete=False))
    return sorted(found, key=_recency)


def _recency(info: CheckpointInfo) -> tuple[int, int, str]:
    """Order by step; at equal steps a "last" checkpoint counts as newer than a "best" one."""
    return (info.step if info.step is not None else -1, 1 if info.role == "last" else 0, info.path.name)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint and check it can be resumed from; raise CheckpointError naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a damaged zip archive
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot be read ({reason})") from None
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


def leftovers(run_dir: str | Path) -> list[Path]:
    """Unfinished saves and stray temporary files or folders a killed run left behind."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob(".*.tmp") if p.is_file()] if run_dir.is_dir() else []
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() or _PARTIAL.match(path.name):
                found.append(path)
    return sorted(found)


def clean_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete leftovers through the trash-safe removal; return what was removed."""
    removed = leftovers(run_dir)
    for path in removed:
        remove_path(path)
    return removed


def latest_resumable(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that loads; damaged ones are skipped with a warning naming them."""
    for info in reversed([c for c in list_checkpoints(run_dir) if c.complete]):
        try:
            verify_checkpoint(info.path)
        except CheckpointError as error:
            warnings.warn(f"skipping damaged checkpoint: {error}", stacklevel=2)
            continue
        return info.path
    return None
