"""Tests of scripts/gpu_benchmark.sh and bench/gpu.py: the carried wheels, the probe, the order and the budget of the
runs, the stops, the files it leaves; the rehearsal end to end on this CPU (slow)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from bench import benchmark, gpu, probe, runner
from bench.gpu import REHEARSAL, Budget, Narrator
from tests.test_benchmark import install_fake_scripts

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_FILES = ["gpu_benchmark.json", "gpu_benchmark.log", "report.md", "results.tar.gz"]

# A stand-in for scripts/gpu_probe.py: a CPU with full float32 everywhere, and nothing missing.
FAKE_PROBE_SCRIPT = textwrap.dedent("""
    import json, sys
    found = {"matmul": 2e-7, "conv": 1e-7}
    result = {"gpu": False, "problems": [], "versions": {"python": "test"}, "cuda_packages": {}, "carried_from": {},
              "float32": {"torch": {**found, "settings": {"float32_matmul_precision": "highest"}},
                          "jax_default": found, "jax_highest": found}}
    open(sys.argv[sys.argv.index("--json") + 1], "w").write(json.dumps(result))
    print("fake probe: nothing missing")
""")
# Priors that let every Flax and Lightning eager stage fit and no compiled one: a compiled run is expected to take
# a million times what the runs done so far took against their priors.
FAST_PRIORS = {("flax", False): 1.0, ("lightning", False): 1.0, ("lightning", True): 1e6}


def install_stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lightning_exit: int = 0) -> None:
    """Stand-in training, data and probe scripts (the training ones copy a run written beforehand)."""
    install_fake_scripts(tmp_path, monkeypatch, lightning_exit=lightning_exit)
    (tmp_path / "fake_probe.py").write_text(FAKE_PROBE_SCRIPT)
    monkeypatch.setattr(gpu, "PROBE_SCRIPT", tmp_path / "fake_probe.py")
    monkeypatch.setattr(gpu, "REHEARSAL", dataclasses.replace(REHEARSAL, prior_s=FAST_PRIORS, reserve_s=5.0))


def _planned(*flags: str, logdir: Path = Path("runs")) -> list[runner.PlannedRun]:
    args = benchmark.parse_args([*gpu.GPU.benchmark_flags, "--precisions", "bf16", "fp32", *flags])
    return benchmark.plan_runs(args, logdir)


def _kinds(runs) -> list[tuple[str, bool, str]]:
    return [(run.stack, run.compile, gpu.precision_of(run)) for run in runs]


# ---------------------------------------------------------------- planning


def test_stages_run_each_precisions_pair_first_bf16_first_then_the_compiled_runs():
    stages = gpu.stages(_planned())
    assert [_kinds(stage) for stage in stages] == [
        [("flax", False, "bf16"), ("lightning", False, "bf16")],
        [("flax", False, "fp32"), ("lightning", False, "fp32")],
        [("lightning", True, "bf16")],
        [("lightning", True, "fp32")],
    ]
    first = stages[0][0].command
    for flag, value in (("--preset", "swinv2_tiny_window8_256"), ("--batch-size", "64"), ("--epochs", "3"),
                        ("--synthetic-size", "imagenette"), ("--dataset", "synthetic")):
        assert first[first.index(flag) + 1] == value
    assert "--pretrained" in first  # --same-init


def test_the_sweeps_runs_come_last_one_stage_per_batch_size():
    main = _planned()
    sweep = _planned("--batch-sizes", "128", "256", "--precisions", "bf16", "--no-compile")
    stages = gpu.stages(main + sweep)
    assert [[gpu.batch_of(run) for run in stage] for stage in stages] == [[64, 64]] * 2 + [[64]] * 2 + [
        [128, 128], [256, 256]]
    assert _kinds(stages[-1]) == [("flax", False, "bf16"), ("lightning", False, "bf16")]
    assert len({run.run_name for run in main + sweep if run.stack == "flax"}) == 4  # names carry the batch size


def test_estimates_are_the_priors_scaled_by_how_the_runs_done_compared_with_theirs():
    mode = dataclasses.replace(REHEARSAL, prior_s={("flax", False): 10.0, ("lightning", False): 5.0,
                                                   ("lightning", True): 50.0}, fp32_factor=2.0)
    flax_bf16, eager_bf16, compiled_bf16, flax_fp32, *_ = sorted(
        _planned(), key=lambda run: (gpu.precision_of(run), run.compile, run.stack))
    assert gpu.estimate_s(eager_bf16, [], mode) == 5.0
    assert gpu.estimate_s(flax_fp32, [], mode) == 20.0
    done = [(flax_bf16, 30.0)]  # three times its prior
    assert gpu.estimate_s(compiled_bf16, done, mode) == 150.0
    assert gpu.estimate_s(flax_fp32, done, mode) == 60.0
    assert gpu.stage_fits((flax_bf16, eager_bf16), done, mode, left_s=46.0, per_run_overhead_s=0.5) \
        == (True, 46.0)
    assert gpu.stage_fits((flax_bf16, eager_bf16), done, mode, left_s=45.9, per_run_overhead_s=0.5) \
        == (False, 46.0)


def test_flax_runs_get_full_float32_unless_it_slows_their_bf16_products():
    assert gpu.jax_precision("fp32", {}) == "highest"
    assert gpu.jax_precision("bf16", {}) == "highest"  # a CPU: nothing measured, nothing to lose
    assert gpu.jax_precision("bf16", {"jax_bf16_tflops": {"default": 700.0, "highest": 690.0}}) == "highest"
    assert gpu.jax_precision("bf16", {"jax_bf16_tflops": {"default": 700.0, "highest": 300.0}}) is None
    assert gpu.jax_precision("fp32", {"jax_bf16_tflops": {"default": 700.0, "highest": 300.0}}) == "highest"


def test_each_run_is_stopped_at_its_limit_and_only_flax_runs_get_the_jax_setting():
    flax, eager, *_ = _planned()
    limited = gpu.with_limits(flax, 123.7, "highest")
    assert limited.command == ("timeout", "--kill-after=10", "123", "env", "JAX_DEFAULT_MATMUL_PRECISION=highest",
                               *flax.command)
    assert gpu.with_limits(eager, 50, "highest").command == ("timeout", "--kill-after=10", "50",
                                                             *eager.command)
    assert gpu.with_limits(flax, 50, None).command[3:] == flax.command


def test_the_final_printout_leaves_out_breakdowns_figures_and_the_list_of_runs():
    report = "\n".join(["# title", "Generated from 4 runs.", "| headline |", "### Per stack", "| row |",
                        "### Where the time goes", "| part |",
                        "### Figures", "![x](x.png)", "## fp32 group", "| fp32 headline |", "## Runs", "| run |",
                        "## On this machine (scripts/gpu_benchmark.py)", "- GPU", "### Runs, most important first",
                        "| run | status |"])
    assert gpu.final_summary(report).split("\n")[1:] == [
        "# title", "| headline |", "### Per stack", "| row |", "## fp32 group", "| fp32 headline |",
        "## On this machine (scripts/gpu_benchmark.py)", "- GPU", "### Runs, most important first", "| run | status |"]


# ---------------------------------------------------------------- the probe and the wheels


def test_probe_on_this_cpu_finds_every_import_and_full_float32_in_both_frameworks():
    result = probe.probe(gpu=False)
    assert result["problems"] == [] and result["import_failures"] == {}
    assert {"torch", "jax", "flax", "clu", "tensorboardX", "ml-collections"} <= set(result["versions"])
    for framework in ("torch", "jax_default", "jax_highest"):
        found = result["float32"][framework]
        assert found["matmul"] < probe.FULL_FLOAT32_BELOW and found["conv"] < probe.FULL_FLOAT32_BELOW
    assert result["float32"]["torch"]["settings"]["backends.cuda.matmul.allow_tf32"] is False
    assert "GPU: none (rehearsal on the CPU)" in probe.describe(result)


def test_probe_names_float32_by_its_error_against_float64():
    assert probe.precision_label(3e-7) == "full float32"
    assert probe.precision_label(3e-4) == "TF32 (10-bit mantissa)"
    assert probe.precision_label(4e-3) == "bf16 or lower"


def test_entry_script_installs_the_carried_wheels_into_a_private_folder_without_network(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "GPU_BENCHMARK_SITE": str(site), "PIP_NO_INDEX": "1"}
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_benchmark.sh"), "--help"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--rehearse" in done.stdout and "--budget-s" in done.stdout
    assert {"clu", "ml_collections", "tensorboardX"} <= {path.name for path in site.iterdir()}
    found = subprocess.run(["python", "-c", "import clu, ml_collections, tensorboardX; "
                            "print(clu.__file__, ml_collections.__file__, tensorboardX.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and all(path.startswith(str(site)) for path in found.stdout.split())
    wheels = sorted(path.name for path in (REPO_ROOT / "wheels").iterdir())
    assert all(name.endswith("-py3-none-any.whl") for name in wheels) and len(wheels) == 3


# ---------------------------------------------------------------- the command, with stand-in training


def test_rehearsal_runs_the_pairs_skips_what_does_not_fit_and_leaves_four_files(tmp_path, monkeypatch):
    install_stand_ins(tmp_path, monkeypatch)
    out, workdir = tmp_path / "out", tmp_path / "work"
    assert gpu.main(["--rehearse", "--out", str(out), "--workdir", str(workdir),
                     "--data-dir", str(tmp_path / "data")]) == 0

    assert sorted(os.listdir(out)) == OUTPUT_FILES  # the remote tool brings back 8 files at most
    record = json.loads((out / "gpu_benchmark.json").read_text())
    assert record["status"] == "finished"
    assert [(e["stack"], e["compile"], e["precision"], e["status"]) for e in record["plan"]] == [
        ("flax", False, "bf16", "done"), ("lightning", False, "bf16", "done"),
        ("flax", False, "fp32", "done"), ("lightning", False, "fp32", "done"),
        ("lightning", True, "bf16", "skipped"), ("lightning", True, "fp32", "skipped"),
        ("flax", False, "bf16", "done"), ("lightning", False, "bf16", "done")]  # the sweep, at batch 64
    assert [e["run_name"] for e in record["plan"]][-2:] == ["bs64-bf16-r0", "bs64-bf16-eager-r0"]
    assert record["plan"][-3]["note"].startswith("skipped: its stage expected to need")
    assert {"probe", "self-check", "data", "init weights", "report"} <= set(record["sections"])

    runs = json.loads((workdir / "runs" / "benchmark.json").read_text())["runs"]
    assert [run["returncode"] for run in runs] == [0] * 6
    assert [("JAX_DEFAULT_MATMUL_PRECISION=highest" in run["command"]) for run in runs] == [True, False] * 3
    assert all(run["command"][0] == "timeout" for run in runs)
    assert (workdir / "selfcheck" / "flax" / "bf16-r0" / "config.json").is_file()

    report = (out / "report.md").read_text()
    assert report.count("| Training: Flax vs Lightning eager |") == 3  # bf16 and fp32 at batch 32, bf16 at 64
    assert "## How the cost grows" in report and "cost_growth.png" in report
    assert "## On this machine (scripts/gpu_benchmark.py)" in report and "| JAX | fp32 | JAX_DEFAULT_MATMUL_PRECISION" \
        "=highest | matmul error 2.0e-07 (full float32)" in report
    assert "| bs32-bf16-compile-r0 | lightning | True | bf16 | skipped |" in report
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "work/runs/flax/bs32-fp32-r0/config.json" in names and "work/report/report.md" in names
    assert any(name.endswith(".png") for name in names) and any("events.out.tfevents" in name for name in names)
    assert not any(name.endswith(".pth") or "compile-caches" in name for name in names)
    log = (out / "gpu_benchmark.log").read_text()
    assert "== self-check" in log and "gpu_benchmark: finished in" in log


def test_a_failed_self_check_stops_before_any_run_and_still_leaves_the_files(tmp_path, monkeypatch):
    install_stand_ins(tmp_path, monkeypatch, lightning_exit=3)
    out, workdir = tmp_path / "out", tmp_path / "work"
    assert gpu.main(["--rehearse", "--out", str(out), "--workdir", str(workdir),
                     "--data-dir", str(tmp_path / "data")]) == 1
    record = json.loads((out / "gpu_benchmark.json").read_text())
    assert record["status"].startswith("STOPPED: the self-check failed: lightning (exit 3: RuntimeError: the model "
                                       "diverged; log ")
    assert {entry["status"] for entry in record["plan"]} == {"planned"}
    assert not (workdir / "runs" / "benchmark.json").exists()
    assert sorted(os.listdir(out)) == OUTPUT_FILES
    assert "STOPPED: the self-check failed" in (out / "gpu_benchmark.log").read_text()


def test_a_problem_the_probe_finds_stops_the_benchmark_before_the_self_check(tmp_path, monkeypatch):
    install_stand_ins(tmp_path, monkeypatch)
    (tmp_path / "fake_probe.py").write_text(
        FAKE_PROBE_SCRIPT.replace('"problems": []', '"problems": ["JAX sees no GPU (its devices are cpu)"]')
        + "sys.exit(1)\n")
    out, workdir = tmp_path / "out", tmp_path / "work"
    assert gpu.main(["--rehearse", "--out", str(out), "--workdir", str(workdir),
                     "--data-dir", str(tmp_path / "data")]) == 1
    status = json.loads((out / "gpu_benchmark.json").read_text())["status"]
    assert status == (f"STOPPED: the probe found problems: JAX sees no GPU (its devices are cpu); "
                      f"log {workdir / 'probe.log'}")
    assert not (workdir / "selfcheck").exists() and sorted(os.listdir(out)) == OUTPUT_FILES


def test_a_run_still_going_at_the_budget_is_stopped_set_aside_and_its_partner_skipped(tmp_path, monkeypatch):
    install_stand_ins(tmp_path, monkeypatch)
    sleeper = tmp_path / "slow_flax.py"  # makes its run folder, then outlives any budget
    sleeper.write_text(textwrap.dedent("""
        import sys, time
        from pathlib import Path
        folder = Path(sys.argv[sys.argv.index("--logdir") + 1]) / "flax" / sys.argv[sys.argv.index("--run-name") + 1]
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        print("epoch 1 of 3", flush=True)
        time.sleep(300)
    """))
    monkeypatch.setitem(runner.TRAINING_SCRIPTS, "flax", sleeper)
    workdir, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    mode = gpu.REHEARSAL
    args = benchmark.parse_args([*mode.benchmark_flags, "--data-dir", str(tmp_path / "data"), "--precisions", "fp32",
                                 "--no-compile"])
    planned = benchmark.plan_runs(args, workdir / "runs")
    budget = Budget(time.time(), gpu.KILL_AFTER_S + 3.0, 0.0)  # each run stopped after 3 s at most
    record = {**gpu.new_record(mode, budget.seconds, planned), "jax_precision": {"fp32": "highest"}}
    benchmark_record = {"runs": [], "compile_caches": "cold"}
    start = time.perf_counter()
    gpu.run_stages(planned, mode, budget, record, benchmark_record,
                   runner.prepare_command(args), workdir, out, Narrator(out / "gpu_benchmark.log"))

    assert time.perf_counter() - start < 60
    flax, eager = record["plan"]
    assert flax["status"] == "stopped at the budget" and benchmark_record["runs"][0]["returncode"] == 124
    assert flax["note"] == f"epoch 1 of 3; folder moved to {workdir / 'unfinished' / 'flax-bs32-fp32-r0'}"
    assert not (workdir / "runs" / "flax" / "bs32-fp32-r0").exists()
    assert eager["status"] == "skipped" and eager["note"] == "skipped: the budget ran out"
    assert len(benchmark_record["runs"]) == 1
    assert "| bs32-fp32-r0 | flax | False | fp32 | stopped at the budget |" in (out / "report.md").read_text()
    assert (out / "results.tar.gz").is_file()


# ---------------------------------------------------------------- the real thing, on this CPU


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rehearsal_end_to_end_on_this_cpu(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_benchmark.sh"), "--rehearse", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), "--data-dir", str(tmp_path / "data")],
                          env={**os.environ, "GPU_BENCHMARK_SITE": str(tmp_path / "site")},
                          capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(out)) == OUTPUT_FILES
    record = json.loads((out / "gpu_benchmark.json").read_text())
    statuses = {(e["stack"], e["compile"], e["precision"]): e["status"] for e in record["plan"]}
    assert statuses["flax", False, "bf16"] == statuses["lightning", False, "bf16"] == "done"
    assert set(statuses.values()) <= {"done", "skipped"}
    assert record["elapsed_s"] <= record["budget_s"]
    assert "clu /" in done.stdout and str(tmp_path / "site") in done.stdout  # the carried wheels were used
    report = (out / "report.md").read_text()
    assert "| Training: Flax" in report and "## On this machine (scripts/gpu_benchmark.py)" in report
