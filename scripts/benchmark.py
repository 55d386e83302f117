"""Run both training stacks with identical settings (PyTorch eager and compiled), then compare their traces."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from scripts import compare
from scripts.runs_reader import NotComparableError
from shared_data import registry, run_config
from shared_data.augment import AUGMENTS
from shared_data.environment import RECORDED_LIBRARIES, cpu_description, library_versions
from shared_data.run_config import DATASETS, PRECISIONS, PRESETS, SYNTHETIC_SIZES
from shared_data.trash_safe import remove_path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_SCRIPTS = {
    "lightning": REPO_ROOT / "scripts" / "train_lightning.py",
    "flax": REPO_ROOT / "scripts" / "train_flax.py",
}
PREPARE_SCRIPT = REPO_ROOT / "scripts" / "prepare_data.py"
# Flags both training scripts take with the same meaning, passed through only when given here, so the
# preset's value applies otherwise: (benchmark attribute, training script flag).
SHARED_FLAGS = (
    ("preset", "--preset"), ("dataset", "--dataset"), ("data_dir", "--data-dir"), ("model", "--model"),
    ("img_size", "--img-size"), ("epochs", "--epochs"), ("max_steps", "--max-steps"), ("seed", "--seed"),
    ("num_workers", "--num-workers"), ("synthetic_size", "--synthetic-size"), ("augment", "--augment"),
)
INIT_WEIGHTS = "init-weights.pth"  # --same-init: in the benchmark's log folder
# The compilation caches each run is given, as environment variable -> sub-folder of its cache folder.
COMPILE_CACHE_VARIABLES = {
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton", "JAX_COMPILATION_CACHE_DIR": "jax",
}
WARM_CACHE_FOLDER = "shared"
DEFAULT_PROFILE_STEPS = "5,7"
LOAD_POLL_S = 5.0


class BenchmarkError(Exception):
    """A benchmark that cannot go on; the message is one line naming the run and its log."""


@dataclass(frozen=True)
class PlannedRun:
    """One training script invocation."""

    stack: str
    run_name: str
    compile: bool
    command: tuple[str, ...]


def _run_name(batch_size: int | None, precision: str | None, mode: str | None, repeat: int) -> str:
    parts = [f"bs{batch_size}" if batch_size else None, precision, mode, f"r{repeat}"]
    return "-".join(part for part in parts if part)


def plan_runs(args: argparse.Namespace, logdir: Path) -> list[PlannedRun]:
    """Every run, the stacks interleaved and their order rotated each repeat, so that slow drifts of the
    machine and whatever one run leaves warm for the next do not always favour the same stack."""
    shared = []
    for attribute, flag in SHARED_FLAGS:
        value = getattr(args, attribute)
        if value is not None:
            shared += [flag, str(value)]
    if args.same_init:
        shared += ["--pretrained", str(logdir / INIT_WEIGHTS)]
    variants = [("flax", False)]
    if not args.no_eager:
        variants.append(("lightning", False))
    if not args.no_compile:
        variants.append(("lightning", True))
    planned = []
    for repeat in range(args.repeats):
        for batch_size in args.batch_sizes or [None]:
            for precision in args.precisions or [None]:
                settings = list(shared)
                settings += ["--batch-size", str(batch_size)] if batch_size else []
                settings += ["--precision", precision] if precision else []
                turn = repeat % len(variants)
                for stack, compiled in variants[turn:] + variants[:turn]:
                    mode = None if stack == "flax" else ("compile" if compiled else "eager")
                    name = _run_name(batch_size, precision, mode, repeat)
                    command = [sys.executable, str(TRAINING_SCRIPTS[stack]), *settings,
                               "--run-name", name, "--logdir", str(logdir)]
                    command += ["--compile"] if compiled else []
                    command += ["--profile-steps", args.profile] if args.profile and repeat == 0 else []
                    planned.append(PlannedRun(stack, name, compiled, tuple(command)))
    return planned


def _resolved(args: argparse.Namespace) -> dict[str, Any]:
    """The training configuration the shared flags give (data, model and seed are the same for both stacks)."""
    given = {attribute: getattr(args, attribute) for attribute, _ in SHARED_FLAGS}
    try:
        return run_config.resolve(given, "flax")
    except run_config.ConfigError as error:
        raise BenchmarkError(str(error)) from None


def prepare_command(args: argparse.Namespace) -> tuple[str, ...]:
    """scripts/prepare_data.py for the data every run reads, so that no run pays for decoding and caching it."""
    config = _resolved(args)
    return (sys.executable, str(PREPARE_SCRIPT), "--dataset", config["dataset"], "--data-dir", str(config["data_dir"]),
            "--img-size", str(config["img_size"]), "--seed", str(config["seed"]),
            "--synthetic-size", config["synthetic_size"])


def write_init_weights(args: argparse.Namespace, path: Path) -> Path:
    """--same-init: one set of initial weights for every run, an official-format PyTorch checkpoint of the model the
    runs train (the dataset's classes, the run seed), written once."""
    import torch

    from lightning_swin.model import create_model

    config = _resolved(args)
    torch.manual_seed(config["seed"])
    model = create_model(config["model"], num_classes=len(registry.get_spec(config["dataset"]).classes),
                         img_size=config["img_size"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def compile_cache_dirs(logdir: Path, item: PlannedRun, warm: bool) -> dict[str, Path]:
    """Environment variable -> compile-cache folder of a run: its own under <logdir>/compile-caches/, or with `warm`
    one set every run shares, so that no run finds what another compiled unless asked to."""
    folder = logdir / "compile-caches" / (WARM_CACHE_FOLDER if warm else f"{item.stack}-{item.run_name}")
    return {variable: folder / name for variable, name in COMPILE_CACHE_VARIABLES.items()}


def _make_cache_dirs(dirs: dict[str, Path], warm: bool) -> None:
    """Create the folders: empty ones for a cold run, the shared ones once (kept as they are after) when warm."""
    for path in dirs.values():
        if not warm and path.exists():
            remove_path(path)
        path.mkdir(parents=True, exist_ok=True)


def load_1m() -> float:
    """The host's 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(cores: int, max_wait_s: float, *, load: Callable[[], float] = load_1m,
                   sleep: Callable[[float], None] = time.sleep, say: Callable[[str], None] = print,
                   poll_s: float = LOAD_POLL_S) -> tuple[float, float]:
    """(1-minute load, seconds waited): while the load is above `cores`, wait for it to fall, `max_wait_s` at most."""
    current, waited = load(), 0.0
    if current > cores and max_wait_s > 0:
        say(f"host load {current:.2f} is above the {cores} cores: waiting up to {max_wait_s:.0f} s for it to fall ...")
    while current > cores and waited < max_wait_s:
        pause = min(poll_s, max_wait_s - waited)
        sleep(pause)
        waited += pause
        current = load()
    return current, waited


def xla_cpu_threads() -> int:
    """Threads XLA computes with on the CPU: every core unless XLA_FLAGS says otherwise."""
    flags = os.environ.get("XLA_FLAGS", "")
    if re.search(r"--xla_cpu_multi_thread_eigen=(false|0)\b", flags):
        return 1
    given = re.search(r"intra_op_parallelism_threads=(\d+)", flags)
    return int(given.group(1)) if given else os.cpu_count() or 1


@functools.cache
def stack_threads() -> dict[str, int]:
    """Threads each stack computes with on the CPU: torch's intra-op threads (measured here, under the same environment
    the runs inherit) and XLA's."""
    import torch

    return {"torch_intra_op": torch.get_num_threads(), "xla_cpu": xla_cpu_threads()}


def environment() -> dict[str, Any]:
    """Host, CPU and library versions of the machine running the benchmark (each run records its own too)."""
    return {"host": platform.node(), "platform": platform.platform(), "cpu": cpu_description(),
            "versions": library_versions(RECORDED_LIBRARIES + ("tensorboard", "tensorboardX", "matplotlib"))}


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty log)"


def _call_logged(command: tuple[str, ...], log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    """(exit code, seconds) of a command whose output goes to `log`; `env` is added to this process's environment."""
    start = time.perf_counter()
    with log.open("w") as output:
        returncode = subprocess.call(command, stdout=output, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return returncode, round(time.perf_counter() - start, 3)


def run_planned(planned: list[PlannedRun], logdir: Path, record: dict[str, Any], prepare: tuple[str, ...], *,
                warm_caches: bool = False, max_wait_s: float = 120.0) -> None:
    """Prepare the data, then run each training command in turn, each with its compile caches and after the host
    has quietened (or `max_wait_s`); output in <logdir>/logs/, results in benchmark.json."""
    logs = logdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record_path = logdir / "benchmark.json"
    log = logs / "prepare_data.log"
    print("preparing the data once, so that no run pays for it ...", flush=True)
    returncode, seconds = _call_logged(prepare, log)
    record["prepare_data"] = {"command": prepare, "returncode": returncode, "wall_s": seconds, "log": str(log)}
    record_path.write_text(json.dumps(record, indent=2))
    if returncode != 0:
        raise BenchmarkError(f"prepare_data.py failed (exit {returncode}): {_last_line(log)}; full log: {log}")
    cores = os.cpu_count() or 1
    for item in (progress := tqdm(planned, desc="benchmark", unit="run")):
        progress.set_postfix_str(f"{item.stack} {item.run_name}")
        log = logs / f"{item.stack}-{item.run_name}.log"
        caches = compile_cache_dirs(logdir, item, warm_caches)
        _make_cache_dirs(caches, warm_caches)
        # Other work on the machine skews timings: wait for it to pass, and keep the evidence.
        load_before, waited = wait_for_quiet(cores, max_wait_s, load=load_1m, say=tqdm.write)
        returncode, seconds = _call_logged(item.command, log, {name: str(path) for name, path in caches.items()})
        record["runs"].append({
            **asdict(item), "returncode": returncode, "wall_s": seconds, "log": str(log),
            "load_average_1m": [round(load_before, 2), round(load_1m(), 2)], "waited_s": round(waited, 1),
            "cores": cores, "contended": load_before > cores, "threads": stack_threads(),
            "compile_caches": {name: str(path) for name, path in caches.items()},
        })
        record_path.write_text(json.dumps(record, indent=2))
        if returncode != 0:
            progress.close()
            raise BenchmarkError(f"{Path(item.command[1]).name} run {item.run_name!r} failed (exit {returncode}): "
                                 f"{_last_line(log)}; full log: {log}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="CPU smoke test:  python scripts/benchmark.py --preset smoke\n"
               "Origin's setting (GPU):  python scripts/benchmark.py --preset swinv2_tiny_window8_256 "
               "--dataset synthetic --synthetic-size imagenette --batch-sizes 32 64 --precisions bf16 fp32 "
               "--epochs 5 --repeats 3")
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="training preset (default smoke)")
    parser.add_argument("--dataset", default=None, choices=DATASETS)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="one run set per batch size (default: the preset's; the origin used 32 64)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="one run set per precision (default: the preset's)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="the same seed for every run and repeat")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--synthetic-size", default=None, choices=SYNTHETIC_SIZES,
                        help="'imagenette' for synthetic data of Imagenette's size")
    parser.add_argument("--augment", default=None, choices=AUGMENTS,
                        help="training augmentation of every run (default: the preset's; config.json records it)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, for min/median/max")
    parser.add_argument("--no-compile", action="store_true", help="skip the Lightning --compile runs")
    parser.add_argument("--no-eager", action="store_true", help="skip the Lightning eager runs")
    parser.add_argument("--logdir", type=Path, default=None, help="default runs/benchmark-<UTC timestamp>/")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/<UTC timestamp>/)")
    parser.add_argument("--force", action="store_true", help="passed to compare.py")
    parser.add_argument("--peak-tflops", type=float, default=None, help="passed to compare.py")
    parser.add_argument("--same-init", action="store_true",
                        help=f"write one set of initial weights ({INIT_WEIGHTS} in the log folder: the model, the "
                             "dataset's classes, the seed) and start every run from it (--pretrained), so the report "
                             "can show both stacks train alike")
    parser.add_argument("--warm-caches", action="store_true",
                        help="let every run share one set of TorchInductor, Triton and JAX compile-cache folders "
                             "(default: each run starts with empty folders of its own, compile-caches/ in the log "
                             "folder)")
    parser.add_argument("--max-wait-s", type=float, default=120.0,
                        help="before each run, wait up to this long for the 1-minute host load to fall to the core "
                             "count; a run started above it is marked in the report (default 120)")
    parser.add_argument("--profile", nargs="?", const=DEFAULT_PROFILE_STEPS, metavar="FIRST,LAST",
                        help="trace global steps FIRST..LAST (default 5,7: after the first step's compilation, inside "
                             "the first epoch, which the 'excluding the first epoch' figures leave out) of each "
                             "variant's first repeat with its own profiler (--profile-steps); the report then shows "
                             "the time per kind of operation and the top operations of each stack")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands (with each run's compile-cache variables) and stop")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.no_compile and args.no_eager:
        parser.error("--no-compile with --no-eager leaves no Lightning run to compare with")
    if args.max_wait_s < 0:
        parser.error("--max-wait-s must be >= 0")
    try:
        run_config.parse_profile_steps(args.profile)
    except run_config.ConfigError as error:
        parser.error(str(error).replace("--profile-steps", "--profile"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    logdir = args.logdir or Path("runs") / f"benchmark-{stamp}"
    out = args.out or Path("reports") / stamp
    planned = plan_runs(args, logdir.resolve())
    try:
        prepare = prepare_command(args)
        if args.dry_run:
            print(" ".join(prepare))
            for item in planned:
                caches = compile_cache_dirs(logdir.resolve(), item, args.warm_caches)
                print(" ".join([*(f"{name}={path}" for name, path in caches.items()), *item.command]))
            return 0
        missing = [str(path) for path in (PREPARE_SCRIPT, *TRAINING_SCRIPTS.values()) if not path.exists()]
        if missing:
            raise BenchmarkError(f"script(s) not found: {', '.join(missing)}")
        if (logdir / "benchmark.json").exists():
            raise BenchmarkError(f"--logdir {logdir} already holds a benchmark; choose a new folder")
        record = {"created": stamp, "argv": sys.argv if argv is None else ["benchmark.py", *argv],
                  "environment": environment(), "compile_caches": "warm" if args.warm_caches else "cold",
                  "max_wait_s": args.max_wait_s, "runs": []}
        if args.same_init:
            record["same_init"] = str(write_init_weights(args, logdir.resolve() / INIT_WEIGHTS))
        run_planned(planned, logdir.resolve(), record, prepare, warm_caches=args.warm_caches,
                    max_wait_s=args.max_wait_s)
        report = compare.compare(logdir.resolve(), out, force=args.force, peak_tflops=args.peak_tflops)
    except (BenchmarkError, NotComparableError) as error:
        raise SystemExit(f"benchmark.py: {error}") from None
    print(f"runs: {logdir}\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
