"""The shared flags: presets, precedence, checks that name the flag, and the reference schedule."""

import json

import pytest

from shared_data import run_config
from tests import stacks


def _resolve(argv, stack="flax"):
    parser = run_config.build_parser(stack)
    return run_config.resolve(parser.parse_args(argv), stack)


def test_explicit_flags_override_preset_which_overrides_defaults():
    config = _resolve(["--preset", "smoke", "--batch-size", "8"])
    assert config["batch_size"] == 8
    assert config["model"] == "swinv2_nano_window4_64"  # from the preset
    assert config["weight_decay"] == run_config.DEFAULTS["weight_decay"]  # from the defaults


def test_origin_preset_is_tiny_window8_at_256_batch_32():
    config = _resolve(["--preset", "swinv2_tiny_window8_256"])
    assert (config["model"], config["img_size"], config["batch_size"]) == ("swinv2_tiny_window8_256", 256, 32)
    assert config["drop_path"] == pytest.approx(0.2)
    assert config["lr"] == pytest.approx(5e-4 * 32 / 512)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "-1"], "--epochs"),
        (["--epochs", str(2**31)], "--epochs"),
        (["--max-steps", "0"], "--max-steps"),
        (["--max-steps", str(2**31)], "--max-steps"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--base-lr", "inf"], "--base-lr"),
        (["--warmup-epochs", "nan"], "--warmup-epochs"),
        (["--weight-decay=-1e-3"], "--weight-decay"),
        (["--grad-clip", "inf"], "--grad-clip"),
        (["--label-smoothing", "1.5"], "--label-smoothing"),
        (["--label-smoothing", "nan"], "--label-smoothing"),
        (["--drop-path", "1.0"], "--drop-path"),
        (["--img-size", "250"], "--img-size"),
        (["--img-size", "0"], "--img-size"),
        (["--img-size", "4096"], "--img-size"),
        (["--model", "swinv2_huge"], "--model"),
        (["--resume"], "--resume"),
        (["--run-name", "../escape"], "--run-name"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints"),
        (["--checkpoint-every-steps", "-1"], "--checkpoint-every-steps"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--num-workers", "-1"], "--num-workers"),
        (["--num-workers", "100000"], "--num-workers"),
        (["--mixup", "-1"], "--mixup"),
        (["--cutmix", "nan"], "--cutmix"),
        (["--reprob", "2"], "--reprob"),
        (["--augment", "basic", "--mixup", "0.8"], "--mixup"),
        (["--profile-steps", "5,2"], "--profile-steps"),
        (["--pretrained", "no-such-weights.pth"], "--pretrained"),
    ],
)
@pytest.mark.parametrize("stack", run_config.STACKS)
def test_bad_flag_is_rejected_naming_it(argv, flag, stack):
    with pytest.raises(run_config.ConfigError, match=f"^{flag}"):
        _resolve(argv, stack)


def test_the_largest_seed_a_32_bit_generator_takes_is_accepted():
    assert _resolve(["--seed", str(2**32 - 1)])["seed"] == 2**32 - 1


def test_more_steps_than_an_int32_holds_is_refused_naming_epochs():
    config = _resolve(["--epochs", str(2**30)])
    with pytest.raises(run_config.ConfigError, match="^--epochs .* more than 2147483647"):
        run_config.total_steps(config, steps_per_epoch=4)


def test_bad_flag_exits_with_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        stacks.script_main("train_lightning")(["--grad-clip", "-1"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("train_lightning.py: error: --grad-clip")


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    config = _resolve(["--lr", "1e-3", "--warmup-epochs", "1", "--epochs", "3"])
    lrs = [run_config.learning_rate(step, config, steps_per_epoch=10) for step in range(30)]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a > b for a, b in zip(lrs[10:-1], lrs[11:]))
    assert run_config.learning_rate(30, config, 10) == pytest.approx(1e-5)


def test_max_steps_caps_total_steps():
    config = _resolve(["--epochs", "10", "--max-steps", "7"])
    assert run_config.total_steps(config, steps_per_epoch=5) == 7


def test_run_dir_saves_config_and_resume_refuses_a_changed_experiment(tmp_path):
    config = _resolve(["--logdir", str(tmp_path), "--run-name", "a", "--seed", "3"])
    run_dir = run_config.prepare_run_dir(config, {"dataset": "synthetic"})
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["seed"] == 3 and saved["dataset"] == "synthetic" and saved["stack"] == "flax"
    with pytest.raises(run_config.ConfigError, match="--run-name"):
        run_config.prepare_run_dir(config, {"dataset": "synthetic"})
    resumed = _resolve(["--logdir", str(tmp_path), "--run-name", "a", "--seed", "4", "--resume"])
    with pytest.raises(run_config.ConfigError, match="--seed"):
        run_config.prepare_run_dir(resumed, {"dataset": "synthetic"})
    same = _resolve(["--logdir", str(tmp_path), "--run-name", "a", "--seed", "3", "--resume"])
    assert run_config.prepare_run_dir(same, {"dataset": "synthetic"}) == run_dir


def test_resume_of_a_missing_run_starts_it_as_a_relaunching_scheduler_needs(tmp_path):
    config = _resolve(["--logdir", str(tmp_path), "--run-name", "nothing", "--resume"])
    run_dir = run_config.prepare_run_dir(config)
    assert (run_dir / "config.json").is_file() and not (run_dir / "config.resume.json").exists()
    run_config.prepare_run_dir(config)  # relaunched again: now a resume of that run
    assert (run_dir / "config.resume.json").is_file()
