"""The origin's question on one GPU in one command: probe the machine, check both stacks, write the data, run the
origin's setting most-important-first within a wall-time budget, compare, and leave everything in one folder.

Started by scripts/gpu_benchmark.sh, which installs the carried wheels first. `--rehearse` does the same steps and
writes the same files on a CPU at tiny sizes, so that a GPU slot is never spent on a typo.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

from bench import benchmark, runner
from bench.probe import precision_label
from bench.runner import PlannedRun, last_line
from report import compare
from report.peaks import GPU_PEAK_TFLOPS
from report.runs import NotComparableError
from shared_data.trash_safe import atomic_write_json

PROBE_SCRIPT = runner.REPO_ROOT / "scripts" / "gpu_probe.py"
LOG_FILE, RECORD_FILE, REPORT_FILE, RESULTS_FILE = ("gpu_benchmark.log", "gpu_benchmark.json", "report.md",
                                                    "results.tar.gz")
# Left out of results.tar.gz: weights (hundreds of MB each) and compiled kernels; the events, configs, summaries,
# logs and the report go in.
BULKY_FOLDERS, BULKY_SUFFIXES = {"checkpoints", "compile-caches"}, {".pth", ".ckpt", ".safetensors"}
# The origin's V100 figures (2022): how much faster JAX was than PyTorch.
ORIGIN = "JAX 27-28% faster in training and 140-147% faster in validation than PyTorch, on a V100"
# Five steps of each stack on the nano model: the self-check, as scripts/benchmark.py flags.
SELF_CHECK_FLAGS = ("--preset", "smoke", "--dataset", "synthetic", "--synthetic-size", "tiny", "--epochs", "1",
                    "--max-steps", "5", "--precisions", "bf16", "--no-compile", "--num-workers", "2")
PRECISION_ORDER = ("bf16", "fp32")
# A Flax run's float32 products are made full float32, as torch's are by default (JAX's default lets a GPU use
# TF32), by this JAX config variable; in bf16 runs too, since both models keep the attention logits in float32,
# unless the probe measured that it slows JAX's bf16 products below this share of their default rate.
JAX_PRECISION_VARIABLE, JAX_FULL_FLOAT32 = "JAX_DEFAULT_MATMUL_PRECISION", "highest"
BF16_RATE_KEPT = 0.9
KILL_AFTER_S = 10  # after the budget's TERM, a run that has not stopped is killed
# A command `timeout` stopped: 124 after its TERM, 137 after its KILL, -9 when that KILL, sent to the whole process
# group, took `timeout` itself down.
STOPPED_EXIT_CODES = (124, 137, -9)
# Report sections the final printout leaves out (the printout's tail is what a remote command brings back).
SUMMARY_LEAVES_OUT = ("### Where the time goes", "### Same training", "### Figures", "## Runs")
SUMMARY_KEEPS = ("#", "|", "- ", "JAX at its default")


@dataclasses.dataclass(frozen=True)
class Mode:
    """What differs between the GPU run and its rehearsal on a CPU."""

    name: str
    benchmark_flags: tuple[str, ...]  # the runs, as scripts/benchmark.py flags (the precisions added by the command)
    sweep_batch_sizes: tuple[int, ...]  # the eager pair again at each, last, when the budget allows (cost growth)
    prior_s: dict[tuple[str, bool], float]  # (stack, compiled) -> a bf16 run's seconds, guessed before any run ends
    fp32_factor: float  # a float32 run's guessed seconds over a bf16 run's
    reserve_s: float  # kept back from the runs for the final comparison (with figures) and the packing
    max_wait_s: float  # benchmark.py's wait for a quiet host before each run
    probe_limit_s: float  # a probe or self-check that hangs costs this much at most
    self_check_limit_s: float
    gpu: bool


GPU = Mode(
    "gpu",
    ("--preset", "swinv2_tiny_window8_256", "--dataset", "synthetic", "--synthetic-size", "imagenette",
     "--batch-sizes", "64", "--epochs", "3", "--same-init", "--num-workers", "8"), (128,),
    {("flax", False): 100.0, ("lightning", False): 50.0, ("lightning", True): 160.0}, 1.2,
    reserve_s=30.0, max_wait_s=15.0, probe_limit_s=60.0, self_check_limit_s=120.0, gpu=True)
REHEARSAL = Mode(
    "rehearsal",
    ("--preset", "smoke", "--dataset", "synthetic", "--synthetic-size", "tiny", "--batch-sizes", "32", "--epochs", "1",
     "--same-init", "--num-workers", "2"), (64,),
    {("flax", False): 60.0, ("lightning", False): 40.0, ("lightning", True): 120.0}, 1.0,
    reserve_s=45.0, max_wait_s=0.0, probe_limit_s=120.0, self_check_limit_s=300.0, gpu=False)


class GpuBenchmarkError(Exception):
    """A step that stops the benchmark; the message is one line saying what failed and where its log is."""


@dataclasses.dataclass
class Budget:
    """Wall time from the command's start; the runs may use all of it but the final reserve."""

    started: float  # time.time() at the command's start
    seconds: float
    reserve_s: float

    def elapsed_s(self) -> float:
        return time.time() - self.started

    def left_for_runs_s(self) -> float:
        return self.seconds - self.reserve_s - self.elapsed_s()


