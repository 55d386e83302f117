"""bench/benchmark.py and bench/runner.py: identical settings for both stacks, records, failures, a CPU smoke run."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

from bench import benchmark, runner
from tests.test_compare import write_fake_run

# A stand-in for a training script: it takes the shared flags, copies a run folder written beforehand with
# known timings (Lightning steps take 1 s, Flax steps 0.5 s) and keeps its own command line for the test.
# It also notes the compile-cache folders it was given and what they held when it started, then "compiles" into them.
FAKE_TRAINING_SCRIPT = textwrap.dedent("""
    import argparse, json, os, shutil, sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    for flag in ("--preset", "--dataset", "--data-dir", "--model", "--img-size", "--batch-size", "--epochs",
                 "--max-steps", "--seed", "--precision", "--run-name", "--logdir", "--num-workers",
                 "--synthetic-size", "--pretrained", "--augment"):
        parser.add_argument(flag)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if {exit_code}:
        print("RuntimeError: the model diverged", file=sys.stderr)
        sys.exit({exit_code})
    run_dir = Path(args.logdir) / {stack!r} / args.run_name
    shutil.copytree({template!r}, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config.update(run_name=args.run_name, compile=args.compile, batch_size=int(args.batch_size or 8),
                  img_size=int(args.img_size or config["img_size"]),
                  precision=args.precision or "fp32", pretrained=args.pretrained)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "argv.json").write_text(json.dumps(sys.argv[1:]))
    caches = {{name: os.environ.get(name)
               for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR")}}
    held = {{name: sorted(os.listdir(path)) if path and os.path.isdir(path) else None for name, path in caches.items()}}
    (run_dir / "caches.json").write_text(json.dumps({{"dirs": caches, "held_at_start": held}}))
    for path in caches.values():
        if path and os.path.isdir(path):
            (Path(path) / f"compiled-by-{{args.run_name}}").write_text("kernel")
""")


# A stand-in for scripts/prepare_data.py that leaves its command line in --data-dir.
FAKE_PREPARE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    data_dir = Path(sys.argv[sys.argv.index("--data-dir") + 1])
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "prepare_argv.json").write_text(json.dumps(sys.argv[1:]))
""")


def install_fake_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lightning_exit: int = 0,
                         load: float = 0.0) -> None:
    """Fake training and data scripts, and a host whose 1-minute load stays at `load`."""
    monkeypatch.setattr(runner, "load_1m", lambda: load)
    (tmp_path / "fake_prepare_data.py").write_text(FAKE_PREPARE_SCRIPT)
    monkeypatch.setattr(runner, "PREPARE_SCRIPT", tmp_path / "fake_prepare_data.py")
    scripts = {}
    for stack, exit_code, step_s in (("lightning", lightning_exit, 1.0), ("flax", 0, 0.5)):
        template = write_fake_run(tmp_path / "templates", stack, step_s=step_s)
        scripts[stack] = tmp_path / f"fake_train_{stack}.py"
        scripts[stack].write_text(FAKE_TRAINING_SCRIPT.format(exit_code=exit_code, stack=stack, template=str(template)))
    monkeypatch.setattr(runner, "TRAINING_SCRIPTS", scripts)


def _without_script_and_name(command: tuple[str, ...]) -> list[str]:
    flags = list(command[2:])
    name_at = flags.index("--run-name")
    del flags[name_at:name_at + 2]
    return [flag for flag in flags if flag != "--compile"]


def test_every_variant_gets_identical_settings(tmp_path):
    args = benchmark.parse_args([
        "--preset", "swinv2_tiny_window8_256", "--dataset", "synthetic", "--batch-sizes", "32", "64",
        "--precisions", "bf16", "fp32", "--epochs", "5", "--seed", "7", "--repeats", "2",
    ])
    planned = benchmark.plan_runs(args, tmp_path / "runs")
    assert len(planned) == 2 * 2 * 2 * 3  # repeats x batch sizes x precisions x (flax, eager, compiled)
    assert [(run.stack, run.compile) for run in planned[:3]] == [("flax", False), ("lightning", False),
                                                                 ("lightning", True)]
    assert [(run.stack, run.compile) for run in planned[12:15]] == [("lightning", False), ("lightning", True),
                                                                    ("flax", False)]  # repeat 2 rotates the order
    for start in range(0, len(planned), 3):
        by_variant = {(run.stack, run.compile): run for run in planned[start:start + 3]}
        flax, eager, compiled = by_variant["flax", False], by_variant["lightning", False], by_variant["lightning", True]
        assert _without_script_and_name(flax.command) == _without_script_and_name(eager.command) \
            == _without_script_and_name(compiled.command)
        assert "--compile" not in flax.command + eager.command and compiled.command[-1] == "--compile"
    first = planned[0].command
    for flag, value in (("--preset", "swinv2_tiny_window8_256"), ("--epochs", "5"), ("--seed", "7"),
                        ("--batch-size", "32"), ("--precision", "bf16"), ("--logdir", str(tmp_path / "runs"))):
        assert first[first.index(flag) + 1] == value
    for stack in ("flax", "lightning"):
        names = [run.run_name for run in planned if run.stack == stack]
        assert len(names) == len(set(names))


