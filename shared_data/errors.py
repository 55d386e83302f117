"""The errors both stacks raise when a run cannot go on, their exit codes, the one way a script exits on them, and
the one channel both stacks tell a warning through."""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

# argparse exits 2 on a bad flag; a value found wrong later is the same kind of mistake.
USAGE_EXIT_CODE = 2
FAILURE_EXIT_CODE = 1
# 128 + SIGINT, what a shell reports for a run stopped by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130


class RunError(Exception):
    """A run that cannot go on; the message is one line naming the file or flag and what to do."""

    exit_code = FAILURE_EXIT_CODE


class ConfigError(RunError, ValueError):
    """A flag value that cannot work; the message names the flag."""

    exit_code = USAGE_EXIT_CODE


class DataError(RunError):
    """The data could not be written or read for a reason no flag fixes (disk full, I/O error)."""


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""

    @classmethod
    def at_step(cls, step: int, loss: float, last_saved: object | None) -> "NonFiniteLossError":
        """The error both stacks raise for a non-finite `loss` at global `step` (1-based), naming the path of
        the last checkpoint saved before it (None: no checkpoint yet)."""
        return cls(f"non-finite training loss ({loss}) at step {step}: stopped; last good checkpoint: "
                   f"{last_saved or 'none'}; lower --lr, raise --warmup-epochs or use --precision fp32, then --resume")


class CheckpointError(RunError):
    """A checkpoint that cannot be restored; the message names it and why."""

    @classmethod
    def not_fitting(cls, checkpoint: object, saved: dict[str, tuple[int, ...]], now: dict[str, tuple[int, ...]],
                    named: int = 3) -> "CheckpointError | None":
        """The error both stacks raise for a checkpoint whose arrays (name -> shape) are not those being trained
        (a code change), naming the first `named` differences and how many more; None when they are the same."""
        differences = [f"{key} is not in the checkpoint" for key in sorted(now.keys() - saved.keys())]
        differences += [f"{key} is only in the checkpoint" for key in sorted(saved.keys() - now.keys())]
        differences += [f"{key} has shape {saved[key]} in the checkpoint, {now[key]} now"
                        for key in sorted(saved.keys() & now.keys()) if tuple(saved[key]) != tuple(now[key])]
        if not differences:
            return None
        more = f" and {len(differences) - named} more" if len(differences) > named else ""
        return cls(f"checkpoint {checkpoint} does not fit the model being trained: {', '.join(differences[:named])}"
                   f"{more}; resume with the code and flags that saved it, or use a new --run-name")


class CheckpointDamagedError(CheckpointError):
    """A checkpoint proven damaged on disk (a file differs from its saved checksum, or the save never committed):
    the only kind a resume skips, and later deletes."""


class CheckpointSaveError(RunError):
    """A save that failed (disk full, permissions); the previous complete checkpoint is untouched."""

    @classmethod
    def at_step(cls, step: int | None, folder: object, error: BaseException) -> "CheckpointSaveError":
        """The error both stacks raise when saving the checkpoint of global `step` into `folder` failed with `error`:
        a full disk says what to free, any other failure its first line."""
        what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
        if is_disk_full(error):
            return cls(f"disk full while saving {what} in {folder}: free space there or lower --keep-checkpoints, "
                       "then --resume; the previous complete checkpoint is intact")
        return cls(f"saving {what} in {folder} failed ({first_line(error)}); the previous complete checkpoint is intact")


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (at most `limit` characters), or its type's name when it has none: what
    a one-line message quotes of a library's error."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, is a full disk (ENOSPC, or a library's error carrying its text)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if os.strerror(errno.ENOSPC) in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def warn(message: str) -> None:
    """Tell the user something that does not stop the run: one line, 'warning: <message>', on stderr. Both stacks
    and the shared code warn only through here (not `warnings.warn`, which prefixes a source file and line)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def exit_on_error(prog: str, run: Callable[[], T], run_name: str | None = None) -> T:
    """Call `run()`; on a RunError or Ctrl-C print one line to stderr and exit with that error's code.

    Raises SystemExit(2) for a ConfigError, SystemExit(1) for any other RunError and SystemExit(130) on
    KeyboardInterrupt (with the flags that continue the run when `run_name` is given).
    """
    try:
        return run()
    except RunError as error:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        hint = f"; continue with --resume --run-name {run_name}" if run_name else ""
        print(f"{prog}: interrupted{hint}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None


def exit_from_thread(prog: str, error: RunError) -> None:
    """Print `error` as exit_on_error does and end the process at once with its exit code (os._exit: no clean-up).

    For a watchdog thread whose main thread is blocked in native code that cannot be interrupted and would itself end
    the process later with a stack trace (jax.distributed.initialize waiting for processes that never come).
    """
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    os._exit(error.exit_code)