@dataclasses.dataclass
class Narrator:
    """Prints each line and keeps it in the output folder's log, so a run stopped from outside still leaves it."""

    log: Path

    def say(self, message: str) -> None:
        print(message, flush=True)
        with self.log.open("a") as handle:
            handle.write(message + "\n")


# ---------------------------------------------------------------- planning (pure)


def precision_of(run: PlannedRun) -> str:
    return run.command[run.command.index("--precision") + 1]


def batch_of(run: PlannedRun) -> int:
    return int(run.command[run.command.index("--batch-size") + 1])


def stages(planned: list[PlannedRun]) -> list[tuple[PlannedRun, ...]]:
    """The runs in the order they answer the question, one stage running whole or not at all: per precision (bf16
    first) the Flax and Lightning eager pair, then the Lightning compiled runs (the longest: TorchInductor compiles
    for minutes), bf16 first again; last the sweep's runs (a batch size other than the first run's), one stage per
    batch size, which with the first give the report's "How the cost grows"."""
    main_batch = batch_of(planned[0]) if planned else None

    def key(run: PlannedRun) -> tuple[int, bool, int]:
        batch = batch_of(run)
        return batch if batch != main_batch else 0, run.compile, PRECISION_ORDER.index(precision_of(run))

    grouped: dict[tuple[int, bool, int], list[PlannedRun]] = {}
    for run in sorted(planned, key=key):  # stable: Flax before Lightning eager, as planned
        grouped.setdefault(key(run), []).append(run)
    return [tuple(runs) for runs in grouped.values()]


def prior_s(run: PlannedRun, mode: Mode) -> float:
    return mode.prior_s[run.stack, run.compile] * (mode.fp32_factor if precision_of(run) == "fp32" else 1.0)


def estimate_s(run: PlannedRun, done: list[tuple[PlannedRun, float]], mode: Mode) -> float:
    """Seconds `run` is expected to take: its prior, scaled by how the runs done so far compared with theirs."""
    scale = statistics.median(wall / prior_s(finished, mode) for finished, wall in done) if done else 1.0
    return prior_s(run, mode) * scale


def stage_fits(stage: tuple[PlannedRun, ...], done: list[tuple[PlannedRun, float]], mode: Mode, left_s: float,
               per_run_overhead_s: float = 0.0) -> tuple[bool, float]:
    """(whether the stage fits in `left_s`, the seconds it is expected to need)."""
    needed = sum(estimate_s(run, done, mode) + per_run_overhead_s for run in stage)
    return needed <= left_s, needed


def jax_precision(precision: str, probe: dict[str, Any]) -> str | None:
    """jax_default_matmul_precision of a Flax run (None: JAX's default); see JAX_FULL_FLOAT32."""
    rates = probe.get("jax_bf16_tflops")
    if precision == "bf16" and rates and rates["highest"] < BF16_RATE_KEPT * rates["default"]:
        return None
    return JAX_FULL_FLOAT32


