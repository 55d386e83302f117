"""Fine-tuning: --pretrained from an ImageNet-shaped file into a 10-class run in each stack, and the finetune preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from shared_data import run_config
from shared_data.swin_weights import DERIVED_BUFFERS
from tests import stacks

HEAD_KEYS = ("head.weight", "head.bias")


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Random weights of the nano model with a 1000-class head, trained (so to speak) at another resolution and
    window size (128 px, window 8), in the official format: {"model": state_dict}, derived buffers included."""
    from lightning_swin.model import create_model

    torch.manual_seed(3)
    model = create_model("swinv2_nano_window4_64", num_classes=1000, img_size=128, window_size=8)
    path = tmp_path_factory.mktemp("pretrained") / "swinv2_nano_imagenet.pth"
    torch.save({"model": model.state_dict()}, path)
    expected = {key: value.numpy() for key, value in model.state_dict().items()
                if key not in HEAD_KEYS and not key.endswith(DERIVED_BUFFERS)}
    return path, expected


class CaptureAtFirstStep(pl.Callback):
    """The Lightning model's weights just before the first optimiser step."""

    def __init__(self) -> None:
        self.weights: dict[str, np.ndarray] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.weights = {key: value.detach().cpu().numpy().copy() for key, value in pl_module.model.state_dict().items()}


def _flax_canonical(params: dict) -> dict[str, np.ndarray]:
    """A Flax TrainState's params (plain nested dicts) under their official names, torch layout."""
    from flax import nnx

    from flax_swin.model import create_model
    from flax_swin.weights import to_canonical

    model = nnx.eval_shape(lambda: create_model("swinv2_nano_window4_64", 10, nnx.Rngs(0), img_size=64))
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(params)
    nnx.update(model, state)
    return to_canonical(model)


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_pretrained_1000_class_file_fine_tunes_a_10_class_run_with_the_head_replaced(
        stack, tmp_path, synthetic_data_dir, compilation_cache, imagenet_weights, capsys):
    path, expected = imagenet_weights
    captured: dict[str, np.ndarray] = {}
    if stack == "flax":
        import jax

        def capture(steps_done, state):
            if steps_done == 0:
                captured.update(_flax_canonical(jax.device_get(state.params)))
            return state
        extras = [capture]
    else:
        callback = CaptureAtFirstStep()
        extras = [callback]
    stacks.train(stack, tmp_path, synthetic_data_dir, "--pretrained", str(path), "--max-steps", "1", extras=extras)
    if stack == "lightning":
        captured = callback.weights
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--pretrained: ")]
    assert len(report) == 1 and "head with 1000 classes replaced" in report[0] and "10 classes" in report[0], report
    assert captured["head.weight"].shape == (10, 256)
    assert sorted(key for key in captured if key not in HEAD_KEYS and not key.endswith(DERIVED_BUFFERS)) == \
        sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(captured[key], value, err_msg=key)
    assert stacks.summary(tmp_path / stack / "run")["steps"] == 1


@pytest.mark.parametrize("stack", stacks.STACKS)
def test_weights_that_cannot_be_adapted_are_a_one_line_config_error_naming_the_tensor(stack, tmp_path):
    from lightning_swin.model import create_model as create_torch_model

    path = tmp_path / "wider.pth"
    torch.save(create_torch_model("swinv2_nano_window4_64", num_classes=10, embed_dim=48).state_dict(), path)
    if stack == "flax":
        from flax import nnx

        from flax_swin.model import create_model
        from flax_swin.weights import load_pretrained
        model = create_model("swinv2_nano_window4_64", 10, nnx.Rngs(0))
    else:
        from lightning_swin.weights import load_pretrained
        model = create_torch_model("swinv2_nano_window4_64", num_classes=10)
    with pytest.raises(run_config.ConfigError) as error:
        run_config.load_pretrained(load_pretrained, model, str(path), announce=True)
    message = str(error.value)
    assert message.startswith("--pretrained: ") and "\n" not in message
    assert "patch_embed.proj.weight" in message


def test_init_from_is_the_documented_alias_of_pretrained(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    parser = run_config.build_parser("flax")
    assert parser.parse_args(["--init-from", str(weights)]).pretrained == str(weights)
    assert "--init-from is an alias" in " ".join(parser.format_help().split())
    with pytest.raises(run_config.ConfigError, match="--pretrained"):
        run_config.resolve(parser.parse_args(["--init-from", str(tmp_path / "missing.pth")]), "flax")


@pytest.mark.parametrize("batch_size", [64, 512])
def test_finetune_preset_is_the_official_fine_tuning_schedule_in_both_stacks(batch_size):
    from flax_swin.configs import default as flax_default
    from lightning_swin.configs import default as lightning_default

    scale = batch_size / 512
    flax = flax_default.resolve(dict(flax_default.get_config("finetune").to_dict(), batch_size=batch_size,
                                     run_name="x")).to_dict()
    lightning = lightning_default.resolve(dict(lightning_default.get_config("finetune"), batch_size=batch_size,
                                               run_name="y"))
    for config in (flax, lightning):
        assert (config["epochs"], config["warmup_epochs"], config["weight_decay"]) == (30, 5.0, 1e-8)
        assert config["lr"] == pytest.approx(2e-5 * scale)
        assert config["lr"] * config["warmup_start_factor"] == pytest.approx(2e-8 * scale)
        assert config["lr"] * config["cosine_end_factor"] == pytest.approx(2e-7 * scale)
        assert (config["augment"], config["label_smoothing"]) == ("official", 0.1)
        steps_per_epoch = 10
        total = run_config.total_steps(config, steps_per_epoch)
        assert run_config.learning_rate(0, config, steps_per_epoch) == pytest.approx(2e-8 * scale)
        assert run_config.learning_rate(5 * steps_per_epoch, config, steps_per_epoch) == pytest.approx(2e-5 * scale)
        assert run_config.learning_rate(total, config, steps_per_epoch) == pytest.approx(2e-7 * scale)
    shared = set(run_config.DEFAULTS)
    assert {key: flax[key] for key in shared if key not in ("run_name", "run_dir")} == \
        {key: lightning[key] for key in shared if key not in ("run_name", "run_dir")}
