"""Disk hygiene: atomic writes, and deletions that leave only empty files in a cloud drive's trash."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

# Module-level so tests can swap in a "move to trash" removal and check what lands there.
_unlink: Callable[[str | os.PathLike], None] = os.unlink
_rmdir: Callable[[str | os.PathLike], None] = os.rmdir
# atomic_write_bytes writes "<name>" as ".<name>.<random>.tmp" and renames it into place when whole, so a file of
# that shape is a write that never finished.
_PARTIAL_WRITE = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


def _truncate_and_unlink(path: Path) -> int:
    """Empty a file in place, then remove it; return the bytes freed."""
    if path.is_symlink():
        # Truncating would empty the link's target, which we do not own.
        _unlink(path)
        return 0
    size = path.stat().st_size
    # A mounted cloud drive moves "deleted" files to its trash; an emptied file costs nothing there.
    os.truncate(path, 0)
    _unlink(path)
    return size


def remove_path(path: str | os.PathLike) -> int:
    """Delete a file or a whole folder, truncating every file to zero bytes first; return bytes freed."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return 0
    if path.is_symlink() or path.is_file():
        return _truncate_and_unlink(path)
    freed = 0
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            freed += _truncate_and_unlink(Path(root) / name)
        for name in dirs:
            sub = Path(root) / name
            if sub.is_symlink():
                _unlink(sub)
            else:
                _rmdir(sub)
    _rmdir(path)
    return freed


def tree_size(path: str | os.PathLike) -> int:
    """Bytes held by a file or folder (links not followed)."""
    path = Path(path)
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def partial_write_target(path: str | os.PathLike) -> str | None:
    """The name atomic_write_bytes was writing when it left `path` (".<name>.<random>.tmp"), or None for any other
    name."""
    match = _PARTIAL_WRITE.match(Path(path).name)
    return match.group("name") if match else None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so a crash leaves either the old content or the new, never a partial file (see
    partial_write_target for the name it uses meanwhile)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write an indented JSON file."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
