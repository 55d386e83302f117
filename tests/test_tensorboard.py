"""A real TensorBoard over a run of each stack serves one layout, both stacks' HParams and profiles; the screenshot."""

from __future__ import annotations

import shutil
import statistics
import struct
import urllib.parse

import pytest

from report import screenshot, tensorboard_server
from report.tensorboard_server import get_json, wait_for
from shared_data import dashboards, tags
from tests import stacks

RUNS = {"lightning/run", "flax/run"}
PROFILE_STEPS = "2,3"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory, synthetic_data_dir, compilation_cache):
    """One epoch (6 steps) of each stack with a profile of steps 2-3; the Lightning run killed after step 3 and
    resumed, so that its event files hold two processes' dashboard records."""
    logdir = tmp_path_factory.mktemp("tensorboard")
    with stacks.torch_threads(1):
        stacks.train("flax", logdir, synthetic_data_dir, "--epochs", "1", "--profile-steps", PROFILE_STEPS)
        flags = ("--epochs", "1", "--profile-steps", PROFILE_STEPS, "--checkpoint-every-steps", "3")
        with pytest.raises(stacks.Interrupt):
            stacks.train("lightning", logdir, synthetic_data_dir, *flags,
                         extras=[stacks.interrupt_after("lightning", 3)])
        stacks.train("lightning", logdir, synthetic_data_dir, *flags, "--resume")
    return logdir


@pytest.fixture(scope="module")
def board(logdir):
    """The base URL of TensorBoard serving `logdir`, once it lists both runs."""
    with tensorboard_server.serve(logdir) as url:
        wait_for(url, "/data/runs", lambda runs: RUNS <= set(runs))
        yield url


def test_the_comparison_dashboards_and_both_profile_plugins_are_active(board):
    listing = get_json(board, "/data/plugins_listing")
    assert {name for name, plugin in listing.items() if plugin["enabled"]} >= {
        "scalars", "custom_scalars", "hparams", "profile", "pytorch_profiler"}


def test_one_custom_scalars_layout_overlays_both_stacks(board):
    served = get_json(board, "/data/plugin/custom_scalars/layout")
    expected = dashboards.layout()
    # Both runs and the resumed run's second process wrote the layout: TensorBoard merged them into one.
    assert [category["title"] for category in served["category"]] == [category.title for category in expected.category]
    for got, want in zip(served["category"], expected.category):
        assert [(chart["title"], chart["multiline"]["tag"]) for chart in got["chart"]] == [
            (chart.title, list(chart.multiline.tag)) for chart in want.chart]
    for tag in (tags.STEP_TIME, tags.DATA_WAIT_TIME, tags.TRAIN_LOSS):
        for run in RUNS:
            query = urllib.parse.urlencode({"run": run, "tag": f"^{tag}$"})
            answer = get_json(board, f"/data/plugin/custom_scalars/scalars?{query}")
            assert [step for _, step, _ in answer["tag_to_events"][tag]] == list(range(1, 7)), (run, tag)
    for tag in (tags.EPOCH_TRAIN_IMAGES_PER_S, tags.EPOCH_VAL_IMAGES_PER_S, tags.VAL_ACCURACY, tags.HOST_PEAK_MB):
        for run in RUNS:
            query = urllib.parse.urlencode({"run": run, "tag": f"^{tag}$"})
            assert [step for _, step, _ in get_json(board, f"/data/plugin/custom_scalars/scalars?{query}")[
                "tag_to_events"][tag]] == [1], (run, tag)