def test_benchmark_runs_both_stacks_records_them_and_writes_the_comparison(tmp_path, monkeypatch):
    install_fake_scripts(tmp_path, monkeypatch)
    logdir, out = tmp_path / "runs", tmp_path / "report"
    assert benchmark.main(["--batch-sizes", "8", "--precisions", "fp32", "--epochs", "3", "--seed", "3",
                           "--data-dir", str(tmp_path / "data"), "--logdir", str(logdir), "--out", str(out)]) == 0

    # The smoke preset's data, prepared once before any run.
    assert json.loads((tmp_path / "data" / "prepare_argv.json").read_text()) == [
        "--dataset", "synthetic", "--data-dir", str(tmp_path / "data"), "--img-size", "64", "--seed", "3",
        "--synthetic-size", "small"]

    record = json.loads((logdir / "benchmark.json").read_text())
    assert [(run["stack"], run["compile"], run["returncode"]) for run in record["runs"]] == [
        ("flax", False, 0), ("lightning", False, 0), ("lightning", True, 0)]
    # TensorBoard over the runs folder shows the custom-scalars layout from its root, before any run wrote one.
    root = EventAccumulator(str(logdir))
    root.Reload()
    assert root.Tags()["tensors"] == [custom_scalar_metadata.CONFIG_SUMMARY_TAG]
    assert record["environment"]["versions"]["numpy"] and record["environment"]["versions"]["python"]
    assert all(len(run["load_average_1m"]) == 2 for run in record["runs"])
    flax_argv = json.loads((logdir / "flax" / "bs8-fp32-r0" / "argv.json").read_text())
    eager_argv = json.loads((logdir / "lightning" / "bs8-fp32-eager-r0" / "argv.json").read_text())
    assert flax_argv[:flax_argv.index("--run-name")] == eager_argv[:eager_argv.index("--run-name")]
    report = (out / "report.md").read_text()
    assert "| Training: Flax vs Lightning eager |" in report and "Flax is 2.00x faster than Lightning eager" in report
    assert "Training: Flax vs Lightning compiled" in report
    assert len(list(out.glob("*.png"))) == 5
    assert re.search(r"\| flax/bs8-fp32-r0 \| flax \| False \| 0 \| random \| 3 \| cpu: Test CPU \(AVX2\) x2 cores \| fp32 \| "
                     r"0\.0 / 0\.0 \| \d+ / \d+ \|", report)
    assert "†" not in report


def test_several_batch_and_image_sizes_plan_a_run_set_each_and_give_how_the_cost_grows(tmp_path, monkeypatch):
    args = benchmark.parse_args(["--img-sizes", "64", "128", "--batch-sizes", "8", "16", "--no-compile"])
    planned = benchmark.plan_runs(args, tmp_path / "planned")
    assert [run.run_name for run in planned if run.stack == "flax"] == [
        "px64-bs8-r0", "px64-bs16-r0", "px128-bs8-r0", "px128-bs16-r0"]
    for run in planned:
        size, batch = run.run_name.split("-")[:2]
        assert run.command[run.command.index("--img-size") + 1] == size.removeprefix("px")
        assert run.command[run.command.index("--batch-size") + 1] == batch.removeprefix("bs")

    install_fake_scripts(tmp_path, monkeypatch)
    logdir, out = tmp_path / "runs", tmp_path / "report"
    assert benchmark.main(["--batch-sizes", "8", "16", "--img-sizes", "64", "128", "--no-compile", "--data-dir",
                           str(tmp_path / "data"), "--logdir", str(logdir), "--out", str(out)]) == 0
    # The data of each image size prepared before any run.
    assert (logdir / "logs" / "prepare_data-1.log").exists()
    report = (out / "report.md").read_text()
    section = report[report.index("## How the cost grows"):report.index("## Runs")]
    assert "| Flax | 128 | 16 |" in section and "| Lightning eager | 64 | 8 |" in section
    assert (out / "cost_growth.png").exists()


