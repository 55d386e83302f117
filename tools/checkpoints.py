"""List, verify, prune and clean the checkpoints of Lightning and Flax runs, reporting the bytes freed."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from shared_data.checksums import remove_with_sums
from shared_data.retention import CheckpointInfo, kept_checkpoints
from shared_data.run_config import DEFAULTS
from shared_data.trash_safe import tree_size

STACKS = ("lightning", "flax")
# Where each stack's list/verify/leftovers helpers live; tests point these at stand-ins.
BACKEND_MODULES: dict[str, str] = {"lightning": "lightning_swin.checkpointing", "flax": "flax_swin.checkpointing"}
KEEP_BEST_AND_LATEST = "best-and-latest"
DEFAULT_KEEP = DEFAULTS["keep_checkpoints"]
# Verifying a handful of checkpoints is quick; a progress bar only helps past this many.
_PROGRESS_MIN = 3


class ToolError(Exception):
    """A problem with what the user asked for; main() prints it as one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """One run: `<logdir>/<stack>/<run-name>/`, holding `checkpoints/`."""

    path: Path
    stack: str

    @property
    def label(self) -> str:
        return f"{self.stack}/{self.path.name}"


@dataclasses.dataclass
class Action:
    """One planned or done deletion, with the reason shown to the user."""

    run: RunFolder
    path: Path
    reason: str
    bytes: int = 0


@dataclasses.dataclass(frozen=True)
class _Leftover:
    """A partial save the stack does not list as a checkpoint, shown among them by `verify`."""

    path: Path
    step: int | None = None
    complete: bool = False


def backend(stack: str) -> ModuleType:
    """The stack's checkpointing module (list_checkpoints, verify_checkpoint, leftovers)."""
    name = BACKEND_MODULES[stack]
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ToolError(f"cannot read {stack} checkpoints: {name} does not import ({error}); "
                        "is the project installed (pip install -e .)?") from None


def _stack_of(folder: Path) -> str | None:
    """A run folder's stack: from its config.json, else from the `<stack>/` folder it sits in."""
    config = folder / "config.json"
    if config.is_file():
        try:
            stack = json.loads(config.read_text()).get("stack")
        except (OSError, ValueError, AttributeError):
            stack = None
        if stack in STACKS:
            return stack
    return folder.parent.name if folder.parent.name in STACKS else None


def _looks_like_run(folder: Path) -> bool:
    return (folder / "checkpoints").is_dir() or (folder / "config.json").is_file()


def find_runs(target: str | Path) -> list[RunFolder]:
    """The runs under `target`: a run folder, a `<logdir>/<stack>/` folder, or a whole logdir."""
    target = Path(target)
    if not target.exists():
        raise ToolError(f"{target} does not exist; pass a run folder (<logdir>/<stack>/<run>) or a logdir (default runs)")
    if not target.is_dir():
        raise ToolError(f"{target} is a file, not a run folder; pass <logdir>/<stack>/<run> or a logdir")
    if target.name == "checkpoints" and _looks_like_run(target.parent):
        target = target.parent  # the run's own checkpoints/ folder means that run
    if _looks_like_run(target):
        stack = _stack_of(target)
        if stack is None:
            raise ToolError(f"{target} is not a run folder: its config.json names no stack and it is not under "
                            f"lightning/ or flax/; pass <logdir>/<stack>/<run>")
        return [RunFolder(target, stack)]
    stack_folders = [(target, target.name)] if target.name in STACKS else [(target / s, s) for s in STACKS]
    runs = [RunFolder(run, stack)
            for folder, stack in stack_folders if folder.is_dir()
            for run in sorted(folder.iterdir()) if run.is_dir() and _looks_like_run(run)]
    if not runs:
        raise ToolError(f"{target} is not a run folder and holds no runs (<stack>/<run>/ with checkpoints/ or "
                        "config.json); pass a run folder or a logdir")
    return runs


def list_run(run: RunFolder) -> list[Any]:
    """The run's checkpoints, oldest step first."""
    return sorted(backend(run.stack).list_checkpoints(run.path), key=lambda info: (_step(info), str(info.path)))


def _step(info: Any) -> int:
    """A checkpoint's step for ordering; one whose name gives no step sorts oldest."""
    return info.step if info.step is not None else -1


