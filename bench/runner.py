"""Run training commands one at a time: fresh compile caches, a quiet host, a log and a benchmark.json record each."""

from __future__ import annotations

import argparse
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
from typing import Any, Callable, Sequence

from tqdm import tqdm

from shared_data import host_allocator, run_config
from shared_data.environment import RECORDED_LIBRARIES, cpu_description, library_versions
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
# The compilation caches each run is given, as environment variable -> sub-folder of its cache folder.
COMPILE_CACHE_VARIABLES = {
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton", "JAX_COMPILATION_CACHE_DIR": "jax",
}
WARM_CACHE_FOLDER = "shared"
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


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The training configuration the shared flags give (data, model and seed are the same for both stacks)."""
    given = {attribute: getattr(args, attribute) for attribute, _ in SHARED_FLAGS}
    try:
        return run_config.resolve(given, "flax")
    except run_config.ConfigError as error:
        raise BenchmarkError(str(error)) from None


def prepare_command(args: argparse.Namespace, img_size: int | None = None) -> tuple[str, ...]:
    """scripts/prepare_data.py for the data every run reads (at `img_size`, default the shared flags'), so that no run
    pays for decoding and caching it."""
    config = resolved_config(args)
    return (sys.executable, str(PREPARE_SCRIPT), "--dataset", config["dataset"], "--data-dir", str(config["data_dir"]),
            "--img-size", str(img_size or config["img_size"]), "--seed", str(config["seed"]),
            "--synthetic-size", config["synthetic_size"])


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
            "allocator": host_allocator.describe(),
            "versions": library_versions(RECORDED_LIBRARIES + ("tensorboard", "tensorboardX", "matplotlib"))}


def last_line(log: Path) -> str:
    """A log's last non-blank line, cut to 300 characters: what a one-line error says of the run that wrote it."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty log)"


def call_logged(command: tuple[str, ...], log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    """(exit code, seconds) of a command whose output goes to `log`; `env` is added to this process's environment."""
    start = time.perf_counter()
    with log.open("w") as output:
        returncode = subprocess.call(command, stdout=output, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return returncode, round(time.perf_counter() - start, 3)


def run_planned(planned: list[PlannedRun], logdir: Path, record: dict[str, Any], prepare: Sequence[tuple[str, ...]],
                *, warm_caches: bool = False, max_wait_s: float = 120.0) -> None:
    """Prepare the data (each command of `prepare`, one per image size), then run each training command in turn, each
    with its compile caches and after the host has quietened (or `max_wait_s`); output in <logdir>/logs/, results in
    benchmark.json. Raises BenchmarkError when a preparation fails."""
    logs = logdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record_path = logdir / "benchmark.json"
    print("preparing the data once, so that no run pays for it ...", flush=True)
    for index, command in enumerate(prepare):
        log = logs / f"prepare_data{f'-{index}' if index else ''}.log"
        returncode, seconds = call_logged(command, log)
        record["prepare_data"] = {"command": command, "returncode": returncode, "wall_s": seconds, "log": str(log)}
        record_path.write_text(json.dumps(record, indent=2))
        if returncode != 0:
            raise BenchmarkError(f"prepare_data.py failed (exit {returncode}): {last_line(log)}; full log: {log}")
    cores = os.cpu_count() or 1
    for item in (progress := tqdm(planned, desc="benchmark", unit="run")):
        progress.set_postfix_str(f"{item.stack} {item.run_name}")
        log = logs / f"{item.stack}-{item.run_name}.log"
        caches = compile_cache_dirs(logdir, item, warm_caches)
        _make_cache_dirs(caches, warm_caches)
        # Other work on the machine skews timings: wait for it to pass, and keep the evidence.
        load_before, waited = wait_for_quiet(cores, max_wait_s, load=load_1m, say=tqdm.write)
        returncode, seconds = call_logged(item.command, log, {name: str(path) for name, path in caches.items()})
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
                                 f"{last_line(log)}; full log: {log}")
