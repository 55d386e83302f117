"""Per-operation profiles: how operations are told apart, each stack's --profile-steps, and compare.py's section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from bench import benchmark
from report import compare
from shared_data import op_profile
from shared_data.run_config import ConfigError, parse_profile_steps
from tests.stacks import STACKS, train

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_torch_ops_are_the_optimisers_only_outside_the_forward_and_backward_lightning_runs_inside_step():
    step = "Optimizer.step#AdamW.step"
    assert op_profile.torch_kind("aten::lerp_", [step]) == op_profile.OPTIMISER
    assert op_profile.torch_kind("aten::mm", ["aten::linear", op_profile.FORWARD_RANGE, step]) == op_profile.MATMUL
    assert op_profile.torch_kind("aten::mul", [op_profile.FORWARD_RANGE, step]) == op_profile.OTHER
    backward = "autograd::engine::evaluate_function: GeluBackward0"
    assert op_profile.torch_kind("aten::gelu_backward", [backward, step]) == op_profile.ACTIVATION
    assert op_profile.torch_kind("aten::copy_", []) == op_profile.LAYOUT
    assert op_profile.torch_kind("aten::_softmax", []) == op_profile.ATTENTION
    assert op_profile.torch_kind("aten::native_layer_norm_backward", []) == op_profile.NORM
    assert op_profile.torch_kind("aten::zero_", ["Optimizer.zero_grad#AdamW.zero_grad"]) == op_profile.OPTIMISER


def test_xla_ops_are_told_apart_by_what_they_compute_then_by_the_models_named_scopes():
    assert op_profile.xla_kind({"fusion", "dot", "add"}, "jit(f)/jvp(norm)/mul") == op_profile.MATMUL
    assert op_profile.xla_kind({"custom-call"}, "", ["__cublas$gemm"]) == op_profile.MATMUL
    assert op_profile.xla_kind({"fusion", "copy", "transpose", "bitcast"}, "jit(f)/jvp(attention)/x") == op_profile.LAYOUT
    assert op_profile.xla_kind({"fusion", "transpose", "add"}, "transpose(jvp(attention))/t") == op_profile.LAYOUT
    assert op_profile.xla_kind({"fusion", "exponential", "reduce"}, "jit(f)/jvp(attention)/exp") == op_profile.ATTENTION
    assert op_profile.xla_kind({"multiply"}, "jit(f)/transpose(jvp(norm))/mul") == op_profile.NORM
    assert op_profile.xla_kind({"erf", "multiply"}, "jit(f)/jvp(activation)/erf") == op_profile.ACTIVATION
    assert op_profile.xla_kind({"copy", "multiply"}, "jit(f)/optimizer/mul") == op_profile.OPTIMISER
    assert op_profile.xla_kind({"log"}, "jit(f)/jvp(jit(log_softmax))/log") == op_profile.OTHER


def test_compiled_hlo_of_a_scoped_function_parses_into_the_right_kinds():
    def loss(x, w):
        with jax.named_scope("attention"):
            y = jax.nn.softmax((x @ w).T)
        with jax.named_scope("activation"):
            y = jax.nn.relu(y) * 3.0
        return y.sum()

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((16, 32)), jnp.ones((32, 16))).compile().as_text()
    ops = op_profile.parse_hlo(compiled)
    kinds = {op_profile.xla_kind(op.opcodes, op.op_name, op.targets) for op in ops.values()}
    assert {op_profile.MATMUL, op_profile.ATTENTION} <= kinds
    dots = [op for op in ops.values() if "dot" in op.opcodes]
    assert dots and all(op.shape.startswith("f32[") for op in dots)


def test_profile_steps_flag_is_checked_the_same_for_both_stacks():
    assert parse_profile_steps("5,7") == (5, 7) and parse_profile_steps("4") == (4, 4)
    assert parse_profile_steps(None) is None
    for bad in ("0,3", "7,5", "a,b", "1,2,3"):
        with pytest.raises(ConfigError, match="--profile-steps"):
            parse_profile_steps(bad)
    for script in ("train_flax.py", "train_lightning.py"):
        result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / script), "--profile-steps", "9,3"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "--profile-steps" in result.stderr.strip().splitlines()[-1]


def test_benchmark_profile_traces_only_the_first_repeat_of_each_variant(tmp_path):
    args = benchmark.parse_args(["--profile", "--repeats", "2", "--logdir", str(tmp_path)])
    planned = benchmark.plan_runs(args, tmp_path)
    traced = [item.run_name for item in planned if "--profile-steps" in item.command]
    assert sorted(traced) == ["compile-r0", "eager-r0", "r0"]
    assert all(item.command[item.command.index("--profile-steps") + 1] == benchmark.DEFAULT_PROFILE_STEPS
               for item in planned if "--profile-steps" in item.command)


@pytest.fixture(scope="module")
def profiled_runs(tmp_path_factory, synthetic_data_dir, compilation_cache):
    """One short run of each stack with steps 2-3 profiled."""
    logdir = tmp_path_factory.mktemp("profiled")
    for stack in STACKS:
        train(stack, logdir, synthetic_data_dir, "--max-steps", "4", "--epochs", "1", "--profile-steps", "2,3")
    return logdir


@pytest.mark.parametrize("stack", STACKS)
def test_profiled_steps_give_each_kind_of_operation_its_time(profiled_runs, stack):
    profile = op_profile.read_ops(profiled_runs / stack / "run" / "profile")
    assert profile["stack"] == stack and (profile["first_step"], profile["last_step"]) == (2, 3)
    assert profile["clock"] == "cpu"
    kinds = op_profile.by_kind(profile["ops"])
    for kind in (op_profile.MATMUL, op_profile.ATTENTION, op_profile.NORM, op_profile.ACTIVATION,
                 op_profile.OPTIMISER):
        assert kinds[kind] > 0, kind
    # The matmuls outweigh every other kind of arithmetic in a transformer's step on either stack. Layout changes
    # and copies are left out: on this nano model (window 4, 64 px) eager torch's window partitions and
    # transposes can cost more than its tiny matmuls (CI measured 42 ms of copies against 38 ms of matmuls).
    arithmetic = (op_profile.ATTENTION, op_profile.NORM, op_profile.ACTIVATION, op_profile.OPTIMISER)
    assert all(kinds[op_profile.MATMUL] > kinds[kind] for kind in arithmetic), kinds
    trace = list((profiled_runs / stack / "run" / "profile").rglob("*.xplane.pb" if stack == "flax" else "*.pt.trace.json"))
    assert trace, "the stack's own trace file, for TensorBoard"


def test_report_shows_time_per_kind_of_operation_and_top_operations(profiled_runs, tmp_path):
    report = compare.compare(profiled_runs, tmp_path).read_text()
    section = report.split("### Inside the step (per-operation profiles)", 1)[1]
    for kind in op_profile.KINDS:
        assert f"| {kind} |" in section
    assert "Top operations of Flax by self time" in section
    assert "Top operations of Lightning eager by self time" in section
    assert "Against Lightning eager, Flax spends" in section
    assert "`aten::mm`" in section or "`aten::addmm`" in section
    assert list(tmp_path.glob("*_operations.png"))


def test_damaged_ops_file_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / op_profile.OPS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / op_profile.OPS_FILE)):
        op_profile.read_ops(tmp_path)


def test_lightning_ops_count_only_what_ran_inside_the_traced_steps():
    import torch

    from lightning_swin.profiling import torch_op_times

    a = torch.ones(64, 64)
    with torch.profiler.profile() as profile:
        torch.mm(a, a)  # outside every step: a validation, or the loading of the next batch
        with torch.profiler.record_function(op_profile.STEP_RANGE):
            torch.softmax(a, -1)
    ops, clock = torch_op_times(profile, 1)
    names = {op.name for op in ops}
    assert "aten::_softmax" in names and "aten::mm" not in names and clock == "cpu"
