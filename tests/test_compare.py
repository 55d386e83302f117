"""Tests of report/compare.py and the modules it builds on, on event files written here with known timings."""

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

from report import compare, peaks
from report.flops import forward_flops
from report.runs import EAGER, FLAX, NotComparableError, Run, TraceProblem, find_runs, group_runs, read_run, read_trace
from report.stats import RunStats, model_flops_utilisation, run_stats, shares, speedup, step_coverage, time_breakdown
from shared_data import tags
from shared_data.environment import cpu_description

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU = "cpu: Test CPU (AVX2) x2 cores"


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
    loss_offset: float = 0.0,
    host_peak_mb: float | None = None,
    **config: Any,
) -> Path:
    """A run folder as the training scripts write it, whose every timing follows from the arguments.

    Each step takes `step_s` (of which `data_wait_s` waiting for data) except step 1, which takes
    `first_step_s`; an epoch's training time is the sum of its steps. The training loss is 2 / step + `loss_offset`.
    """
    epochs = len(val_times)
    run_dir = logdir / stack / run_name
    run_dir.mkdir(parents=True)
    resolved = {
        "stack": stack, "dataset": "synthetic", "model": "swinv2_nano_window4_64", "img_size": 64,
        "batch_size": 8, "precision": "fp32", "augment": "basic", "epochs": epochs, "seed": 0, "compile": False, "device": CPU,
        "versions": {"numpy": "test"}, "num_params": 1000, "run_name": run_name, "steps_per_epoch": steps_per_epoch,
        **config,
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
            writer.add_scalar("train/loss", 2.0 / step + loss_offset, step)
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
            ("epoch/steps_timed", steps_per_epoch),
            ("val/loss", 1.0 / epoch), ("val/accuracy", accuracy * epoch / epochs),
        ):
            writer.add_scalar(tag, value, epoch)
        if host_peak_mb is not None:
            writer.add_scalar("memory/host_peak_mb", host_peak_mb, epoch)
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": run_wall, "final_val_accuracy": accuracy}))
    return run_dir


def write_known_pair(logdir: Path, **config: Any) -> None:
    """Lightning: train epochs 8, 4, 4 s, val 3, 2, 2 s. Flax: train 10, 2, 2 s, val 1.5, 0.5, 0.5 s."""
    write_fake_run(logdir, "lightning", step_s=1.0, first_step_s=5.0, val_times=(3.0, 2.0, 2.0), **config)
    write_fake_run(logdir, "flax", step_s=0.5, first_step_s=8.5, val_times=(1.5, 0.5, 0.5), **config)


def _stats(logdir: Path) -> dict[str, list[RunStats]]:
    """Each run's figures over the epochs its group can time, as the report computes them."""
    groups, _ = group_runs(find_runs(logdir))
    epochs, left_out = groups[0].common_epochs(), set(groups[0].unmeasured_epochs())
    return {variant: [run_stats(run, epochs, left_out) for run in runs]
            for variant, runs in groups[0].variants.items()}


def test_speedups_match_known_timings_including_and_excluding_first_epoch(tmp_path):
    write_known_pair(tmp_path / "runs")
    stats = _stats(tmp_path / "runs")
    lightning, flax = stats[EAGER][0], stats[FLAX][0]
    assert (lightning.train_s, lightning.train_excl_first_s) == pytest.approx((16.0, 8.0))
    assert (flax.train_s, flax.train_excl_first_s) == pytest.approx((14.0, 4.0))

    including = speedup([flax.train_s], [lightning.train_s], FLAX, EAGER)
    excluding = speedup([flax.train_excl_first_s], [lightning.train_excl_first_s], FLAX, EAGER)
    assert including.faster == excluding.faster == FLAX
    assert including.ratios == pytest.approx([16 / 14])
    assert excluding.ratios == pytest.approx([2.0])
    validation = speedup([lightning.val_s], [flax.val_s], EAGER, FLAX)
    assert validation.faster == FLAX and validation.ratios == pytest.approx([2.8])

    report = compare.compare(tmp_path / "runs", tmp_path / "report", figures=False).read_text()
    assert "| Training: Flax vs Lightning eager | Flax is 1.14x faster than Lightning eager (1 repeat) | " \
           "Flax is 2.00x faster than Lightning eager (1 repeat) |" in report
    assert "| Validation: Flax vs Lightning eager | Flax is 2.80x faster than Lightning eager (1 repeat) | " \
           "Flax is 4.00x faster than Lightning eager (1 repeat) |" in report


