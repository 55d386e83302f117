"""Checkpoint integrity for both stacks: SHA-256 sums written at save time and checked before a restore, and
retries of reads that fail for a moment (a read error is never taken for damage)."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from shared_data.errors import CheckpointDamagedError, CheckpointError
from shared_data.trash_safe import atomic_write_bytes, remove_path

T = TypeVar("T")

# Both files use `sha256sum`'s format, so `sha256sum -c` checks them too: "<hex digest>  <relative path>" a line.
SIDECAR_SUFFIX = ".sha256"  # a checkpoint file's sums: "<file>.sha256" beside it (Lightning)
FOLDER_SUMS = "SHA256SUMS"  # a checkpoint folder's sums: every file below it (Flax)
# A read that fails with one of these is tried again: a busy network drive or a flaky disk, not a damaged file.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE,
                              errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET, errno.ECONNABORTED})
_TRANSIENT_TEXT = tuple(os.strerror(code) for code in TRANSIENT_ERRNOS)
READ_ATTEMPTS = 3
RETRY_DELAY_S = 0.5  # before the second attempt; doubled before each later one
_CHUNK = 1 << 20


def digest_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_sums(sums_path: Path, digests: dict[str, str]) -> None:
    """Write `digests` (relative path -> hex) atomically, in sha256sum's format."""
    atomic_write_bytes(sums_path, "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items())).encode())


def sum_folder(folder: Path, skip: Iterable[str] = ()) -> None:
    """Write FOLDER_SUMS in `folder`: the digest of every file below it but those named in `skip` (relative)."""
    skipped = {FOLDER_SUMS, *skip}
    digests = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink() and name not in skipped:
            digests[name] = digest_file(path)
    write_sums(folder / FOLDER_SUMS, digests)


def sidecar(path: str | os.PathLike) -> Path:
    """Where a checkpoint file's sums live: "<file>.sha256"."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, digest: str) -> None:
    """Record `digest` as the SHA-256 of the file at `path` (written whole before this is called)."""
    write_sums(sidecar(path), {Path(path).name: digest})


def check_sums(sums_path: Path, checkpoint: Path) -> None:
    """Check every file `sums_path` lists (relative to its folder) against its digest.

    Raises CheckpointDamagedError naming `checkpoint` and the first file that is missing or differs; CheckpointError
    when `sums_path` itself is missing (every checkpoint is published with its sums, so a checkpoint without them
    was altered by hand: it is not proven damaged, so it is kept, and nothing is skipped); OSError when a file cannot
    be read (see read_with_retries).
    """
    try:
        text = sums_path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint} has no checksums ({sums_path.name} is missing), so it cannot be checked: "
                              "restore that file, or move the checkpoint away to resume from the one before") from None
    for number, line in enumerate(text.splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise CheckpointDamagedError(f"{checkpoint} is damaged: line {number} of {sums_path.name} is garbled")
        path = sums_path.parent / name
        # Name the file within the checkpoint folder (Flax), or the checkpoint file itself (Lightning).
        what = "it" if path == checkpoint else name
        if not path.is_file():
            raise CheckpointDamagedError(f"{checkpoint} is damaged: {what} is missing")
        if digest_file(path) != digest:
            raise CheckpointDamagedError(f"{checkpoint} is damaged: {what} differs from what was saved "
                                         "(SHA-256 mismatch: truncated or altered)")


def remove_with_sums(path: str | os.PathLike) -> int:
    """Delete (trash-safely) a checkpoint file, then its sidecar; return the bytes freed. A kill between the two
    leaves a sidecar without its file, which the stack lists among the leftovers."""
    return remove_path(path) + remove_path(sidecar(path))


def is_transient(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, is a read failure worth trying again (see TRANSIENT_ERRNOS);
    TensorStore reports those as ValueErrors carrying the system's message."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
            return True
        if not isinstance(error, CheckpointError) and any(text in str(error) for text in _TRANSIENT_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def read_with_retries(read: Callable[[], T], attempts: int = READ_ATTEMPTS) -> T:
    """`read()`, called again (after a pause) while it fails with a transient error, `attempts` times in all; the
    last error is raised as it came."""
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
        time.sleep(RETRY_DELAY_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def unreadable(checkpoint: str | os.PathLike, error: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint that could not be read or restored for a reason other than damage:
    nothing is deleted, and the run stops rather than fall back or start again."""
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    if is_transient(error):
        return CheckpointError(f"checkpoint {checkpoint} could not be read after {READ_ATTEMPTS} attempts ({reason}): "
                               "a read error, not damage, so it is kept; check the disk, then --resume again")
    return CheckpointError(f"checkpoint {checkpoint} cannot be restored ({type(error).__name__}: {reason}); it is kept, "
                           "as only a checksum mismatch proves damage: check it with scripts/checkpoints.py verify, "
                           "and move it away to resume from the one before")


def all_damaged(folder: str | os.PathLike, damaged: Iterable[Path]) -> CheckpointError:
    """The error of a --resume whose every checkpoint is damaged: it neither starts again from step 0 nor deletes
    them, so a relaunch with --resume never quietly throws the run away."""
    return CheckpointError(f"--resume: every checkpoint in {folder} is damaged ({', '.join(p.name for p in damaged)}), "
                           "so none is used or deleted: move them away to start the run again from step 0")