def select_kept(infos: Sequence[CheckpointInfo], keep_newest: int | None = None,
                keep: int = DEFAULT_KEEP) -> list[CheckpointInfo]:
    """The complete checkpoints a prune keeps: the newest N, or the training runs' own rule
    (shared_data.retention: the latest and the keep-1 best by val accuracy)."""
    if keep_newest is None:
        return kept_checkpoints(infos, keep)
    complete = sorted((i for i in infos if i.complete), key=lambda info: (_step(info), str(info.path)))
    return complete[-keep_newest:] if keep_newest > 0 else []


def run_keep(run: RunFolder) -> int:
    """The --keep-checkpoints the run was trained with (its config.json), else the training default."""
    try:
        keep = json.loads((run.path / "config.json").read_text()).get("keep_checkpoints")
    except (OSError, ValueError, AttributeError):
        keep = None
    return keep if isinstance(keep, int) and keep >= 1 else DEFAULT_KEEP


def verify_one(stack: str, info: Any) -> str | None:
    """None when the checkpoint restores, else the one-line reason it does not."""
    if not info.complete:
        return "incomplete save (leftover of an interrupted run; `clean` removes it)"
    try:
        backend(stack).verify_checkpoint(info.path)
    except Exception as error:  # any failure to restore is the answer we report, whatever its type
        return " ".join(str(error).split()) or type(error).__name__
    return None


def plan_prune(run: RunFolder, keep_newest: int | None, verify: bool) -> tuple[list[Action], list[str]]:
    """Deletions a prune would make in one run, and notes on what it kept and why."""
    infos = list_run(run)
    kept = select_kept(infos, keep_newest, run_keep(run))
    notes = []
    if verify and kept:
        failed = {str(i.path): reason for i in kept if (reason := verify_one(run.stack, i)) is not None}
        if failed:
            # Never leave a run whose kept checkpoints cannot restore: also keep the newest one that can.
            notes += [f"{run.label}: kept {Path(p).name} does not restore ({r})" for p, r in failed.items()]
            for info in sorted((i for i in infos if i.complete and str(i.path) not in failed),
                               key=lambda info: (_step(info), str(info.path)), reverse=True):
                if info in kept:
                    break
                if verify_one(run.stack, info) is None:
                    kept.append(info)
                    notes.append(f"{run.label}: also keeping {Path(info.path).name}, the newest that restores")
                    break
    kept_paths = {str(i.path) for i in kept}
    actions = [Action(run, Path(i.path), "pruned", tree_size(i.path))
               for i in infos if i.complete and str(i.path) not in kept_paths]
    return actions, notes


def plan_clean(run: RunFolder) -> list[Action]:
    """Leftovers of interrupted saves in one run (temp files, partial step folders)."""
    module = backend(run.stack)
    paths = {str(p): Path(p) for p in module.leftovers(run.path)}
    for info in module.list_checkpoints(run.path):
        if not info.complete:
            paths.setdefault(str(info.path), Path(info.path))
    return [Action(run, path, "leftover", tree_size(path)) for path in sorted(paths.values()) if path.exists() or path.is_symlink()]


def apply(actions: list[Action], dry_run: bool) -> int:
    """Delete through the trash-safe routine (files emptied first), a checkpoint file with its checksum sidecar;
    return bytes freed (or that would be)."""
    freed = 0
    for action in actions:
        if not dry_run:
            action.bytes = remove_with_sums(action.path)
        freed += action.bytes
    return freed


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [list(headers)] + text_rows]
    return "\n".join(lines)


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def command_list(runs: list[RunFolder]) -> int:
    """Print every checkpoint and leftover as a table."""
    rows = []
    total = 0
    for run in runs:
        listed = set()
        for info in list_run(run):
            listed.add(str(info.path))
            rows.append([run.label, _cell(info.step), _cell(info.epoch), _cell(info.val_accuracy, "{:.4f}"),
                         human_bytes(info.bytes), "complete" if info.complete else "INCOMPLETE", Path(info.path).name])
            total += info.bytes
        for path in backend(run.stack).leftovers(run.path):
            if str(path) not in listed:
                size = tree_size(path)
                rows.append([run.label, "-", "-", "-", human_bytes(size), "leftover", Path(path).name])
                total += size
    print(format_table(["run", "step", "epoch", "val_acc", "size", "state", "name"], rows))
    print(f"{len(rows)} entries in {len(runs)} run(s), {human_bytes(total)}")
    return 0