def test_small_speedups_read_as_percents_and_large_ones_as_ratios():
    def sentence(faster_s: list[float], slower_s: list[float]) -> str:
        return speedup(faster_s, slower_s, "A", "B").sentence()

    assert sentence([100.0], [104.0]) == "A is 4% faster than B (1 repeat)"
    assert sentence([100.0], [131.0]) == "A is 1.31x faster than B (1 repeat)"
    assert sentence([100.0], [2508.0]) == "A is 25.08x faster than B (1 repeat)"
    assert sentence([100.0], [100.2]) == "A and B take the same time (within 0.5%, 1 repeat(s))"
    # The spread is in the median's unit; a repeat that the other side won reads below 0% or below 1x.
    assert sentence([100.0, 100.0, 100.0], [97.0, 105.0, 108.0]) == "A is 5% faster than B (min -3%, max 8%; 3 repeats)"
    assert sentence([1.0, 1.0, 1.0], [0.9, 2.0, 3.0]) == "A is 2.00x faster than B (min 0.90x, max 3.00x; 3 repeats)"


def test_warmup_cost_is_first_step_minus_median_step(tmp_path):
    write_known_pair(tmp_path / "runs")
    stats = _stats(tmp_path / "runs")
    assert stats[EAGER][0].warmup_s == pytest.approx(4.0)
    assert stats[FLAX][0].warmup_s == pytest.approx(8.0)
    assert stats[EAGER][0].median_step_s == pytest.approx(1.0)


def test_repeats_give_min_median_max_of_per_repeat_speedups(tmp_path):
    runs = tmp_path / "runs"
    for repeat, lightning_step in enumerate((1.0, 1.5, 2.0)):
        # Flax's epochs 2-3 take 4 s, Lightning's 8, 12 and 16 s: 2x, 3x, 4x faster excluding epoch 1.
        write_fake_run(runs, "lightning", f"r{repeat}", step_s=lightning_step, seed=repeat)
        write_fake_run(runs, "flax", f"r{repeat}", step_s=0.5, seed=repeat)
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert "Flax is 3.00x faster than Lightning eager (min 2.00x, max 4.00x; 3 repeats)" in report


def test_lightning_compiled_runs_are_compared_as_their_own_variant(tmp_path):
    runs = tmp_path / "runs"
    write_known_pair(runs)
    write_fake_run(runs, "lightning", "compiled", step_s=0.25, first_step_s=30.0, compile=True)
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert "Training: Flax vs Lightning compiled" in report
    assert "Lightning compiled is 2.00x faster than Flax" in report  # excluding epoch 1: 2 s vs 4 s
    assert "Training: Lightning compiled vs Lightning eager" in report