def test_hparams_compare_the_runs_of_both_stacks_with_the_same_keys_and_outcome(board, logdir):
    experiment = get_json(board, "/data/plugin/hparams/experiment", {"experimentName": ""})
    keys = {param.name for param in dashboards.HPARAMS}
    assert {info["name"] for info in experiment["hparamInfos"]} == keys
    assert [info["name"]["tag"] for info in experiment["metricInfos"]] == list(tags.RUN_OUTCOME)
    request = {"experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
               "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]}
    groups = {group["name"]: group for group in
              get_json(board, "/data/plugin/hparams/session_groups", request)["sessionGroups"]}
    assert set(groups) == RUNS  # one session for the resumed run, not one per process
    for run, group in groups.items():
        stack = run.split("/")[0]
        assert set(group["hparams"]) == keys and len(group["sessions"]) == 1
        assert group["hparams"]["stack"] == stack and group["hparams"]["compile"] is False
        assert (group["hparams"]["batch_size"], group["hparams"]["img_size"]) == (32, 64)
        assert group["hparams"]["dataset"] == "synthetic" and group["hparams"]["device"].startswith("cpu: ")
        outcome = {value["name"]["tag"]: value["value"] for value in group["metricValues"]}
        summary = stacks.summary(logdir / run)
        assert outcome[tags.RUN_BEST_VAL_ACCURACY] == pytest.approx(summary["best_val_accuracy"])
        if stack == "lightning":  # its one epoch was split by the resume: no speed figure, as in summary.json
            assert tags.RUN_TRAIN_IMAGES_PER_S not in outcome and summary["images_per_s"]["train"] is None
        else:
            assert outcome[tags.RUN_TRAIN_IMAGES_PER_S] == pytest.approx(summary["images_per_s"]["train"], rel=1e-6)
        # Every step but the first, the resumed run's steps before its restart included.
        step_s = [value for step, value in stacks.scalars(logdir / run)[tags.STEP_TIME] if step > 1]
        assert len(step_s) == 5
        assert outcome[tags.RUN_MEDIAN_STEP_TIME] == pytest.approx(statistics.median(step_s), rel=1e-6)


def test_the_flax_profile_opens_in_the_profile_tab(board):
    runs = get_json(board, "/data/plugin/profile/runs")
    (run,) = [run for run in runs if run.startswith("flax/run/profile/")]
    assert any(tool.startswith("trace_viewer") for tool in get_json(board, f"/data/plugin/profile/run_tools?run={run}"))
    (host,) = get_json(board, f"/data/plugin/profile/hosts?run={run}&tag=trace_viewer")
    trace = get_json(board, "/data/plugin/profile/data?" + urllib.parse.urlencode(
        {"run": run, "tag": "trace_viewer", "host": host["hostname"]}), timeout_s=60)
    assert any(event.get("ph") == "X" for event in trace["traceEvents"])


def test_the_torch_profile_opens_in_the_pytorch_profiler_tab(board):
    run = "lightning/run/profile"
    wait_for(board, "/data/plugin/pytorch_profiler/runs",
             lambda answer: run in answer["runs"] and not answer["loading"])
    assert "Trace" in get_json(board, f"/data/plugin/pytorch_profiler/views?run={run}")
    (worker,) = get_json(board, f"/data/plugin/pytorch_profiler/workers?run={run}&view=Trace")
    (span,) = get_json(board, f"/data/plugin/pytorch_profiler/spans?run={run}&worker={worker}")
    trace = get_json(board, "/data/plugin/pytorch_profiler/trace?" + urllib.parse.urlencode(
        {"run": run, "worker": worker, "span": span}), timeout_s=60)
    assert any(event.get("ph") == "X" and event.get("name", "").startswith("aten::") for event in trace["traceEvents"])


def test_screenshot_without_chromium_exits_2_saying_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on it
    assert screenshot.main(["--logdir", str(tmp_path), "--out", str(tmp_path / "shot.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "apt-get install -y chromium" in lines[0]
    assert not (tmp_path / "shot.png").exists()


@pytest.mark.skipif(not any(shutil.which(name) for name in screenshot.CHROMIUM_NAMES),
                    reason="no Chromium on PATH (apt-get install -y chromium); CI installs requirements.txt only")
def test_screenshot_shows_the_custom_scalars_comparison_in_headless_chromium(logdir, tmp_path):
    from PIL import Image

    out = tmp_path / "comparison.png"
    assert screenshot.main(["--logdir", str(logdir), "--out", str(out), "--window-size", "1200,900"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", out.read_bytes()[16:24]) == (1200, 900)
    with Image.open(out) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 200  # charts drawn, not a blank or error page