def with_limits(run: PlannedRun, limit_s: float, jax_setting: str | None) -> PlannedRun:
    """The run's command stopped at `limit_s` (TERM to its process group, then KILL), with the Flax precision set."""
    variables = ("env", f"{JAX_PRECISION_VARIABLE}={jax_setting}") if run.stack == "flax" and jax_setting else ()
    timeout = ("timeout", f"--kill-after={KILL_AFTER_S}", f"{max(1, int(limit_s))}")
    return dataclasses.replace(run, command=(*timeout, *variables, *run.command))


# ---------------------------------------------------------------- steps


@contextlib.contextmanager
def section(record: dict[str, Any], name: str, budget: Budget, narrator: Narrator) -> Iterator[None]:
    """A named timed step: announced with the time since the start, its seconds kept in the record."""
    narrator.say(f"\n== {name} (t={budget.elapsed_s():.0f} s)")
    start = time.perf_counter()
    try:
        yield
    finally:
        record["sections"][name] = round(time.perf_counter() - start, 1)


def start_logged(command: tuple[str, ...], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A command started in the background, its output going to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def run_probe(mode: Mode, folder: Path, limit_s: float, narrator: Narrator) -> dict[str, Any]:
    """scripts/gpu_probe.py in its own process (JAX there must not hold GPU memory for the runs), its output shown and
    kept in probe.log; stops on any problem, or if it takes over `limit_s`."""
    path, log = folder / "probe.json", folder / "probe.log"
    command = ("timeout", f"--kill-after={KILL_AFTER_S}", f"{int(limit_s)}", sys.executable, str(PROBE_SCRIPT),
               "--json", str(path), *(() if mode.gpu else ("--cpu",)))
    returncode, _ = runner.call_logged(command, log, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    narrator.say(log.read_text(errors="replace").rstrip())
    if returncode != 0 or not path.exists():
        over = ", over its time" if returncode in STOPPED_EXIT_CODES else ""
        found = json.loads(path.read_text())["problems"] if path.exists() else [
            f"exit {returncode}{over}: {last_line(log)}"]
        raise GpuBenchmarkError(f"the probe found problems: {'; '.join(found)}; log {log}")
    return json.loads(path.read_text())


def self_check(args: argparse.Namespace, folder: Path, limit_s: float, narrator: Narrator) -> None:
    """Five steps of each stack on the nano model, both at once; stops naming the log of any that fails."""
    planned = benchmark.plan_runs(args, folder)
    started = {run: start_logged(with_limits(run, limit_s, JAX_FULL_FLOAT32).command,
                                 folder / "logs" / f"{run.stack}.log") for run in planned}
    failures = []
    for run, process in started.items():
        returncode = process.wait()
        log = folder / "logs" / f"{run.stack}.log"
        narrator.say(f"self-check {run.stack}: exit {returncode}: {last_line(log)}")
        if returncode != 0:
            over = ", over its time" if returncode in STOPPED_EXIT_CODES else ""
            failures.append(f"{run.stack} (exit {returncode}{over}: {last_line(log)}; log {log})")
    if failures:
        raise GpuBenchmarkError("the self-check failed: " + "; ".join(failures))


def wait_for_data(process: subprocess.Popen, log: Path, budget: Budget, narrator: Narrator) -> float:
    """Wait for the background data preparation and return when it ended (its log's last write), in seconds since
    the start; stops if it fails or runs out of the budget."""
    try:
        returncode = process.wait(timeout=max(1.0, budget.left_for_runs_s()))
    except subprocess.TimeoutExpired:
        process.terminate()
        raise GpuBenchmarkError(f"writing the data did not finish within the budget; log {log}") from None
    if returncode != 0:
        raise GpuBenchmarkError(f"prepare_data.py failed (exit {returncode}): {last_line(log)}; log {log}")
    narrator.say(last_line(log))
    return log.stat().st_mtime - budget.started


def set_aside(run: PlannedRun, logdir: Path, folder: Path) -> str | None:
    """Move an unfinished run's folder out of the compared logdir (its partial epochs would cut every total)."""
    source = logdir / run.stack / run.run_name
    if not source.exists():
        return None
    target = folder / f"{run.stack}-{run.run_name}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    return str(target)


def bulky(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    return None if BULKY_FOLDERS.intersection(parts) or Path(info.name).suffix in BULKY_SUFFIXES else info


def pack(workdir: Path, out: Path) -> Path:
    """results.tar.gz in `out`: the work folder (every run's events, config, summary, logs; the report and its
    figures) without weights and compile caches, replaced whole so that a stop mid-write keeps the previous one."""
    partial = out / f"{RESULTS_FILE}.partial"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(workdir, arcname=workdir.name, filter=bulky)
    os.replace(partial, out / RESULTS_FILE)
    return out / RESULTS_FILE


def write_report(logdir: Path, report_dir: Path, out: Path, record: dict[str, Any], figures: bool) -> str:
    """compare.py's report of the runs done (a note when none pairs yet) with this machine's section, in the work
    folder and in `out`; returns what happened in one line."""
    try:
        report = compare.compare(logdir, report_dir, figures=figures)
        outcome = f"report {report}"
    except Exception as error:  # noqa: BLE001  (besides no pair yet, a report bug must not cost the runs their slot)
        outcome = (f"no comparison yet: {error}" if isinstance(error, NotComparableError)
                   else f"compare.py failed: {type(error).__name__}: {error}")
        report_dir.mkdir(parents=True, exist_ok=True)
        report = report_dir / REPORT_FILE
        report.write_text(f"# Lightning vs Flax: Swin V2 training speed\n\n{outcome}\n")
    text = report.read_text().rstrip("\n") + "\n\n" + "\n".join(machine_section(record)) + "\n"
    report.write_text(text)
    (out / REPORT_FILE).write_text(text)
    return outcome


# ---------------------------------------------------------------- the report's section on this machine


def float32_lines(record: dict[str, Any]) -> list[str]:
    """Which float32 each framework used, by setting and by the probe's measured error."""
    probe = record.get("probe") or {}
    found = probe.get("float32") or {}
    torch_found, jax_default, jax_highest = (found.get(k) or {} for k in ("torch", "jax_default", "jax_highest"))
    settings = torch_found.get("settings") or {}

    def measured(entry: dict[str, Any]) -> str:
        if not entry:
            return "not measured"
        return (f"matmul error {entry['matmul']:.1e} ({precision_label(entry['matmul'])}), convolution "
                f"{entry['conv']:.1e} ({precision_label(entry['conv'])})")

    lines = ["| framework | run precision | setting | float32 products measured on this device |", "|---|---|---|---|"]
    for precision in PRECISION_ORDER:
        if record.get("jax_precision", {}).get(precision):
            setting, entry = f"{JAX_PRECISION_VARIABLE}={JAX_FULL_FLOAT32}", jax_highest
        else:
            setting, entry = "JAX's default (the probe measured that highest slows bf16 products)", jax_default
        lines.append(f"| JAX | {precision} | {setting} | {measured(entry)} |")
    torch_setting = (f"torch defaults: float32_matmul_precision={settings.get('float32_matmul_precision')}, "
                     f"cuda.matmul.allow_tf32={settings.get('backends.cuda.matmul.allow_tf32')}, "
                     f"cudnn.allow_tf32={settings.get('backends.cudnn.allow_tf32')}")
    for precision in PRECISION_ORDER:
        lines.append(f"| PyTorch | {precision} | {torch_setting} | {measured(torch_found)} |")
    lines += ["", f"JAX at its default: {measured(jax_default)}. float32 products are the whole of a float32 run "
              "and, in a bf16 run, the attention logits (both models keep them in float32). torch's setting is what "
              "a fresh process finds; a stack that changes it says so in its own code."]
    return lines


def machine_section(record: dict[str, Any]) -> list[str]:
    """The report's section on where and how these runs ran, and what was skipped."""
    probe = record.get("probe") or {}
    smi, device, versions = probe.get("nvidia_smi") or {}, probe.get("device") or {}, probe.get("versions") or {}
    lines = ["## On this machine (scripts/gpu_benchmark.py)", "",
             f"- date {record.get('created', 'n/a')}, mode {record['mode']}, budget {record['budget_s']:.0f} s, used "
             f"{record.get('elapsed_s', 0):.0f} s; status: {record['status']}"]
    if record["mode"] == GPU.name:
        rates = probe.get("matmul_tflops") or {}
        datasheet = next((peaks for pattern, peaks in GPU_PEAK_TFLOPS
                          if re.search(pattern, (smi.get("name") or "").lower())), {})
        lines += [f"- GPU: {smi.get('name', 'n/a')}, driver {smi.get('driver', 'n/a')}, {smi.get('memory', 'n/a')}; "
                  f"CUDA {device.get('torch_cuda', 'n/a')} (torch), cuDNN {device.get('cudnn', 'n/a')}; "
                  + ", ".join(f"{k} {v}" for k, v in (probe.get("cuda_packages") or {}).items()),
                  f"- matmul rate measured with torch: bf16 {rates.get('bf16', 'n/a')} TFLOP/s, float32 "
                  f"{rates.get('fp32', 'n/a')} TFLOP/s (datasheet {datasheet.get('bf16', 'n/a')} and "
                  f"{datasheet.get('fp32', 'n/a')}); JAX bf16 {probe.get('jax_bf16_tflops', 'n/a')}"]
    else:
        lines += ["- rehearsal on the CPU: no nvidia-smi, no GPU matmul rate"]
    lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              f"- data: {record.get('data', 'n/a')}", f"- self-check: {record.get('self_check', 'n/a')}",
              f"- origin's figures: {ORIGIN}", "", "### float32 in each framework", ""] + float32_lines(record)
    lines += ["", "### Runs, most important first", "", "| run | stack | compiled | precision | status | wall s | "
              "expected s | note |", "|---|---|---|---|---|---|---|---|"]
    for entry in record["plan"]:
        lines.append(f"| {entry['run_name']} | {entry['stack']} | {entry['compile']} | {entry['precision']} | "
                     f"{entry['status']} | {round(entry['wall_s'], 1) if 'wall_s' in entry else ''} | "
                     f"{entry.get('expected_s', '')} | "
                     f"{entry.get('note', '')} |")
    lines += ["", "Sections (s): " + ", ".join(f"{k} {v}" for k, v in record["sections"].items())]
    return lines


# ---------------------------------------------------------------- the command


def new_record(mode: Mode, budget_s: float, planned: list[PlannedRun], **fields: Any) -> dict[str, Any]:
    """gpu_benchmark.json as it starts: every planned run, most important first, with its status to come."""
    return {"mode": mode.name, "budget_s": budget_s, "status": "running", "sections": {}, **fields,
            "plan": [{"run_name": run.run_name, "stack": run.stack, "compile": run.compile,
                      "precision": precision_of(run), "status": "planned"} for run in planned]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="output folder: report.md, gpu_benchmark.json, gpu_benchmark.log, results.tar.gz "
                             "(default $OUT, else reports/gpu-<UTC timestamp>/)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall time from the start the whole command ends within; runs that no longer fit are "
                             "skipped and named (default 420)")
    parser.add_argument("--rehearse", action="store_true",
                        help="the same steps and files on this CPU at tiny sizes (nano model, 64 px, 1 epoch)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="runs, logs and report (default runs/gpu-benchmark-<UTC timestamp>/)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where the synthetic data and cache go")
    parser.add_argument("--precisions", nargs="+", choices=PRECISION_ORDER, default=list(PRECISION_ORDER),
                        help="the precisions to run, bf16 first whatever the order given (default both)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the Lightning compiled runs")
    parser.add_argument("--started-at", type=float, default=None,
                        help="the command's start, seconds since the epoch (gpu_benchmark.sh passes it; default now)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = REHEARSAL if args.rehearse else GPU
    budget = Budget(args.started_at or time.time(), args.budget_s, mode.reserve_s)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = (args.out or Path("reports") / f"gpu-{stamp}").resolve()
    workdir = (args.workdir or Path("runs") / f"gpu-benchmark-{stamp}").resolve()
    logdir, report_dir = workdir / "runs", workdir / "report"
    for folder in (out, logdir):
        folder.mkdir(parents=True, exist_ok=True)
    narrator = Narrator(out / LOG_FILE)
    data_dir = str(args.data_dir.resolve())
    flags = [*mode.benchmark_flags, "--data-dir", data_dir, "--precisions", *args.precisions,
             *(["--no-compile"] if args.no_compile else [])]
    runs_args = benchmark.parse_args(flags)
    check_args = benchmark.parse_args([*SELF_CHECK_FLAGS, "--data-dir", data_dir])
    # The sweep: the eager pair in the first precision again at the other batch sizes (the last --batch-sizes and
    # --precisions given win).
    first_precision = min(args.precisions, key=PRECISION_ORDER.index)
    sweep_args = benchmark.parse_args([*flags, "--batch-sizes", *map(str, mode.sweep_batch_sizes), "--precisions",
                                       first_precision, "--no-compile"]) if mode.sweep_batch_sizes else None
    planned = [run for stage in stages([*benchmark.plan_runs(runs_args, logdir),
                                        *(benchmark.plan_runs(sweep_args, logdir) if sweep_args else [])])
               for run in stage]
    record = new_record(mode, args.budget_s, planned, created=stamp, out=str(out), workdir=str(workdir),
                        benchmark_flags=flags)
    benchmark_record = {"created": stamp, "argv": ["gpu_benchmark.py", *(argv or sys.argv[1:])],
                        "environment": runner.environment(), "compile_caches": "cold",
                        "max_wait_s": mode.max_wait_s, "runs": []}
    narrator.say(f"gpu_benchmark ({mode.name}): budget {args.budget_s:.0f} s from the start, output {out}, "
                 f"work folder {workdir}")
    prepare = runner.prepare_command(runs_args)
    data_log = workdir / "prepare_data.log"
    # The data is written on every core while the probe and the self-check run: neither is timed.
    preparing = start_logged(prepare, data_log)
    try:
        with section(record, "probe", budget, narrator):
            record["probe"] = run_probe(mode, workdir, mode.probe_limit_s, narrator)
        record["jax_precision"] = {p: jax_precision(p, record["probe"]) for p in PRECISION_ORDER}
        with section(record, "self-check", budget, narrator):
            self_check(check_args, workdir / "selfcheck", mode.self_check_limit_s, narrator)
        record["self_check"] = f"passed at t={budget.elapsed_s():.0f} s"
        with section(record, "data", budget, narrator):
            ready = wait_for_data(preparing, data_log, budget, narrator)
            record["data"] = (f"{' '.join(prepare[2:])}: written and cached on {os.cpu_count()} cores by "
                              f"t={ready:.0f} s, while the probe and the self-check ran")
        with section(record, "init weights", budget, narrator):
            weights = benchmark.write_init_weights(runs_args, logdir / benchmark.INIT_WEIGHTS)
            benchmark_record["same_init"] = str(weights)
        run_stages(planned, mode, budget, record, benchmark_record, prepare, workdir, out, narrator)
        record["status"] = "finished"
    except GpuBenchmarkError as error:
        record["status"] = f"STOPPED: {error}"
        narrator.say(f"\ngpu_benchmark: STOPPED: {error}")
    finally:
        if preparing.poll() is None:
            preparing.terminate()
    with section(record, "report", budget, narrator):
        record["elapsed_s"] = round(budget.elapsed_s(), 1)
        record["report"] = write_report(logdir, report_dir, out, record, figures=True)
    record["elapsed_s"] = round(budget.elapsed_s(), 1)
    atomic_write_json(out / RECORD_FILE, record)
    pack(workdir, out)
    narrator.say(final_summary((out / REPORT_FILE).read_text()))
    narrator.say(f"\ngpu_benchmark: {record['status']} in {budget.elapsed_s():.0f} s of {args.budget_s:.0f}; "
                 f"output {out}")
    return 0 if record["status"] == "finished" else 1


def run_stages(planned: list[PlannedRun], mode: Mode, budget: Budget, record: dict[str, Any],
               benchmark_record: dict[str, Any], prepare: tuple[str, ...], workdir: Path, out: Path,
               narrator: Narrator) -> None:
    """Each stage whole if it is expected to fit, each run stopped at the budget at the latest; after each run the
    report (without figures), the record and results.tar.gz are rewritten, so a stop from outside keeps them."""
    logdir = workdir / "runs"
    entries = {(entry["stack"], entry["run_name"]): entry for entry in record["plan"]}
    done: list[tuple[PlannedRun, float]] = []
    report_s = 0.0  # what the last report took: each run is followed by one
    out_of_time = False
    for stage in stages(planned):
        fits, needed = stage_fits(stage, done, mode, budget.left_for_runs_s(), report_s)
        if out_of_time or not fits:
            note = (f"skipped: its stage expected to need {needed:.0f} s, "
                    f"{max(0.0, budget.left_for_runs_s()):.0f} s left of the budget")
            for run in stage:
                entries[run.stack, run.run_name].update(status="skipped", expected_s=round(estimate_s(run, done, mode)),
                                                        note=note)
            narrator.say(f"\n{', '.join(f'{run.stack} {run.run_name}' for run in stage)}: {note}")
            continue
        for run in stage:
            entry = entries[run.stack, run.run_name]
            entry["expected_s"] = round(estimate_s(run, done, mode))
            with section(record, f"{run.stack} {run.run_name}", budget, narrator):
                limit = budget.left_for_runs_s() - KILL_AFTER_S  # so that even the KILL lands within the budget
                item = with_limits(run, limit, record["jax_precision"][precision_of(run)])
                narrator.say(" ".join(item.command))
                try:
                    runner.run_planned([item], logdir, benchmark_record, [prepare], max_wait_s=mode.max_wait_s)
                except runner.BenchmarkError:
                    if benchmark_record["prepare_data"]["returncode"] != 0:
                        raise GpuBenchmarkError(f"prepare_data.py failed before {run.run_name}: see "
                                                f"{benchmark_record['prepare_data']['log']}") from None
            result = benchmark_record["runs"][-1]
            entry["wall_s"] = result["wall_s"]
            if result["returncode"] == 0:
                entry["status"] = "done"
                done.append((run, result["wall_s"]))
            else:
                stopped = result["returncode"] in STOPPED_EXIT_CODES and result["wall_s"] >= limit - 1
                entry["status"] = "stopped at the budget" if stopped else f"failed (exit {result['returncode']})"
                entry["note"] = f"{last_line(Path(result['log']))}; folder moved to " \
                                f"{set_aside(run, logdir, workdir / 'unfinished')}"
                out_of_time = out_of_time or stopped
            narrator.say(f"{run.stack} {run.run_name}: {entry['status']} in {entry['wall_s']:.0f} s "
                         f"(expected {entry['expected_s']} s)")
            if out_of_time:
                for rest in stage[stage.index(run) + 1:]:
                    entries[rest.stack, rest.run_name].update(status="skipped", note="skipped: the budget ran out")
            start = time.perf_counter()
            record["elapsed_s"] = round(budget.elapsed_s(), 1)
            narrator.say(write_report(logdir, workdir / "report", out, record, figures=False))
            atomic_write_json(out / RECORD_FILE, record)
            pack(workdir, out)
            report_s = time.perf_counter() - start
            if out_of_time:
                break


def final_summary(report: str) -> str:
    """The report's headings, tables and lists without its breakdowns, figures and list of runs (all in the file),
    for the end of the printout."""
    kept, leaving_out = [], False
    for line in report.splitlines():
        if line.startswith("#"):
            leaving_out = line.startswith(SUMMARY_LEAVES_OUT)
        if not leaving_out and line.startswith(SUMMARY_KEEPS):
            kept.append(line)
    return "\n" + "\n".join(kept)

