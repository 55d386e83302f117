"""Tests of bench/overhead.py on event files written here with known epoch times; nothing is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboardX import SummaryWriter

from bench import overhead
from report.compare import CONTENDED
from shared_data import tags

CPU = "cpu: Test CPU x2 cores"
ENVIRONMENT = {"host": "test-host", "platform": "Linux-test", "cpu": CPU, "versions": {"torch": "test"}}


def write_epoch_times(logdir: Path, stack: str, run_name: str, train_times: list[float]) -> None:
    """A run folder holding config.json and epoch/train_time_s for epochs 1, 2, ... as given."""
    run_dir = logdir / stack / run_name
    run_dir.mkdir(parents=True)
    config = {"stack": stack, "dataset": "synthetic", "model": "swinv2_nano_window4_64", "img_size": 64,
              "batch_size": 32, "precision": "fp32", "augment": "basic", "device": CPU, "epochs": len(train_times)}
    (run_dir / "config.json").write_text(json.dumps(config))
    writer = SummaryWriter(logdir=str(run_dir))
    for epoch, seconds in enumerate(train_times, start=1):
        writer.add_scalar(tags.EPOCH_TRAIN_TIME, seconds, epoch)
    writer.close()


def planned_runs(logdir: Path, repeats: int = 2) -> list:
    return overhead.plan_runs(overhead.parse_args(["--repeats", str(repeats)]), logdir)


def run_records(planned: list, load: float = 0.5, cores: int = 2) -> list[dict]:
    """What runner.run_planned records of each run: the load before and after it."""
    return [{"stack": item.stack, "run_name": item.run_name, "wall_s": 12.0, "load_average_1m": [load, load + 0.25],
             "cores": cores, "contended": load > cores} for item in planned]


# Epoch 1 pays for compilation: 30 s, far above the rest, so a median that kept it would move.
EPOCH_TIMES = {
    ("flax", "on"): ([30.0, 1.00, 1.04, 1.02], [30.0, 1.06, 1.02, 1.08]),  # median 1.03
    ("flax", "off"): ([30.0, 1.00, 0.98, 1.02], [30.0, 1.00, 1.00, 1.04]),  # median 1.00
    ("lightning", "on"): ([30.0, 2.00, 2.02, 2.04], [30.0, 2.00, 2.02, 2.00]),  # median 2.01
    ("lightning", "off"): ([30.0, 2.00, 2.00, 2.00], [30.0, 2.00, 2.00, 2.00]),  # median 2.00
}


@pytest.fixture
def fake_overhead_runs(tmp_path: Path) -> tuple[Path, list]:
    logdir = tmp_path / "runs"
    planned = planned_runs(logdir)
    for item in planned:
        repeat = int(item.run_name.rsplit("-r", 1)[1])
        write_epoch_times(logdir, item.stack, item.run_name,
                          EPOCH_TIMES[item.stack, overhead.timing_of(item)][repeat])
    return logdir, planned


def test_overhead_compares_the_fastest_tenth_of_the_epochs_after_the_first_with_the_medians_beside_it(
        fake_overhead_runs):
    logdir, planned = fake_overhead_runs
    flax, lightning = overhead.overheads(logdir, planned)
    assert (flax.stack, lightning.stack) == ("flax", "lightning")
    assert list(flax.on_runs) == [pytest.approx((1.00, 1.04, 1.02)), pytest.approx((1.06, 1.02, 1.08))]  # epoch 1 out
    assert flax.on_s == pytest.approx(1.01) and flax.off_s == pytest.approx(0.99)  # the 0.1 quantiles
    assert flax.percent == pytest.approx(100 * (1.01 / 0.99 - 1)) and flax.median_percent == pytest.approx(3.0)
    assert not flax.target_met
    assert lightning.percent == pytest.approx(0.0) and lightning.median_percent == pytest.approx(0.5)
    assert lightning.target_met
    assert flax.epochs_on == flax.epochs_off == 6  # 3 epochs after the first, 2 repeats


def test_spells_of_slow_epochs_on_either_side_leave_the_overhead_at_the_stacks_own_cost():
    # A shared host slows whole epochs by 30% in spells; timing on costs every epoch 1%.
    on = ((1.01, 1.3, 1.3, 1.01), (1.01, 1.01, 1.3, 1.3), (1.3, 1.3, 1.01, 1.01))
    off = ((1.0, 1.0, 1.0, 1.3), (1.0, 1.0, 1.0, 1.0), (1.3, 1.0, 1.0, 1.0))
    result = overhead.Overhead("lightning", on, off)
    assert result.percent == pytest.approx(1.0) and result.error_percent < 0.5 and result.target_met
    assert result.median_percent > 10  # the medians land on different sides of the spells


def test_an_overhead_below_the_target_by_less_than_its_own_error_does_not_meet_it():
    # Its error comes from whole runs: ten steady epochs a run, but the two runs with timing on part by 6%.
    parted = overhead.Overhead("flax", ((1.01,) * 10, (1.07,) * 10), ((1.0,) * 10, (1.0,) * 10))
    assert parted.percent == pytest.approx(1.0) and parted.error_percent > 2 and not parted.target_met
    noisy = overhead.Overhead("flax", ((1.04, 1.05, 1.06), (1.01, 1.02, 1.03)), ((1.0,) * 3, (1.0,) * 3))
    assert 0 < noisy.error_percent < 2 < noisy.percent + noisy.error_percent and not noisy.target_met
    steady = overhead.Overhead("flax", ((1.015,) * 3, (1.015,) * 3), ((1.0,) * 3, (1.0,) * 3))
    assert steady.error_percent == pytest.approx(0.0, abs=1e-9) and steady.target_met
    single = overhead.Overhead("flax", ((1.015,) * 3,), ((1.0,) * 3,))  # one run a side: no error, so no verdict
    assert single.error_percent is None and not single.target_met


def test_report_table_and_json_record_state_each_stack_load_and_versions(fake_overhead_runs):
    logdir, planned = fake_overhead_runs
    record = {"environment": ENVIRONMENT, "runs": run_records(planned)}
    overhead.summarize(logdir, planned, record)
    assert json.loads(json.dumps(record))["overhead"][0]["target_met"] is False
    lines = overhead.format_report(record).splitlines()
    assert [cell.strip() for cell in lines[0].split("  ") if cell.strip()] == [
        "stack", "runs on / off", "epochs on / off", "fastest tenth on s", "off s", "overhead ± standard error",
        "medians' overhead", "target < 2%"]
    assert lines[1].split() == ["Flax", "2", "/", "2", "6", "/", "6", "1.010", "0.990", "+2.02%", "±", "1.01",
                                "+3.00%", "±", "1.48", "not", "met"]
    assert lines[2].split() == ["Lightning", "eager", "2", "/", "2", "6", "/", "6", "2.000", "2.000", "+0.00%", "±",
                                "0.00", "+0.50%", "±", "0.35", "met"]
    assert ["Flax", "timing-on-r0", "0.50", "->", "0.75", "12.0"] in [line.split() for line in lines]
    text = "\n".join(lines)
    assert f"device (Lightning eager): {CPU}" in text
    assert f"host: test-host (Linux-test), {CPU}" in text and "versions: torch test" in text
    assert not any(CONTENDED.strip() in line for line in lines if "timing-" in line)  # no run row marked


def test_runs_started_under_load_above_the_cores_and_their_stack_are_marked(fake_overhead_runs):
    logdir, planned = fake_overhead_runs
    records = run_records(planned)
    records[-1].update(load_average_1m=[3.0, 3.0], contended=True)  # Lightning, timing on, repeat 2 (off ran first)
    record = {"environment": ENVIRONMENT, "runs": records}
    lines = overhead.format_report(overhead.summarize(logdir, planned, record)).splitlines()
    assert lines[1].startswith("Flax ") and CONTENDED not in lines[1]
    assert lines[2].startswith(f"Lightning eager{CONTENDED} ")
    marked = [line.split("  ")[0] for line in lines if "timing-" in line and CONTENDED in line]
    assert marked == [f"Lightning eager timing-on-r1{CONTENDED}"]


def test_a_run_with_no_epoch_after_the_first_is_a_one_line_error(tmp_path):
    logdir = tmp_path / "runs"
    planned = planned_runs(logdir, repeats=1)
    for item in planned:
        write_epoch_times(logdir, item.stack, item.run_name, [30.0] if item.stack == "flax" else [30.0, 1.0])
    with pytest.raises(overhead.BenchmarkError, match="^flax: no epoch after the first"):
        overhead.overheads(logdir, planned)


def test_dry_run_lists_timing_on_and_off_runs_of_both_stacks_in_abba_order(tmp_path, capsys):
    logdir = tmp_path / "runs"
    assert overhead.main(["--dry-run", "--logdir", str(logdir), "--repeats", "2"]) == 0
    prepare, *commands = capsys.readouterr().out.splitlines()
    assert "prepare_data.py" in prepare and "--synthetic-size tiny" in prepare
    runs = [(next(Path(word).name for word in line.split() if word.endswith(".py")),
             line.split("--step-timing ")[1].split()[0]) for line in commands]
    # Odd repeats run timing off first: a drift of the machine over a pair favours neither side.
    assert runs == [("train_flax.py", "on"), ("train_flax.py", "off"),
                    ("train_lightning.py", "on"), ("train_lightning.py", "off"),
                    ("train_flax.py", "off"), ("train_flax.py", "on"),
                    ("train_lightning.py", "off"), ("train_lightning.py", "on")]
    assert all("--preset smoke" in line and "--epochs 4" in line and "--compile" not in line for line in commands)
    assert all(f"--logdir {logdir}" in line for line in commands)
    assert not logdir.exists()


def test_stacks_flag_measures_only_the_stacks_named(tmp_path):
    planned = overhead.plan_runs(overhead.parse_args(["--stacks", "lightning", "--repeats", "3"]), tmp_path)
    assert [item.stack for item in planned] == ["lightning"] * 6
    assert [overhead.timing_of(item) for item in planned] == ["on", "off", "off", "on", "on", "off"]
    with pytest.raises(SystemExit):
        overhead.parse_args(["--stacks", "tensorflow"])


def test_fewer_than_two_epochs_is_refused():
    with pytest.raises(SystemExit):
        overhead.parse_args(["--epochs", "1"])
