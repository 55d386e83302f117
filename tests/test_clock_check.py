"""bench.clock_check: each stack's clock against steps the host closed, judged over the same steps."""

from __future__ import annotations

import pytest

from bench import clock_check
from bench.clock_check import ClockCheck


def test_the_check_judges_the_clock_against_the_closed_steps_of_the_same_run():
    # The plain run was faster (closing costs 25%), which says nothing about the stamps: they agree within 2%.
    check = ClockCheck("flax", clock_median_s=0.080, reference_median_s=0.102, same_run_median_s=0.100,
                       completion="completion thread", steps=20)
    assert check.difference == pytest.approx(0.100 / 0.102 - 1) and check.passed
    assert check.closing_cost == pytest.approx(0.25)
    late = ClockCheck("lightning", 0.1, reference_median_s=0.1, same_run_median_s=0.106, completion="host return",
                      steps=20)
    assert not late.passed
    table = clock_check.format_checks([check, late], ["--preset", "smoke"], "load 0.1")
    assert "flax      completion thread       20      102.0                100.0       -2.0%" in table
    assert table.splitlines()[3].endswith("OVER 5%") and not table.splitlines()[2].endswith("OVER 5%")


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["flax", "lightning"])
def test_each_stacks_clock_agrees_with_host_closed_steps_on_this_cpu(stack, tmp_path, synthetic_data_dir):
    flags = ["--preset", "smoke", "--dataset", "synthetic", "--data-dir", str(synthetic_data_dir), "--max-steps", "12"]
    check = clock_check.check_stack(stack, flags, tmp_path)
    assert check.steps == 10 and check.completion == {"flax": "completion thread", "lightning": "host return"}[stack]
    assert check.passed, check
