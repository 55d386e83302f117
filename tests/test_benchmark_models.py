"""bench/models.py: it runs as a script, times every implementation in one process, prints the ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import models
from bench.models import OURS_FLAX, OURS_TORCH, TIMM, Timing
from shared_data.environment import cpu_description

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_ratios_are_reference_seconds_over_candidate_seconds():
    timings = [Timing(OURS_TORCH, "train step", [2.0, 2.0], 8), Timing(OURS_FLAX, "train step", [1.6, 1.6], 8),
               Timing(TIMM, "train step", [2.2, 2.2], 8)]
    lines = models.speed_ratios(timings)
    assert f"  train step  {OURS_FLAX} against {OURS_TORCH}: 1.25x (faster)" in lines
    assert f"  train step  {OURS_TORCH} against {TIMM}: 1.10x (faster)" in lines
    assert f"  train step  {OURS_FLAX} against {TIMM}: 1.38x (faster)" in lines


def test_timm_is_compared_for_the_variants_it_has():
    assert models.timm_has("swinv2_tiny_window8_256")
    assert not models.timm_has("swinv2_nano_window4_64")


@pytest.mark.slow  # 22 s; the harness's parts are tested by default above
def test_script_times_flax_and_pytorch_in_one_process_and_prints_their_ratio():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark_models.py"), "--model", "swinv2_nano_window4_64",
         "--batch-size", "2", "--steps", "1", "--warmup", "0", "--num-classes", "10"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "load average" in result.stdout
    assert f"host {cpu_description()} " in result.stdout  # the CPU and its widest vector ISA, beside every figure
    assert f"train step  {OURS_FLAX} against {OURS_TORCH}:" in result.stdout
    assert f"forward     {OURS_FLAX} against {OURS_TORCH}:" in result.stdout
