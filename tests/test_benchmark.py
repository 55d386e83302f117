"""Tests of scripts/benchmark.py: identical settings for both stacks, records, failures, and a real CPU smoke run."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from scripts import benchmark
from tests.test_compare import write_fake_run

# A stand-in for a training script: it takes the shared flags, copies a run folder written beforehand with
# known timings (Lightning steps take 1 s, Flax steps 0.5 s) and keeps its own command line for the test.
FAKE_TRAINING_SCRIPT = textwrap.dedent("""
    import argparse, json, shutil, sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    for flag in ("--preset", "--dataset", "--data-dir", "--model", "--img-size", "--batch-size", "--epochs",
                 "--max-steps", "--seed", "--precision", "--run-name", "--logdir", "--num-workers",
                 "--synthetic-size"):
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
                  precision=args.precision or "fp32")
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "argv.json").write_text(json.dumps(sys.argv[1:]))
""")


# A stand-in for scripts/prepare_data.py that leaves its command line in --data-dir.
FAKE_PREPARE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    data_dir = Path(sys.argv[sys.argv.index("--data-dir") + 1])
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "prepare_argv.json").write_text(json.dumps(sys.argv[1:]))
""")


def install_fake_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lightning_exit: int = 0) -> None:
    (tmp_path / "fake_prepare_data.py").write_text(FAKE_PREPARE_SCRIPT)
    monkeypatch.setattr(benchmark, "PREPARE_SCRIPT", tmp_path / "fake_prepare_data.py")
    scripts = {}
    for stack, exit_code, step_s in (("lightning", lightning_exit, 1.0), ("flax", 0, 0.5)):
        template = write_fake_run(tmp_path / "templates", stack, step_s=step_s)
        scripts[stack] = tmp_path / f"fake_train_{stack}.py"
        scripts[stack].write_text(FAKE_TRAINING_SCRIPT.format(exit_code=exit_code, stack=stack, template=str(template)))
    monkeypatch.setattr(benchmark, "TRAINING_SCRIPTS", scripts)


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
    assert record["environment"]["versions"]["numpy"] and record["environment"]["versions"]["python"]
    assert all(len(run["load_average_1m"]) == 2 for run in record["runs"])
    flax_argv = json.loads((logdir / "flax" / "bs8-fp32-r0" / "argv.json").read_text())
    eager_argv = json.loads((logdir / "lightning" / "bs8-fp32-eager-r0" / "argv.json").read_text())
    assert flax_argv[:flax_argv.index("--run-name")] == eager_argv[:eager_argv.index("--run-name")]
    report = (out / "report.md").read_text()
    assert "| Training: Flax vs Lightning eager |" in report and "Flax is 100% faster than Lightning eager" in report
    assert "Training: Flax vs Lightning compiled" in report
    assert len(list(out.glob("*.png"))) == 5
    assert re.search(r"\| flax/bs8-fp32-r0 \| flax \| False \| 0 \| 3 \| cpu: Test CPU x2 cores \| [\d.]+ / [\d.]+ \|", report)


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
    monkeypatch.setattr(benchmark, "TRAINING_SCRIPTS", dict.fromkeys(("lightning", "flax"), tmp_path / "nope.py"))
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
    assert "| Training: Flax vs Lightning eager |" in report and "FORCED" not in report
    for run_dir in (path.parent for path in logdir.rglob("config.json")):
        config = json.loads((run_dir / "config.json").read_text())
        assert config["device"].startswith("cpu") and config["versions"]
        assert json.loads((run_dir / "summary.json").read_text())["wall_time_s"] > 0
    assert all(path.stat().st_size > 5000 for path in out.glob("*.png")) and len(list(out.glob("*.png"))) == 5