def command_verify(runs: list[RunFolder]) -> int:
    """Load every checkpoint; 1 if any does not restore."""
    work: list[tuple[RunFolder, Any]] = []
    for run in runs:
        infos = list_run(run)
        listed = {str(info.path) for info in infos}
        work += [(run, info) for info in infos]
        # A partial save that the stack does not list as a checkpoint is still something that will not restore.
        work += [(run, _Leftover(Path(path))) for path in backend(run.stack).leftovers(run.path) if str(path) not in listed]
    rows = []
    failures = 0
    for run, info in tqdm(work, desc="verifying", unit="ckpt", disable=len(work) < _PROGRESS_MIN, file=sys.stderr):
        reason = verify_one(run.stack, info)
        failures += reason is not None
        rows.append([run.label, _cell(info.step), "ok" if reason is None else "FAILED", Path(info.path).name, reason or ""])
    print(format_table(["run", "step", "result", "name", "reason"], rows))
    print(f"{len(work) - failures} of {len(work)} checkpoints restore" + (f"; {failures} do not" if failures else ""))
    return 1 if failures else 0


def _report(actions: list[Action], freed: int, dry_run: bool, notes: list[str]) -> None:
    verb = "would remove" if dry_run else "removed"
    if actions:
        print(format_table(["run", "action", "reason", "size", "path"],
                           [[a.run.label, verb, a.reason, human_bytes(a.bytes), a.path] for a in actions]))
    for note in notes:
        print(note)
    freed_verb = "would free" if dry_run else "freed"
    print(f"{verb} {len(actions)} item(s); {freed_verb} {human_bytes(freed)} ({freed} bytes)")


def command_prune(runs: list[RunFolder], keep_newest: int | None, dry_run: bool, verify: bool) -> int:
    """Delete all but the kept checkpoints of each run."""
    actions: list[Action] = []
    notes: list[str] = []
    for run in runs:
        run_actions, run_notes = plan_prune(run, keep_newest, verify)
        actions += run_actions
        notes += run_notes
    _report(actions, apply(actions, dry_run), dry_run, notes)
    return 0


def command_clean(runs: list[RunFolder], dry_run: bool) -> int:
    """Delete the leftovers of interrupted saves."""
    actions = [action for run in runs for action in plan_clean(run)]
    _report(actions, apply(actions, dry_run), dry_run, [])
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job, each taking a run folder or logdir."""
    parser = argparse.ArgumentParser(
        prog="checkpoints.py",
        description="List, verify, prune or clean the checkpoints of Lightning and Flax runs. "
                    "Deletions empty every file before removing it, so a cloud drive's trash keeps nothing.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,verify,prune,clean}")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("target", nargs="?", default="runs",
                         help="a run folder (<logdir>/<stack>/<run>) or a logdir holding many (default runs)")
        return sub

    add("list", "list checkpoints: step, epoch, val accuracy, size, complete or not, and leftovers")
    add("verify", "check that every checkpoint restores; exit 1 if any does not")
    prune = add("prune", "delete all but the kept checkpoints (default: the run's own rule, best by val accuracy "
                         "and latest)")
    keep = prune.add_mutually_exclusive_group()
    keep.add_argument("--keep", choices=[KEEP_BEST_AND_LATEST], default=KEEP_BEST_AND_LATEST,
                      help="keep what training keeps: the latest and the best by validation accuracy, as many as the "
                           "run's --keep-checkpoints (default)")
    keep.add_argument("--keep-newest", type=_positive, metavar="N", help="keep the N newest checkpoints instead")
    prune.add_argument("--no-verify", action="store_true",
                       help="do not check that the kept checkpoints restore (by default a kept one that does not "
                            "restore also keeps the newest that does)")
    clean = add("clean", "remove leftovers of interrupted saves (temp files, partial checkpoint folders)")
    for sub in (prune, clean):
        sub.add_argument("--dry-run", action="store_true", help="show what would be removed and freed; change nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user mistakes end as a one-line error and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        runs = find_runs(args.target)
        if args.command == "list":
            return command_list(runs)
        if args.command == "verify":
            return command_verify(runs)
        if args.command == "prune":
            return command_prune(runs, args.keep_newest, args.dry_run, verify=not args.no_verify)
        return command_clean(runs, args.dry_run)
    except ToolError as error:
        print(f"checkpoints.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"checkpoints.py: error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