def test_img_size_and_img_sizes_together_are_a_flag_error(capsys):
    with pytest.raises(SystemExit) as raised:
        benchmark.parse_args(["--img-size", "64", "--img-sizes", "64", "128"])
    assert raised.value.code == 2 and "--img-size and --img-sizes" in capsys.readouterr().err


def test_failed_training_run_stops_the_benchmark_naming_its_log(tmp_path, monkeypatch):
    install_fake_scripts(tmp_path, monkeypatch, lightning_exit=3)
    logdir = tmp_path / "runs"
    with pytest.raises(SystemExit) as stopped:
        benchmark.main(["--no-compile", "--data-dir", str(tmp_path / "data"), "--logdir", str(logdir),
                        "--out", str(tmp_path / "report")])
    message = str(stopped.value.code)
    log = logdir / "logs" / "lightning-eager-r0.log"
    assert message == (f"benchmark.py: fake_train_lightning.py run 'eager-r0' failed (exit 3): "
                       f"RuntimeError: the model diverged; full log: {log}")
    assert json.loads((logdir / "benchmark.json").read_text())["runs"][-1]["returncode"] == 3
    assert not (tmp_path / "report").exists()


def test_missing_training_script_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "TRAINING_SCRIPTS", dict.fromkeys(("lightning", "flax"), tmp_path / "nope.py"))
    with pytest.raises(SystemExit, match=r"^benchmark.py: script\(s\) not found: .*nope.py"):
        benchmark.main(["--logdir", str(tmp_path / "runs")])


@pytest.mark.slow
def test_end_to_end_smoke_benchmark_of_both_stacks_on_cpu(tmp_path):
    logdir, out = tmp_path / "runs", tmp_path / "report"
    # The smoke preset cut to two epochs of the tiny synthetic set (6 steps each), compile included.
    assert benchmark.main(["--preset", "smoke", "--dataset", "synthetic", "--synthetic-size", "tiny",
                           "--epochs", "2", "--data-dir", str(tmp_path / "data"),
                           "--logdir", str(logdir), "--out", str(out)]) == 0
    record = json.loads((logdir / "benchmark.json").read_text())
    assert {(run["stack"], run["compile"]) for run in record["runs"]} == {
        ("flax", False), ("lightning", False), ("lightning", True)}
    report = (out / "report.md").read_text()
    # A run started while the machine was busy carries a dagger.
    assert re.search(r"\| Training: Flax( †)? vs Lightning eager( †)? \|", report) and "FORCED" not in report
    assert "- compile caches: cold (fresh per run)" in report
    for run_dir in (path.parent for path in logdir.rglob("config.json")):
        config = json.loads((run_dir / "config.json").read_text())
        assert config["device"].startswith("cpu") and config["versions"]
        assert json.loads((run_dir / "summary.json").read_text())["wall_time_s"] > 0
    assert all(path.stat().st_size > 5000 for path in out.glob("*.png")) and len(list(out.glob("*.png"))) == 5


def _benchmark(tmp_path: Path, *flags: str) -> tuple[dict, str]:
    """Run the benchmark on the fake scripts with 3 epochs of batch 8; (benchmark.json, report.md)."""
    logdir, out = tmp_path / "runs", tmp_path / "report"
    assert benchmark.main(["--batch-sizes", "8", "--epochs", "3", "--data-dir", str(tmp_path / "data"),
                           "--logdir", str(logdir), "--out", str(out), *flags]) == 0
    return json.loads((logdir / "benchmark.json").read_text()), (out / "report.md").read_text()


def _caches_seen(tmp_path: Path) -> dict[str, dict]:
    """Run folder -> the compile-cache folders the fake training script was given and what they held at its start."""
    return {str(path.parent.relative_to(tmp_path / "runs")): json.loads(path.read_text())
            for path in sorted((tmp_path / "runs").rglob("caches.json"))}


def test_each_benchmark_run_starts_with_fresh_private_compile_cache_folders(tmp_path, monkeypatch):
    install_fake_scripts(tmp_path, monkeypatch)
    record, report = _benchmark(tmp_path)
    seen = _caches_seen(tmp_path)
    assert len(seen) == 3
    folders = [Path(path) for run in seen.values() for path in run["dirs"].values()]
    assert len(set(folders)) == 9  # three caches (TorchInductor, Triton, JAX) per run, none shared
    assert all(folder.is_relative_to(tmp_path / "runs" / "compile-caches") for folder in folders)
    assert all(held == [] for run in seen.values() for held in run["held_at_start"].values())
    assert record["compile_caches"] == "cold"
    assert all(set(run["compile_caches"]) == set(runner.COMPILE_CACHE_VARIABLES) for run in record["runs"])
    assert "- compile caches: cold (fresh per run)" in report


