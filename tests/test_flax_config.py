"""Flax stack configuration: ConfigDict presets, the optax schedule against the reference, flags that fail fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_swin.configs import default
from shared_data import run_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_flax.py"


def test_get_config_is_the_shared_defaults_with_a_preset_applied():
    base = default.get_config()
    assert base.batch_size == run_config.DEFAULTS["batch_size"] and base.profile_steps is None
    assert default.get_config("smoke").to_dict() == dict(base.to_dict(), **run_config.PRESETS["smoke"], preset="smoke")
    tiny = default.resolve(default.get_config("swinv2_tiny_window8_256"))
    assert (tiny.model, tiny.img_size, tiny.batch_size) == ("swinv2_tiny_window8_256", 256, 32)
    assert tiny.drop_path == 0.2 and tiny.lr == pytest.approx(5e-4 * 32 / 512)
    assert tiny.run_dir.startswith(str(Path("runs") / "flax"))


@pytest.mark.parametrize("overrides", [
    dict(),  # the default recipe: 5 warm-up epochs of 100
    dict(warmup_epochs=0.0),
    dict(max_steps=37, warmup_epochs=2.5),  # a cut-short run: warm-up and cosine over max_steps
    dict(max_steps=3),  # warm-up longer than the whole run
])
def test_optax_schedule_matches_the_shared_reference_at_every_step(overrides):
    import jax

    from flax_swin import steps

    config = default.resolve(dict(default.get_config().to_dict(), run_name="x", epochs=6, **overrides))
    steps_per_epoch = 7
    schedule = steps.learning_rate_schedule(config, steps_per_epoch)
    total = run_config.total_steps(config.to_dict(), steps_per_epoch)
    step_numbers = np.arange(total + 2)
    got = np.asarray(jax.vmap(schedule)(step_numbers))
    want = np.asarray([run_config.learning_rate(int(s), config.to_dict(), steps_per_epoch) for s in step_numbers])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    assert got.max() == pytest.approx(config.lr, rel=1e-6) or overrides.get("max_steps") == 3


def _run_script(*flags: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), *flags, "--data-dir", str(tmp_path / "data"),
                           "--logdir", str(tmp_path / "runs")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("flags, named", [
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--model", "swinv2_huge"], "--model"),
    (["--precision", "fp8"], "--precision"),
    (["--img-size", "100"], "--img-size"),
    (["--profile-steps", "9,3"], "--profile-steps"),
    (["--resume"], "--resume"),
])
def test_a_bad_flag_fails_before_any_data_is_read_naming_the_flag(tmp_path, flags, named):
    result = _run_script("--preset", "smoke", *flags, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert named in last_line and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_help_documents_the_shared_and_the_flax_only_flags(tmp_path):
    result = _run_script("--help", tmp_path=tmp_path)
    assert result.returncode == 0
    for flag in ("--dataset", "--model", "--batch-size", "--precision", "--resume", "--keep-checkpoints",
                 "--checkpoint-every-steps", "--preset", "--profile-steps"):
        assert flag in result.stdout, flag
    assert "SWIN_" not in result.stdout  # no test-only switches in what a user reads