def test_time_breakdown_seconds_and_shares_add_up_to_the_run(tmp_path):
    run_dir = write_fake_run(tmp_path / "runs", "lightning")
    parts = time_breakdown(read_run(run_dir))
    # 12 steps: 11 x 1 s + one 5 s first step, 0.25 s of each waiting for data; compile = 5 - 1 s.
    assert parts == pytest.approx({
        "data wait": 3.0, "compute": 9.0, "evaluation": 7.0, "checkpoint": 1.5, "compilation": 4.0,
        "logging/other": 0.6, "startup/teardown": 1.0,
    }, abs=1e-4)
    fractions = shares(parts)
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
    every_point = read_run(run_dir)
    sparse = Run(run_dir, every_point.config, every_point.summary, {
        tag: [(step, value) for step, value in points if not tag.startswith("time/") or step % 2 == 1]
        for tag, points in every_point.scalars.items()})
    assert step_coverage(sparse) == pytest.approx(4 / 7)  # steps 1, 3, 5, 7 of 1..7
    # Kept: the 5 s first step and three 1 s steps, 0.25 s of data wait each, standing for 7 steps.
    assert time_breakdown(sparse)["data wait"] == pytest.approx(4 * 0.25 * 7 / 4)
    assert time_breakdown(every_point)["data wait"] == pytest.approx(8 * 0.25)


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
    with pytest.raises(NotComparableError, match=r"precision \(bf16 vs fp32\), device \(cuda: NVIDIA H100"):
        group_runs(find_runs(runs))


