"""Tests of scripts/compare.py, report_figures.py and model_flops.py on event files written here with known timings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from tensorboard.compat.proto import summary_pb2 as tb_summary
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.util import tensor_util
from tensorboardX import SummaryWriter
from tensorboardX.proto import summary_pb2 as tbx_summary

from scripts import compare
from scripts.model_flops import forward_flops
from shared_data.timing import cpu_description

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU = "cpu: Test CPU x2 cores"


def write_fake_run(
    logdir: Path,
    stack: str,
    run_name: str = "r0",
    *,
    step_s: float = 1.0,
    first_step_s: float = 5.0,
    data_wait_s: float = 0.25,
    steps_per_epoch: int = 4,
    val_times: Sequence[float] = (3.0, 2.0, 2.0),
    checkpoint_s: float = 0.5,
    logging_s: float = 0.2,
    startup_s: float = 1.0,
    accuracy: float = 0.5,
    **config: Any,
) -> Path:
    """A run folder as the training scripts write it, whose every timing follows from the arguments.

    Each step takes `step_s` (of which `data_wait_s` waiting for data) except step 1, which takes
    `first_step_s`; an epoch's training time is the sum of its steps.
    """
    epochs = len(val_times)
    run_dir = logdir / stack / run_name
    run_dir.mkdir(parents=True)
    resolved = {
        "stack": stack, "dataset": "synthetic", "model": "swinv2_nano_window4_64", "img_size": 64,
        "batch_size": 8, "precision": "fp32", "epochs": epochs, "seed": 0, "compile": False, "device": CPU,
        "versions": {"numpy": "test"}, "num_params": 1000, "run_name": run_name, **config,
    }
    (run_dir / "config.json").write_text(json.dumps(resolved))
    writer = SummaryWriter(logdir=str(run_dir))
    step, run_wall = 0, startup_s
    for epoch in range(1, epochs + 1):
        train_time = 0.0
        for _ in range(steps_per_epoch):
            step += 1
            seconds = first_step_s if step == 1 else step_s
            train_time += seconds
            writer.add_scalar("time/step_s", seconds, step)
            writer.add_scalar("time/data_wait_s", data_wait_s, step)
            writer.add_scalar("time/compute_s", seconds - data_wait_s, step)
            writer.add_scalar("train/loss", 2.0 / step, step)
            if step == 1:
                writer.add_scalar("time/first_step_s", seconds, 1)
        val_time = val_times[epoch - 1]
        wall = train_time + val_time + checkpoint_s + logging_s
        run_wall += wall
        images = steps_per_epoch * resolved["batch_size"]
        for tag, value in (
            ("epoch/train_time_s", train_time), ("epoch/val_time_s", val_time),
            ("epoch/train_images_per_s", images / train_time), ("epoch/val_images_per_s", 100 / val_time),
            ("epoch/checkpoint_time_s", checkpoint_s), ("epoch/wall_time_s", wall),
            ("val/loss", 1.0 / epoch), ("val/accuracy", accuracy * epoch / epochs),
        ):
            writer.add_scalar(tag, value, epoch)
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": run_wall, "final_val_accuracy": accuracy}))
    return run_dir


def write_known_pair(logdir: Path, **config: Any) -> None:
    """Lightning: train epochs 8, 4, 4 s, val 3, 2, 2 s. Flax: train 10, 2, 2 s, val 1.5, 0.5, 0.5 s."""
    write_fake_run(logdir, "lightning", step_s=1.0, first_step_s=5.0, val_times=(3.0, 2.0, 2.0), **config)
    write_fake_run(logdir, "flax", step_s=0.5, first_step_s=8.5, val_times=(1.5, 0.5, 0.5), **config)


def _stats(logdir: Path) -> dict[str, list[compare.RunStats]]:
    groups, _ = compare.group_runs(compare.find_runs(logdir))
    return {variant: [compare.run_stats(run) for run in runs] for variant, runs in groups[0].variants.items()}


def test_speedups_match_known_timings_including_and_excluding_first_epoch(tmp_path):
    write_known_pair(tmp_path / "runs")
    stats = _stats(tmp_path / "runs")
    lightning, flax = stats[compare.EAGER][0], stats[compare.FLAX][0]
    assert (lightning.train_s, lightning.train_excl_first_s) == pytest.approx((16.0, 8.0))
    assert (flax.train_s, flax.train_excl_first_s) == pytest.approx((14.0, 4.0))

    including = compare.speedup([flax.train_s], [lightning.train_s], compare.FLAX, compare.EAGER)
    excluding = compare.speedup([flax.train_excl_first_s], [lightning.train_excl_first_s], compare.FLAX, compare.EAGER)
    assert including.faster == excluding.faster == compare.FLAX
    assert including.percents == pytest.approx([100 * (16 / 14 - 1)])
    assert excluding.percents == pytest.approx([100.0])
    validation = compare.speedup([lightning.val_s], [flax.val_s], compare.EAGER, compare.FLAX)
    assert validation.faster == compare.FLAX and validation.percents == pytest.approx([180.0])

    report = compare.compare(tmp_path / "runs", tmp_path / "report", figures=False).read_text()
    assert "| Training: Flax vs Lightning eager | Flax is 14% faster than Lightning eager (1 repeat) | " \
           "Flax is 100% faster than Lightning eager (1 repeat) |" in report
    assert "| Validation: Flax vs Lightning eager | Flax is 180% faster than Lightning eager (1 repeat) | " \
           "Flax is 300% faster than Lightning eager (1 repeat) |" in report


def test_warmup_cost_is_first_step_minus_median_step(tmp_path):
    write_known_pair(tmp_path / "runs")
    stats = _stats(tmp_path / "runs")
    assert stats[compare.EAGER][0].warmup_s == pytest.approx(4.0)
    assert stats[compare.FLAX][0].warmup_s == pytest.approx(8.0)
    assert stats[compare.EAGER][0].median_step_s == pytest.approx(1.0)


def test_repeats_give_min_median_max_of_per_repeat_speedups(tmp_path):
    runs = tmp_path / "runs"
    for repeat, lightning_step in enumerate((1.0, 1.5, 2.0)):
        # Flax's epochs 2-3 take 4 s, Lightning's 8, 12 and 16 s: 100%, 200%, 300% faster excluding epoch 1.
        write_fake_run(runs, "lightning", f"r{repeat}", step_s=lightning_step, seed=repeat)
        write_fake_run(runs, "flax", f"r{repeat}", step_s=0.5, seed=repeat)
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert "Flax is 200% faster than Lightning eager (min 100%, max 300%; 3 repeats)" in report


def test_lightning_compiled_runs_are_compared_as_their_own_variant(tmp_path):
    runs = tmp_path / "runs"
    write_known_pair(runs)
    write_fake_run(runs, "lightning", "compiled", step_s=0.25, first_step_s=30.0, compile=True)
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert "Training: Flax vs Lightning compiled" in report
    assert "Lightning compiled is 100% faster than Flax" in report  # excluding epoch 1: 2 s vs 4 s
    assert "Training: Lightning compiled vs Lightning eager" in report


def test_time_breakdown_seconds_and_shares_add_up_to_the_run(tmp_path):
    run_dir = write_fake_run(tmp_path / "runs", "lightning")
    parts = compare.time_breakdown(compare.read_run(run_dir))
    # 12 steps: 11 x 1 s + one 5 s first step, 0.25 s of each waiting for data; compile = 5 - 1 s.
    assert parts == pytest.approx({
        "data wait": 3.0, "compute": 9.0, "evaluation": 7.0, "checkpoint": 1.5, "compilation": 4.0,
        "logging/other": 0.6, "startup/teardown": 1.0,
    }, abs=1e-4)
    fractions = compare.shares(parts)
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert fractions["compute"] == pytest.approx(9.0 / 26.1, rel=1e-4)


def test_breakdown_is_in_the_report_with_seconds_and_shares(tmp_path):
    write_known_pair(tmp_path / "runs")
    report = compare.compare(tmp_path / "runs", tmp_path / "report", figures=False).read_text()
    assert "| Lightning eager | 3.00 s (11%) | 9.00 s (34%) | 7.00 s (27%) | 1.50 s (6%) | 4.00 s (15%) | " \
           "0.60 s (2%) | 1.00 s (4%) | 26.10 s |" in report
    assert "Largest part: Flax: compilation; Lightning eager: compute." in report


def test_trace_logging_every_other_step_has_its_step_sums_extrapolated(tmp_path):
    run_dir = write_fake_run(tmp_path / "runs", "lightning", steps_per_epoch=4, val_times=(3.0, 2.0))
    every_point = compare.read_run(run_dir)
    sparse = compare.Run(run_dir, every_point.config, every_point.summary, {
        tag: [(step, value) for step, value in points if not tag.startswith("time/") or step % 2 == 1]
        for tag, points in every_point.scalars.items()})
    assert compare.step_coverage(sparse) == pytest.approx(4 / 7)  # steps 1, 3, 5, 7 of 1..7
    # Kept: the 5 s first step and three 1 s steps, 0.25 s of data wait each, standing for 7 steps.
    assert compare.time_breakdown(sparse)["data wait"] == pytest.approx(4 * 0.25 * 7 / 4)
    assert compare.time_breakdown(every_point)["data wait"] == pytest.approx(8 * 0.25)


def test_mismatched_image_size_is_refused_naming_the_field(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", img_size=64)
    write_fake_run(runs, "flax", img_size=128)
    with pytest.raises(SystemExit) as refused:
        compare.main(["--runs", str(runs), "--out", str(tmp_path / "report")])
    message = str(refused.value.code)
    assert message.startswith("compare.py: not comparable:") and "img_size (64 vs 128)" in message
    assert "--force" in message and "\n" not in message
    assert not (tmp_path / "report" / "report.md").exists()


def test_refusal_names_every_differing_field(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", precision="bf16", device="cuda: NVIDIA H100 80GB HBM3")
    write_fake_run(runs, "flax", precision="fp32", device="cuda: NVIDIA A100-SXM4-80GB")
    with pytest.raises(compare.NotComparableError, match=r"precision \(bf16 vs fp32\), device \(cuda: NVIDIA H100"):
        compare.group_runs(compare.find_runs(runs))


def test_one_gpu_counted_or_not_is_the_same_device(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", device="cuda: NVIDIA H100 80GB HBM3 x1")
    write_fake_run(runs, "flax", device="cuda: NVIDIA H100 80GB HBM3")
    write_fake_run(runs, "flax", "two-gpus", device="cuda: NVIDIA H100 80GB HBM3 x2")
    groups, unpaired = compare.group_runs(compare.find_runs(runs))
    assert len(groups) == 1 and [run.path.name for run in unpaired] == ["two-gpus"]


def test_force_compares_mismatched_runs_and_marks_the_report(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", batch_size=8)
    write_fake_run(runs, "flax", batch_size=16)
    assert compare.main(["--runs", str(runs), "--out", str(tmp_path / "report"), "--force", "--no-figures"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "FORCED: not comparable: batch_size (8 vs 16)" in report


def test_runs_without_counterpart_are_listed_not_refused(tmp_path):
    runs = tmp_path / "runs"
    write_known_pair(runs)
    lone = write_fake_run(runs, "lightning", "bigger-batch", batch_size=64)
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert f"Not compared (no run of the other stack with the same configuration): {lone}." in report


def test_folder_without_both_stacks_exits_with_one_line_message(tmp_path):
    write_fake_run(tmp_path / "runs", "lightning")
    with pytest.raises(SystemExit, match=r"^compare.py: nothing to compare: found 1 lightning, 0 flax run\(s\)"):
        compare.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    with pytest.raises(SystemExit, match=r"^compare.py: --runs .*missing: no such folder"):
        compare.main(["--runs", str(tmp_path / "missing")])


def test_common_epochs_only_are_compared_when_runs_differ_in_length(tmp_path):
    runs = tmp_path / "runs"
    write_known_pair(runs)
    write_fake_run(runs, "flax", "longer", step_s=0.5, first_step_s=8.5, val_times=(1.5, 0.5, 0.5, 0.5))
    groups, _ = compare.group_runs(compare.find_runs(runs))
    assert groups[0].common_epochs() == 3
    longer = groups[0].variants[compare.FLAX][1]
    assert compare.run_stats(longer, 3).train_s == pytest.approx(14.0)


def test_figures_are_written_and_non_empty(tmp_path):
    runs = tmp_path / "runs"
    write_known_pair(runs)
    write_fake_run(runs, "lightning", "compiled", step_s=0.25, first_step_s=30.0, compile=True)
    report = compare.compare(runs, tmp_path / "report").read_text()
    figures = sorted((tmp_path / "report").glob("*.png"))
    names = {path.name.split("_", 1)[1] for path in figures}
    assert names == {"five_epoch_speed.png", "epoch_speed.png", "throughput.png", "curves.png", "time_breakdown.png"}
    for path in figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert f"]({path.name})" in report


def test_events_are_read_whole_without_tensorflow(tmp_path):
    run_dir = tmp_path / "events"
    run_dir.mkdir()
    points = 12_000  # more than TensorBoard's default reservoir of 10,000 scalars per tag
    writer = SummaryWriter(logdir=str(run_dir))
    for step in range(1, points + 1):
        writer.add_scalar("time/step_s", step / 1000, step)
    writer.close()
    probe = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # any `import tensorflow` now fails
        from pathlib import Path
        from scripts import compare
        scalars = compare.read_scalars(Path({str(run_dir)!r}))["time/step_s"]
        assert [s for s, _ in scalars] == list(range(1, {points} + 1)), len(scalars)
        assert abs(scalars[-1][1] - {points / 1000}) < 1e-3
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_scalars_stored_as_tensors_by_tf2_style_writers_are_read(tmp_path):
    value = tb_summary.Summary.Value(tag="time/step_s", metadata=scalar_metadata.create_summary_metadata("", ""),
                                     tensor=tensor_util.make_tensor_proto(np.float32(0.25)))
    writer = SummaryWriter(logdir=str(tmp_path))
    writer.file_writer.add_summary(
        tbx_summary.Summary.FromString(tb_summary.Summary(value=[value]).SerializeToString()), 3)
    writer.close()
    assert compare.read_scalars(tmp_path) == {"time/step_s": [(3, 0.25)]}


@pytest.mark.parametrize("model, published_gmacs", [
    ("swinv2_tiny_window8_256", 5.96), ("swinv2_small_window8_256", 11.58),
    ("swinv2_base_window8_256", 20.35), ("swinv2_tiny_window16_256", 6.68),
])
def test_forward_flops_match_published_gmacs(model, published_gmacs):
    # Published multiply-add counts of the official Swin V2 zoo (1000 classes), as listed by timm.
    assert forward_flops(model) / 2e9 == pytest.approx(published_gmacs, rel=0.01)


def test_gpu_peaks_match_the_most_specific_device_name():
    assert compare.device_peak_flops("cuda: NVIDIA H100 80GB HBM3", "bf16")[0] == pytest.approx(989.4e12)
    assert compare.device_peak_flops("cuda: NVIDIA H100 PCIe", "bf16")[0] == pytest.approx(756e12)
    assert compare.device_peak_flops("cuda: NVIDIA A100-SXM4-80GB", "fp32")[0] == pytest.approx(19.5e12)
    assert compare.device_peak_flops("cuda: NVIDIA A10", "fp32")[0] == pytest.approx(31.2e12)
    assert compare.device_peak_flops("cuda: Tesla V100-SXM2-16GB", "bf16") is None
    assert compare.device_peak_flops("tpu: TPU v5 lite", "bf16") is None


def test_mfu_counts_three_forward_passes_per_training_image(tmp_path):
    run_dir = write_fake_run(tmp_path / "runs", "flax", model="swinv2_tiny_window8_256", img_size=256,
                             precision="bf16", device="cuda: NVIDIA H100 80GB HBM3", num_classes=10)
    mfu, source = compare.model_flops_utilisation(compare.read_run(run_dir), images_per_s=1000.0)
    expected = 3 * forward_flops("swinv2_tiny_window8_256", num_classes=10) * 1000.0 / 989.4e12
    assert mfu == pytest.approx(expected) and "bf16" in source


def test_cpu_peak_is_measured_here_only_for_runs_on_this_cpu(monkeypatch):
    assert 1e8 < compare.measure_cpu_matmul_peak(seconds=0.3, size=256) < 1e14
    monkeypatch.setattr(compare, "measure_cpu_matmul_peak", lambda: 7e10)
    assert compare.device_peak_flops(cpu_description(), "fp32")[0] == 7e10
    assert compare.device_peak_flops("cpu: Another CPU x64 cores", "fp32") is None
    assert compare.device_peak_flops("cpu: Another CPU x64 cores", "fp32", cpu_peak=5e10)[0] == 5e10
