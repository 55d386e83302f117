"""Which checkpoints a run keeps (the best by validation accuracy and the latest), and how one is described."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint on disk, as either stack lists it (nothing is loaded).

    `epoch` is the 1-based epoch its last optimiser step belongs to; `val_accuracy` (0..1) is set for
    checkpoints saved right after a validation; `bytes` is its size on disk; `role` is the Lightning
    file's "best" or "last" (None for a Flax step folder, which serves as both).
    """

    path: Path
    step: int | None
    epoch: int | None
    val_accuracy: float | None
    bytes: int
    complete: bool
    stack: str
    role: str | None = None


def best_steps(checkpoints: Iterable[tuple[int, float | None]], keep: int) -> set[int]:
    """The keep-1 steps with the highest val accuracy out of (step, accuracy or None) pairs; of equal accuracies
    the earlier step stays, as in Lightning's stock ModelCheckpoint(mode="max", save_top_k=keep-1), which
    replaces a kept checkpoint only with a strictly better one."""
    scored = sorted({(-accuracy, step) for step, accuracy in checkpoints if accuracy is not None})
    return {step for _, step in scored[: max(keep - 1, 0)]}


def kept_steps(checkpoints: Iterable[tuple[int, float | None]], keep: int) -> set[int]:
    """The steps a run keeps, `keep` >= 1 at most: the newest step, and the keep-1 best (see best_steps)."""
    checkpoints = list(checkpoints)
    if not checkpoints:
        return set()
    return best_steps(checkpoints, keep) | {max(step for step, _ in checkpoints)}


def kept_checkpoints(infos: Sequence[CheckpointInfo], keep: int) -> list[CheckpointInfo]:
    """The complete checkpoints a run keeps under kept_steps, one per role and step, in the order given.

    `infos` are in the stack's order of recency (list_checkpoints), so of two files of one step and role the
    later is kept. A Flax step folder (role None) serves as both best and latest; of Lightning's files, the
    "best" file of each best step is kept, and one file of the newest step, its "last" file where there is one.
    A checkpoint without a step is not kept.
    """
    complete = [info for info in infos if info.complete and info.step is not None]
    if not complete:
        return []
    best = best_steps([(info.step, info.val_accuracy) for info in complete], keep)
    latest = max(info.step for info in complete)
    chosen: dict[tuple[int, bool], CheckpointInfo] = {}
    for info in complete:  # later files of one (step, role) replace earlier ones
        if info.step in best and info.role in (None, "best"):
            chosen[(info.step, True)] = info
    at_latest = [info for info in complete if info.step == latest]
    newest = max(reversed(at_latest), key=lambda info: info.role == "last")  # the last "last" file, else the last file
    if newest not in chosen.values():
        chosen[(latest, False)] = newest
    return [info for info in complete if info in chosen.values()]