def test_one_gpu_counted_or_not_is_the_same_device(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", device="cuda: NVIDIA H100 80GB HBM3 x1")
    write_fake_run(runs, "flax", device="cuda: NVIDIA H100 80GB HBM3")
    write_fake_run(runs, "flax", "two-gpus", device="cuda: NVIDIA H100 80GB HBM3 x2")
    groups, unpaired = group_runs(find_runs(runs))
    assert len(groups) == 1 and [run.path.name for run in unpaired] == ["two-gpus"]


def test_force_compares_mismatched_runs_and_marks_the_report(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", batch_size=8)
    write_fake_run(runs, "flax", batch_size=16)
    assert compare.main(["--runs", str(runs), "--out", str(tmp_path / "report"), "--force", "--no-figures"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "FORCED: not comparable: batch_size (8 vs 16)" in report


def test_runs_from_cpus_of_different_vector_isas_are_refused_or_marked_when_forced(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", device="cpu: Test CPU (AVX2) x2 cores")
    write_fake_run(runs, "flax", device="cpu: Test CPU (AVX-512) x2 cores")
    with pytest.raises(NotComparableError, match=r"device \(cpu: Test CPU \(AVX2\)"):
        group_runs(find_runs(runs))
    report = compare.compare(runs, tmp_path / "report", force=True, figures=False).read_text()
    assert f"**{compare.MIXED_ISAS}: these runs come from CPUs of different vector instruction sets (AVX-512: " \
           "`flax/r0`; AVX2: `lightning/r0`)" in report


def test_runs_on_one_cpu_carry_no_isa_mark(tmp_path):
    write_known_pair(tmp_path / "runs")
    assert compare.MIXED_ISAS not in compare.compare(tmp_path / "runs", tmp_path / "report", figures=False).read_text()


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
    groups, _ = group_runs(find_runs(runs))
    assert groups[0].common_epochs() == 3
    longer = groups[0].variants[FLAX][1]
    assert run_stats(longer, 3).train_s == pytest.approx(14.0)


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
        import report.compare  # the whole report stack imports without TensorFlow too
        from report.runs import read_trace
        scalars = read_trace(Path({str(run_dir)!r}))[0]["time/step_s"]
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
    assert read_trace(tmp_path)[0] == {"time/step_s": [(3, 0.25)]}


@pytest.mark.parametrize("model, published_gmacs", [
    ("swinv2_tiny_window8_256", 5.96), ("swinv2_small_window8_256", 11.58),
    ("swinv2_base_window8_256", 20.35), ("swinv2_tiny_window16_256", 6.68),
])
def test_forward_flops_match_published_gmacs(model, published_gmacs):
    # Published multiply-add counts of the official Swin V2 zoo (1000 classes), as listed by timm.
    assert forward_flops(model) / 2e9 == pytest.approx(published_gmacs, rel=0.01)


def test_gpu_peaks_match_the_most_specific_device_name():
    assert peaks.device_peak_flops("cuda: NVIDIA H100 80GB HBM3", "bf16")[0] == pytest.approx(989.4e12)
    assert peaks.device_peak_flops("cuda: NVIDIA H100 PCIe", "bf16")[0] == pytest.approx(756e12)
    assert peaks.device_peak_flops("cuda: NVIDIA A100-SXM4-80GB", "fp32")[0] == pytest.approx(19.5e12)
    assert peaks.device_peak_flops("cuda: NVIDIA A10", "fp32")[0] == pytest.approx(31.2e12)
    assert peaks.device_peak_flops("cuda: Tesla V100-SXM2-16GB", "bf16") is None
    assert peaks.device_peak_flops("tpu: TPU v5 lite", "bf16") is None


def test_mfu_counts_three_forward_passes_per_training_image(tmp_path):
    run_dir = write_fake_run(tmp_path / "runs", "flax", model="swinv2_tiny_window8_256", img_size=256,
                             precision="bf16", device="cuda: NVIDIA H100 80GB HBM3", num_classes=10)
    mfu, source = model_flops_utilisation(read_run(run_dir), images_per_s=1000.0)
    expected = 3 * forward_flops("swinv2_tiny_window8_256", num_classes=10) * 1000.0 / 989.4e12
    assert mfu == pytest.approx(expected) and "bf16" in source


def test_cpu_peak_is_measured_here_only_for_runs_on_this_cpu(monkeypatch):
    assert 1e8 < peaks.measure_cpu_matmul_peak("torch", sizes=(128, 256), seconds=0.1) < 1e14
    monkeypatch.setattr(peaks, "measure_cpu_matmul_peak", lambda framework: 7e10)
    assert peaks.device_peak_flops(cpu_description(), "fp32")[0] == 7e10
    assert peaks.device_peak_flops("cpu: Another CPU x64 cores", "fp32") is None
    assert peaks.device_peak_flops("cpu: Another CPU x64 cores", "fp32", cpu_peak=5e10)[0] == 5e10


# ---------------------------------------------------------------- resumed runs, trace problems


def write_resumed_lightning_run(logdir: Path, step_s: float = 1.0, batch_size: int = 8) -> Path:
    """A Lightning run of 4 epochs of 4 steps, killed in epoch 3 and resumed, as a buggy writer leaves it.

    The first process trains epochs 1-2 and steps 9-10, then dies. The resumed process restarts at step 10 (its
    checkpoint was at step 9), logs epoch 2 again with no training time, trains steps 10-12 (so epoch 3's time
    covers 3 of its 4 steps) and the whole of epoch 4. Every step takes `step_s`.
    """
    run_dir = logdir / "lightning" / "r0"
    run_dir.mkdir(parents=True)
    config = {"stack": "lightning", "dataset": "synthetic", "model": "swinv2_nano_window4_64", "img_size": 64,
              "batch_size": batch_size, "precision": "fp32", "augment": "basic", "epochs": 4, "max_steps": None, "seed": 0,
              "compile": False, "device": CPU, "steps_per_epoch": 4, "run_name": "r0"}
    (run_dir / "config.json").write_text(json.dumps(config))

    def steps(writer: SummaryWriter, first: int, last: int) -> None:
        for step in range(first, last + 1):
            for tag, value in (("time/step_s", step_s), ("time/data_wait_s", 0.25), ("time/compute_s", step_s - 0.25),
                               ("train/loss", 2.0 / step)):
                writer.add_scalar(tag, value, step)

    def epoch(writer: SummaryWriter, number: int, steps_timed: int) -> None:
        train_time = steps_timed * step_s
        for tag, value in (("epoch/train_time_s", train_time), ("epoch/val_time_s", 1.0 if steps_timed else 0.0),
                           ("epoch/train_images_per_s", steps_timed * batch_size / train_time if steps_timed else 0.0),
                           ("epoch/steps_timed", steps_timed), ("epoch/wall_time_s", train_time + 1.0),
                           ("val/accuracy", 0.1 * number)):
            writer.add_scalar(tag, value, number)

    first = SummaryWriter(logdir=str(run_dir))
    steps(first, 1, 4), epoch(first, 1, 4), steps(first, 5, 8), epoch(first, 2, 4), steps(first, 9, 10)
    first.close()
    resumed = SummaryWriter(logdir=str(run_dir), filename_suffix=".resumed")
    epoch(resumed, 2, 0), steps(resumed, 10, 12), epoch(resumed, 3, 3), steps(resumed, 13, 16), epoch(resumed, 4, 4)
    resumed.close()
    return run_dir


def test_resumed_run_leaves_partial_and_phantom_epochs_out_and_names_them(tmp_path):
    runs = tmp_path / "runs"
    write_resumed_lightning_run(runs, step_s=1.0)
    write_fake_run(runs, "flax", step_s=0.5, first_step_s=0.5, val_times=(1.0, 1.0, 1.0, 1.0))
    lightning = read_run(runs / "lightning" / "r0")

    unmeasured = lightning.unmeasured_epochs()
    assert sorted(unmeasured) == [2, 3]
    assert unmeasured[2].startswith("no training time")
    assert unmeasured[3].startswith("partial: 3 of its 4 steps timed")
    problems = {problem.tag: problem for problem in lightning.trace_problems}
    assert problems["epoch/train_time_s"].duplicated == (2,) and problems["train/loss"].duplicated == (10,)

    report = compare.compare(runs, tmp_path / "report").read_text()
    assert "Totals over the first 4 epoch(s) that every run finished, less epoch(s) 2, 3;" in report
    assert "`lightning/r0` epoch 3 (partial: 3 of its 4 steps timed (split by a resume))" in report
    assert "`lightning/r0` epoch 2 (no training time" in report
    assert "## Trace problems" in report
    problems_line = next(line for line in report.splitlines() if line.startswith("- `lightning/r0`: "))
    assert "step(s) 2 written more than once (the last value kept) in `epoch/train_time_s`" in problems_line
    assert "step(s) 10 written more than once (the last value kept) in `time/step_s`" in problems_line
    # No zero epoch anywhere in the figures: both stacks are timed over epochs 1 and 4 only (4 steps each).
    stats = _stats(runs)
    assert stats[EAGER][0].train_s == pytest.approx(8.0)
    assert stats[FLAX][0].train_s == pytest.approx(4.0)
    assert stats[EAGER][0].train_images_per_s == pytest.approx(8.0)
    assert "| Training: Flax vs Lightning eager | Flax is 2.00x faster than Lightning eager (1 repeat) | " \
           "Flax is 2.00x faster than Lightning eager (1 repeat) |" in report
    # train s, excl. 1st, val s, excl. 1st, median step ms, compile s, train img/s
    assert "| Lightning eager | 1 | 8.00 | 4.00 | 2.00 | 1.00 | 1000.0 | 0.00 | 8.0 |" in report


def test_backwards_steps_are_reported_and_the_last_value_kept(tmp_path):
    writer = SummaryWriter(logdir=str(tmp_path))
    for step, value in ((1, 1.0), (2, 2.0), (5, 5.0), (3, 3.0), (2, 20.0)):
        writer.add_scalar("train/loss", value, step)
    writer.close()
    scalars, problems = read_trace(tmp_path)
    assert scalars["train/loss"] == [(1, 1.0), (2, 20.0), (3, 3.0), (5, 5.0)]
    assert problems == [TraceProblem("train/loss", duplicated=(2,), backwards=(3,))]


def test_last_epoch_cut_by_max_steps_is_whole_not_partial(tmp_path):
    config = {"stack": "flax", "epochs": 3, "max_steps": 10, "steps_per_epoch": 4}
    scalars = {"epoch/train_time_s": [(1, 4.0), (2, 4.0), (3, 2.0)], "epoch/steps_timed": [(1, 4), (2, 4), (3, 2)]}
    run = Run(tmp_path, config, {}, scalars)
    assert [run.epoch_steps(epoch) for epoch in (1, 2, 3)] == [4, 4, 2]
    assert run.unmeasured_epochs() == {}
    partial = Run(tmp_path, config, {}, {**scalars, "epoch/steps_timed": [(1, 4), (2, 3), (3, 2)]})
    assert list(partial.unmeasured_epochs()) == [2]


# ---------------------------------------------------------------- MFU


def test_no_report_shows_an_mfu_above_100_percent(tmp_path):
    runs = tmp_path / "runs"
    write_known_pair(runs)  # steady training: Flax 16 img/s, Lightning eager 8 img/s
    flops = 3 * forward_flops("swinv2_nano_window4_64", img_size=64, num_classes=10)
    peak = flops * 12  # Flax's 16 img/s would be 133% of it, Lightning's 8 img/s 67%
    report = compare.compare(runs, tmp_path / "report", peak_tflops=peak / 1e12, figures=False).read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in report.splitlines()
            if line.startswith(("| Flax | 1 | ", "| Lightning eager | 1 | "))}  # the per-stack table
    assert rows["Flax"][9] == "peak underestimated"
    assert rows["Lightning eager"][9] == "66.67%"
    for cells in rows.values():
        if cells[9].endswith("%"):
            assert float(cells[9].rstrip("%")) <= 100
    assert "Peak underestimated for Flax" in report and f"--peak-tflops {peak / 1e12:g}" in report


def test_cpu_peak_is_each_frameworks_own_matmul_rate(monkeypatch):
    for framework in ("torch", "jax"):
        assert 1e8 < peaks.measure_cpu_matmul_peak(framework, sizes=(64, 128), seconds=0.05) < 1e14
    monkeypatch.setattr(peaks, "measure_cpu_matmul_peak", {"torch": 6e10, "jax": 9e10}.get)
    torch_peak, torch_source = peaks.device_peak_flops(cpu_description(), "fp32", framework="torch")
    jax_peak, jax_source = peaks.device_peak_flops(cpu_description(), "fp32", framework="jax")
    assert (torch_peak, jax_peak) == (6e10, 9e10)
    assert torch_source.startswith("torch float32 matmul peak measured on this CPU: 60.0 GFLOP/s")
    assert jax_source.startswith("jax float32 matmul peak measured on this CPU: 90.0 GFLOP/s")


def test_lightning_and_flax_rows_divide_by_their_own_frameworks_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(peaks, "measure_cpu_matmul_peak", {"torch": 6e10, "jax": 9e10}.get)
    runs = tmp_path / "runs"
    write_known_pair(runs, device=cpu_description())
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert "Peak: Flax: jax float32 matmul peak measured on this CPU: 90.0 GFLOP/s" in report
    assert "; Lightning eager: torch float32 matmul peak measured on this CPU: 60.0 GFLOP/s" in report


def test_gpu_peak_keeps_the_datasheet_and_shows_the_measured_rate_beside_it(monkeypatch):
    _, unmeasured = peaks.device_peak_flops("cuda: NVIDIA A100-SXM4-80GB", "bf16")
    assert "datasheet dense bf16 312 TFLOP/s" in unmeasured and "not measured" in unmeasured
    monkeypatch.setattr(peaks, "measure_gpu_matmul_rate", lambda device, precision: (2.5e14, "torch"))
    peak, measured = peaks.device_peak_flops("cuda: NVIDIA A100-SXM4-80GB", "bf16")
    assert peak == pytest.approx(312e12) and "measured torch bf16 matmul on this GPU: 250.0 TFLOP/s" in measured


# ---------------------------------------------------------------- contention, compile caches


def _write_benchmark_record(logdir: Path, contended: dict[tuple[str, str], bool], caches: str = "cold") -> None:
    runs = [{"stack": stack, "run_name": name, "load_average_1m": [3.5 if busy else 0.4, 0.5], "waited_s": 0.0,
             "cores": 2, "contended": busy, "threads": {"torch_intra_op": 2, "xla_cpu": 2}}
            for (stack, name), busy in contended.items()]
    (logdir / "benchmark.json").write_text(json.dumps({"compile_caches": caches, "runs": runs}))


def test_run_started_under_contention_is_marked_in_every_table(tmp_path):
    runs = tmp_path / "runs"
    write_known_pair(runs)
    _write_benchmark_record(runs, {("lightning", "r0"): True, ("flax", "r0"): False})
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    lines = report.splitlines()
    assert "| Training: Flax vs Lightning eager † |" in report
    assert any(line.startswith("| Lightning eager † | 1 |") for line in lines)  # per stack
    assert any(line.startswith("| Lightning eager † | 3.00 s") for line in lines)  # where the time goes
    assert any(line.startswith("| lightning/r0 † | lightning |") for line in lines)  # runs
    assert any(line.startswith("| flax/r0 | flax |") for line in lines)
    assert not any(line.startswith("| Flax †") for line in lines)
    footnotes = [line for line in lines if line.startswith("† Started under contention")]
    assert len(footnotes) == 2 and all("above its 2 cores" in line and "`lightning/r0`" in line for line in footnotes)
    assert "| 3.5 / 0.5 | 2 / 2 |" in report


def test_quiet_runs_carry_no_mark(tmp_path):
    runs = tmp_path / "runs"
    write_known_pair(runs)
    _write_benchmark_record(runs, {("lightning", "r0"): False, ("flax", "r0"): False})
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert "†" not in report


@pytest.mark.parametrize("caches, said", [
    ("cold", "- compile caches: cold (fresh per run)"), ("warm", "- compile caches: warm"),
    (None, "- compile caches: not recorded"),
])
def test_report_states_whether_compile_caches_were_cold_or_warm(tmp_path, caches, said):
    runs = tmp_path / "runs"
    write_known_pair(runs)
    if caches:
        _write_benchmark_record(runs, {("lightning", "r0"): False, ("flax", "r0"): False}, caches)
    assert said in compare.compare(runs, tmp_path / "report", figures=False).read_text()


# ---------------------------------------------------------------- same training


def test_same_training_section_compares_losses_accuracies_and_draws_both_curves(tmp_path):
    runs = tmp_path / "runs"
    init = str(tmp_path / "init-weights.pth")
    write_fake_run(runs, "lightning", step_s=1.0, pretrained=init, drop_path=0.0, loss_offset=4e-4, accuracy=0.5)
    write_fake_run(runs, "flax", step_s=0.5, pretrained=init, drop_path=0.0, accuracy=0.6)
    report = compare.compare(runs, tmp_path / "report").read_text()
    section = report[report.index("### Same training"):]
    assert "`flax/r0` and `lightning/r0` started from the same weights" in section
    assert "Largest absolute difference of `train/loss` over the first 12 common steps (1-12): 0.0004." in section
    assert "Bound in fp32 1e-3 over the first 50 common steps" in section and ": holds." in section
    assert "| 3 | 0.6000 | 0.5000 | 0.1000 |" in section
    figure = tmp_path / "report" / f"{group_runs(find_runs(runs))[0][0].slug}_same_training.png"
    assert f"]({figure.name})" in section and figure.read_bytes()[:4] == b"\x89PNG"


def test_same_training_bound_is_judged_in_words_not_asserted(tmp_path):
    runs = tmp_path / "runs"
    init = str(tmp_path / "init-weights.pth")
    write_fake_run(runs, "lightning", pretrained=init, drop_path=0.0, loss_offset=0.01)
    write_fake_run(runs, "flax", pretrained=init, drop_path=0.0)
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert "Largest absolute difference of `train/loss` over the first 12 common steps (1-12): 0.01." in report
    assert ": does not hold." in report


@pytest.mark.parametrize("precision, verdict", [("fp32", "does not hold"), ("bf16", "holds")])
def test_same_training_bound_is_the_one_of_the_runs_precision(tmp_path, precision, verdict):
    runs = tmp_path / "runs"
    init = str(tmp_path / "init-weights.pth")
    write_fake_run(runs, "lightning", pretrained=init, drop_path=0.0, loss_offset=0.005, precision=precision)
    write_fake_run(runs, "flax", pretrained=init, drop_path=0.0, precision=precision)
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    bound = {"fp32": "1e-3", "bf16": "1e-2"}[precision]
    assert f"Bound in {precision} {bound} over the first 50 common steps" in report
    assert f": {verdict}." in report and "not applicable" not in report


def test_same_training_bound_does_not_apply_with_drop_path(tmp_path):
    runs = tmp_path / "runs"
    init = str(tmp_path / "init-weights.pth")
    write_fake_run(runs, "lightning", pretrained=init, drop_path=0.1)
    write_fake_run(runs, "flax", pretrained=init, drop_path=0.1)
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    assert ": not applicable (drop path 0.1; the bound is for runs without drop path)." in report


def test_no_same_training_section_without_a_common_initial_weights_file(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", pretrained=str(tmp_path / "a.pth"))
    write_fake_run(runs, "flax", pretrained=str(tmp_path / "b.pth"))
    write_known_pair(tmp_path / "random-init")
    for logdir in (runs, tmp_path / "random-init"):
        assert "Same training" not in compare.compare(logdir, tmp_path / "report", figures=False).read_text()


def test_runs_table_says_what_each_stacks_precision_computed(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "lightning", precision="bf16", arithmetic="bf16 as defined (torch autocast bf16-mixed)")
    write_fake_run(runs, "flax", precision="bf16", arithmetic="bf16 as defined (model dtype bfloat16)")
    report = compare.compare(runs, tmp_path / "report", figures=False).read_text()
    table = report[report.index("## Runs"):]
    assert "| arithmetic |" in table
    assert "| bf16 as defined (torch autocast bf16-mixed) |" in table
    assert "| bf16 as defined (model dtype bfloat16) |" in table
    assert f"Where the stacks' bf16 cannot be the same bit for bit: {tags.BF16_DIFFERENCES}." in table


def test_how_the_cost_grows_gives_each_stack_and_batch_size_its_rate_step_time_and_memory(tmp_path):
    runs = tmp_path / "runs"
    for batch, memory in ((8, 100.0), (16, 180.0)):
        write_fake_run(runs, "lightning", f"bs{batch}", step_s=1.0, batch_size=batch, host_peak_mb=memory + 50)
        write_fake_run(runs, "flax", f"bs{batch}", step_s=0.5, batch_size=batch, host_peak_mb=memory)
    report = compare.compare(runs, tmp_path / "report").read_text()
    section = report[report.index("## How the cost grows"):report.index("## Runs")]
    assert "| stack | image size | global batch | train img/s | median step ms | ms per image | peak host MiB |" in section
    # Steps of 0.5 s (Flax) and 1 s (Lightning) at every batch size: the time per image halves from 8 to 16.
    for row in ("| Flax | 64 | 8 |", "| 500.0 | 62.50 | 100 |", "| Flax | 64 | 16 |", "| 500.0 | 31.25 | 180 |",
                "| Lightning eager | 64 | 8 |", "| 1000.0 | 125.00 | 150 |", "| 1000.0 | 62.50 | 230 |"):
        assert row in section, row
    assert "![train images/s and peak host memory against batch size](cost_growth.png)" in section
    assert (tmp_path / "report" / "cost_growth.png").read_bytes()[:4] == b"\x89PNG"


def test_no_cost_growth_section_for_one_setting(tmp_path):
    write_known_pair(tmp_path / "runs")
    assert "How the cost grows" not in compare.compare(tmp_path / "runs", tmp_path / "report", figures=False).read_text()
