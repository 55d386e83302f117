"""The two stacks mirror each other: the same config shape and entry point, the same module for the same job, the
same errors and exit codes, one channel for warnings, no test-only switches in production code, one retention rule."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from shared_data import retention, run_config, tags

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("shared_data", "lightning_swin", "flax_swin", "scripts", "bench", "report", "tools")
# The same job in the module of the same name in both stacks, with the same public names.
MIRRORED = {
    "devices": {"device_description", "device_peak_mb", "set_arithmetic", "arithmetic"},
    "distributed": set(),  # joining processes (Flax) / the launcher's processes and rank 0 (Lightning)
    "profiling": {"StepProfiler"},
    "checkpointing": {"STACK", "checkpoint_dir", "list_checkpoints", "leftovers", "clean_leftovers",
                      "verify_checkpoint"},
    "train": {"train_and_evaluate"},
    "model": {"SwinTransformerV2", "WindowAttention", "create_model"},
    "weights": {"load_pretrained"},
}
SCRIPTS = {"lightning": REPO / "scripts" / "train_lightning.py", "flax": REPO / "scripts" / "train_flax.py"}
# The one environment variable production code sets and reads itself: rank 0's run name, handed to the
# processes Lightning's DDP launcher starts.
OWN_ENVIRONMENT = {"SWIN_LIGHTNING_RUN_NAME"}


def test_production_code_reads_no_test_only_environment_variables():
    found = {}
    for folder in PRODUCTION:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("SWIN_"):
                    found.setdefault(node.value, []).append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in found.items() if name not in OWN_ENVIRONMENT} == {}


def test_both_stacks_have_the_same_config_module_and_entry_point():
    from flax_swin import train as flax_train
    from flax_swin.configs import default as flax_default
    from lightning_swin import train as lightning_train
    from lightning_swin.configs import default as lightning_default

    for module, stack in ((flax_default, "flax"), (lightning_default, "lightning")):
        assert module.STACK == stack
        assert {"add_stack_flags", "get_config", "resolve", "STACK_DEFAULTS"} <= set(vars(module))
        assert dict(module.get_config("smoke"))["model"] == run_config.PRESETS["smoke"]["model"]
    flax_parameters = list(inspect.signature(flax_train.train_and_evaluate).parameters)
    lightning_parameters = list(inspect.signature(lightning_train.train_and_evaluate).parameters)
    assert flax_parameters[:2] == lightning_parameters[:2] == ["config", "workdir"]


@pytest.mark.parametrize("module, names", MIRRORED.items())
def test_each_job_lives_in_the_module_of_the_same_name_in_both_stacks(module, names):
    import importlib

    for package in ("flax_swin", "lightning_swin"):
        loaded = importlib.import_module(f"{package}.{module}")
        assert names <= set(vars(loaded)), (package, module, names - set(vars(loaded)))
    for package, other in (("lightning_swin", "flax_swin"), ("flax_swin", "lightning_swin")):
        own = {path.name for path in (REPO / package).glob("*.py")}
        assert f"{module}.py" in own, (package, module)


def test_both_stacks_set_up_and_record_the_same_arithmetic_for_each_precision():
    import jax
    import torch

    from flax_swin import devices as flax_devices
    from lightning_swin import devices as lightning_devices

    before = (jax.config.jax_default_matmul_precision, torch.backends.cudnn.allow_tf32)
    try:
        described = {}
        for precision in ("bf16", "fp32"):
            for name, devices in (("flax", flax_devices), ("lightning", lightning_devices)):
                devices.set_arithmetic(precision)
                described[name, precision] = devices.arithmetic(precision)
    finally:
        jax.config.update("jax_default_matmul_precision", before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    assert all(described[stack, "bf16"].startswith(tags.BF16_SUMMARY) for stack in ("flax", "lightning"))
    # Full float32 in both: no TF32 anywhere.
    assert described["flax", "fp32"] == "float32 (jax_default_matmul_precision highest)"
    assert described["lightning", "fp32"] == "float32 (float32_matmul_precision highest, cudnn.allow_tf32 False)"


def test_the_step_in_flight_is_one_object_of_the_same_fields_in_both_clocks():
    import dataclasses

    from flax_swin import reporting
    from lightning_swin import callbacks

    flax, lightning = ([field.name for field in dataclasses.fields(module.StepInFlight)]
                       for module in (reporting, callbacks))
    assert flax == lightning == ["step", "values", "done", "fetch", "lr"]


def test_warnings_go_through_one_channel_with_one_format():
    """Production code warns only through shared_data.errors.warn ('warning: ...' on stderr): no warnings.warn (which
    prefixes a source file and line) and no hand-made warning lines."""
    found = []
    for folder in PRODUCTION:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} warnings.warn")
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and node.value.lower().lstrip("\n").startswith("warning:") and path.name != "errors.py":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value[:40]!r}")
                if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                        and str(node.values[0].value).lower().lstrip("\n").startswith("warning:") \
                        and path.name != "errors.py":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} f-string warning")
    assert found == []


def _run(stack: str, *flags: str, tmp_path: Path, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    data = ["--data-dir", str(data_dir), "--synthetic-size", "tiny"] if data_dir else []
    command = [sys.executable, str(SCRIPTS[stack]), "--preset", "smoke", *data, "--logdir", str(tmp_path / "runs"),
               *flags]
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, named", [
    (["--batch-size", "0"], "--batch-size"),
    (["--pretrained", "no-such-file.pth"], "--pretrained"),
    (["--step-timing", "sometimes"], "--step-timing"),
    (["--seed", "-1"], "--seed"),
    (["--num-workers", "100000"], "--num-workers"),
])
def test_a_bad_flag_exits_2_naming_it_in_both_stacks(tmp_path, flags, named):
    for stack in SCRIPTS:
        result = _run(stack, *flags, tmp_path=tmp_path / stack)
        assert result.returncode == 2, (stack, result.stderr[-2000:])
        assert named in result.stderr.strip().splitlines()[-1], stack
        assert "Traceback" not in result.stderr, stack


def test_a_mistake_found_while_training_exits_2_with_one_line_in_both_stacks(tmp_path, synthetic_data_dir):
    weights = tmp_path / "not-weights.pth"
    weights.write_bytes(b"this is not a weights file")
    for stack in SCRIPTS:
        for flags, named in ((["--batch-size", "512"], "--batch-size 512"), (["--pretrained", str(weights)], "--pretrained")):
            result = _run(stack, *flags, "--run-name", f"r{len(flags[1])}", tmp_path=tmp_path / stack,
                          data_dir=synthetic_data_dir)
            assert result.returncode == 2, (stack, flags, result.stderr[-2000:])
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith(f"train_{stack}.py: error: ") and named in last, (stack, last)
            assert "Traceback" not in result.stderr, (stack, result.stderr[-2000:])


def test_flax_retention_policy_keeps_the_steps_of_the_shared_rule_ties_to_the_earlier():
    from flax_swin.checkpointing import BestAndLatest

    class Info:
        def __init__(self, step, accuracy):
            self.step, self.metrics = step, {"val_accuracy": accuracy} if accuracy is not None else None

    history = [(6, 0.5), (8, None), (12, 0.7), (18, 0.7), (20, None), (24, 0.5)]
    for keep in (1, 2, 3, 4):
        policy = BestAndLatest(directory=Path("/nonexistent"), keep=keep)
        infos = [Info(step, accuracy) for step, accuracy in history]
        kept = {info.step for info, keep_it in zip(infos, policy.should_preserve(infos, context=None)) if keep_it}
        assert kept == retention.kept_steps(history, keep)
    assert retention.kept_steps(history, 2) == {12, 24}  # of 12 and 18 (both 0.7) the earlier
    assert retention.kept_steps(history, 3) == {12, 18, 24}


def test_lightning_stock_checkpoints_keep_the_steps_of_the_shared_rule(tmp_path):
    import pytorch_lightning as pl
    import torch

    from lightning_swin import checkpointing
    from shared_data import tags
    from shared_data.clock import Sections

    accuracies = {2: 0.5, 4: 0.7, 6: 0.7, 8: 0.6, 10: 0.7, 12: 0.2}  # epoch-end step -> val accuracy

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            self.log("epoch", float(self.current_epoch + 1), logger=False)
            return self.layer(batch[0]).square().mean()

        def validation_step(self, batch, batch_idx):
            self.log(tags.VAL_ACCURACY, accuracies[self.trainer.global_step])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 4)), batch_size=1)
    for keep in (1, 2, 3):
        run_dir = tmp_path / f"keep{keep}"
        trainer = pl.Trainer(max_epochs=6, callbacks=checkpointing.checkpoint_callbacks(
            checkpointing.checkpoint_dir(run_dir), keep), plugins=[checkpointing.AtomicCheckpointIO(Sections())],
            logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            accelerator="cpu")
        trainer.fit(Tiny(), train_dataloaders=loader, val_dataloaders=loader)
        on_disk = {info.step for info in checkpointing.list_checkpoints(run_dir)}
        assert on_disk == retention.kept_steps(list(accuracies.items()), keep), keep
