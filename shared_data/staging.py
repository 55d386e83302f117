"""Staging folders for all-or-nothing writes (extraction, synthetic set, cache); removal of those killed runs left."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from pathlib import Path

from shared_data.trash_safe import remove_path

# `.{kind}-{name}-{pid}@{host}-XXXXXXXX`: each is renamed into place when complete, so one still here after its owner
# has gone is the remains of a killed run (an extraction alone can leave 340 MB).
KINDS = ("extract", "building", "synthetic")
# Another host's processes cannot be seen from here (a data folder on a shared disk), nor has a folder made before
# owners were recorded an owner: those count as abandoned once untouched this long, far past any extraction or build.
UNKNOWN_OWNER_AGE_S = 24 * 3600
_OWNER = re.compile(r"(\d+)@([\w.]+)")


def _host() -> str:
    return re.sub(r"[^\w.]", "_", socket.gethostname())  # no "-": it separates the fields of the folder name


def make_staging(parent: str | os.PathLike, kind: str, name: str) -> Path:
    """A new empty folder under `parent` in which this process writes `name` before renaming it into place."""
    if kind not in KINDS:
        raise ValueError(f"unknown staging kind {kind!r}; add it to KINDS so its leftovers are cleaned")
    return Path(tempfile.mkdtemp(prefix=f".{kind}-{name}-{os.getpid()}@{_host()}-", dir=parent))


def remove_abandoned(parent: str | os.PathLike) -> list[Path]:
    """Remove, trash-safely, the staging folders under `parent` whose owner is gone; return those removed."""
    removed = []
    for kind in KINDS:
        for folder in sorted(Path(parent).glob(f".{kind}-*")):
            if folder.is_symlink() or not folder.is_dir() or not _abandoned(folder):
                continue
            try:
                remove_path(folder)
            except OSError:  # another process of the same run removing it too; or not ours to remove: next run
                continue
            removed.append(folder)
    return removed


def _abandoned(folder: Path) -> bool:
    owner = _OWNER.fullmatch(folder.name.rsplit("-", 2)[-2])
    if owner is not None and owner[2] == _host():
        return not _process_alive(int(owner[1]))
    try:
        return time.time() - folder.stat().st_mtime > UNKNOWN_OWNER_AGE_S
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        pass
    return True
