"""Where both stacks keep a run's checkpoints, and the removal of what an interrupted save left there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from shared_data import errors
from shared_data.trash_safe import partial_write_target, remove_path

CHECKPOINT_DIR = "checkpoints"  # <run folder>/checkpoints/


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / CHECKPOINT_DIR


def unfinished_writes(folder: str | os.PathLike) -> list[Path]:
    """The files in `folder` that shared_data.trash_safe.atomic_write_bytes began and never renamed into place."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and partial_write_target(path) is not None)


def remove_leftovers(found: Iterable[Path], *, announce: bool = True) -> list[Path]:
    """Delete, trash-safely, what a stack's `leftovers()` found (unfinished saves, half-deleted checkpoints), each
    named in one warning when `announce`; return what was removed."""
    removed = []
    for path in found:
        if announce:
            errors.warn(f"removing {path}, left by an interrupted save")
        remove_path(path)
        removed.append(path)
    return removed