def test_warm_caches_give_every_run_one_shared_set_of_folders(tmp_path, monkeypatch):
    install_fake_scripts(tmp_path, monkeypatch)
    record, report = _benchmark(tmp_path, "--warm-caches")
    seen = list(_caches_seen(tmp_path).values())
    assert all(run["dirs"] == seen[0]["dirs"] for run in seen)
    # Run order: Flax, Lightning eager, compiled; each later run finds what the earlier ones left.
    held = sorted((run["held_at_start"]["TORCHINDUCTOR_CACHE_DIR"] for run in seen), key=len)
    assert [len(files) for files in held] == [0, 1, 2]
    assert record["compile_caches"] == "warm" and "- compile caches: warm" in report


def test_dry_run_shows_each_runs_own_compile_cache_folders(tmp_path, capsys):
    assert benchmark.main(["--dry-run", "--logdir", str(tmp_path / "runs")]) == 0
    commands = capsys.readouterr().out.splitlines()[1:]
    inductor = [line.split()[0] for line in commands]
    assert len(inductor) == len(set(inductor)) == 3
    caches = tmp_path / "runs" / "compile-caches"
    assert all(entry.startswith(f"TORCHINDUCTOR_CACHE_DIR={caches}/") for entry in inductor)
    assert not (tmp_path / "runs").exists()


def test_host_load_above_the_cores_is_waited_out_up_to_the_bound():
    said, slept = [], []
    loads = iter([3.5, 2.5, 1.5])
    assert runner.wait_for_quiet(2, 120, load=lambda: next(loads), sleep=slept.append, say=said.append) == (1.5, 10)
    assert slept == [5.0, 5.0]
    assert said == ["host load 3.50 is above the 2 cores: waiting up to 120 s for it to fall ..."]
    slept.clear()
    assert runner.wait_for_quiet(2, 12, load=lambda: 4.0, sleep=slept.append, say=said.append) == (4.0, 12)
    assert slept == [5.0, 5.0, 2.0]
    assert runner.wait_for_quiet(2, 0, load=lambda: 4.0, sleep=slept.append, say=said.append) == (4.0, 0)
    assert runner.wait_for_quiet(2, 120, load=lambda: 0.3, sleep=slept.append, say=said.append) == (0.3, 0)


def test_runs_started_under_contention_are_recorded_and_marked_in_the_report(tmp_path, monkeypatch):
    install_fake_scripts(tmp_path, monkeypatch, load=99.0)
    record, report = _benchmark(tmp_path, "--max-wait-s", "0")
    assert all(run["contended"] and run["load_average_1m"][0] == 99.0 for run in record["runs"])
    assert all(run["cores"] == os.cpu_count() for run in record["runs"])
    assert "| Training: Flax † vs Lightning eager † |" in report
    assert "| flax/bs8-r0 † | flax |" in report and "| Lightning compiled † | 1 |" in report
    assert "† Started under contention" in report


def test_threads_of_each_stack_are_recorded(tmp_path, monkeypatch):
    import torch

    install_fake_scripts(tmp_path, monkeypatch)
    record, _ = _benchmark(tmp_path, "--no-compile")
    assert all(run["threads"] == {"torch_intra_op": torch.get_num_threads(), "xla_cpu": runner.xla_cpu_threads()}
               for run in record["runs"])
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    assert runner.xla_cpu_threads() == 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert runner.xla_cpu_threads() == os.cpu_count()


def test_same_init_writes_one_set_of_weights_and_starts_every_run_from_it(tmp_path, monkeypatch):
    from shared_data.swin_weights import read_weights

    install_fake_scripts(tmp_path, monkeypatch)
    record, report = _benchmark(tmp_path, "--same-init", "--seed", "5")
    weights = tmp_path / "runs" / benchmark.INIT_WEIGHTS
    assert record["same_init"] == str(weights.resolve())
    state, fmt = read_weights(weights)
    assert fmt == "official" and state["head.weight"].shape[0] == 10  # the dataset's classes
    for argv_path in (tmp_path / "runs").rglob("argv.json"):
        argv = json.loads(argv_path.read_text())
        assert argv[argv.index("--pretrained") + 1] == str(weights.resolve())
    assert "### Same training" in report and "| init-weights.pth |" in report
    # The weights follow from the seed alone.
    again = benchmark.write_init_weights(benchmark.parse_args(["--seed", "5"]), tmp_path / "again.pth")
    assert all((read_weights(again)[0][key] == value).all() for key, value in state.items())
