"""A Flax training run exported as official-format PyTorch weights: the torch model then computes the same logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from flax_swin.model import create_model as create_flax_model
from flax_swin.weights import from_canonical
from lightning_swin.model import create_model as create_torch_model
from lightning_swin.weights import load_pretrained
from tools import convert_weights
from shared_data.swin_weights import WeightsFormatError, read_source
from tests import weights_fixtures

LOGITS_RTOL = 1e-5
# Step 6 validated best; step 12 is the latest.
STEPS = {"best": (6, 0.6), "latest": (12, 0.4)}


IMAGES = np.random.default_rng(0).standard_normal((2, 64, 64, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def flax_run(tmp_path_factory):
    """(run folder, {step: weights}, {step: the Flax model's logits of IMAGES}) of a nano Flax run with two
    checkpoints of different random weights."""
    weights = {step: weights_fixtures.random_weights(seed=step) for step, _ in STEPS.values()}
    run = weights_fixtures.write_flax_run(
        tmp_path_factory.mktemp("runs") / "flax" / "run",
        [(step, weights[step], accuracy) for step, accuracy in STEPS.values()],
        {"model": weights_fixtures.NANO, "img_size": 64})
    model = nnx.jit(lambda: create_flax_model(weights_fixtures.NANO, 10, nnx.Rngs(0)))()
    model.eval()
    forward = nnx.jit(lambda model, images: model(images))  # compiled once, for both weight sets
    logits = {}
    for step, values in weights.items():
        from_canonical(model, values)
        logits[step] = np.asarray(forward(model, jnp.asarray(IMAGES)))
    return run, weights, logits


def _torch_logits(state_dict: dict[str, torch.Tensor]) -> np.ndarray:
    model = create_torch_model(weights_fixtures.NANO, 10).eval()
    model.load_state_dict(state_dict)  # strict: the official names, every parameter, no buffers needed
    with torch.no_grad():
        return model(torch.from_numpy(IMAGES).permute(0, 3, 1, 2)).numpy()


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("checkpoint", list(STEPS))
def test_flax_run_exported_to_pth_and_safetensors_gives_the_same_logits_in_torch(flax_run, tmp_path, checkpoint):
    run, _, flax_logits = flax_run
    expected = flax_logits[STEPS[checkpoint][0]]
    assert expected.std() > 0.1  # the comparison is not between two near-constant outputs
    for output in (tmp_path / "export.pth", tmp_path / "export.safetensors"):
        assert convert_weights.main([str(run), str(output), "--checkpoint", checkpoint]) == 0
        if output.suffix == ".pth":
            saved = torch.load(output, weights_only=True)
            assert set(saved) == {"model"}  # the official release layout
            state_dict = saved["model"]
        else:
            state_dict = load_file(str(output))
        assert _relative_error(_torch_logits(state_dict), expected) <= LOGITS_RTOL


def test_flax_run_and_step_folders_load_directly_into_the_torch_model(flax_run):
    run, weights, _ = flax_run
    for source, checkpoint, step in ((run, "best", 6), (run, "latest", 12), (run / "checkpoints" / "12", "best", 12),
                                     (run / "checkpoints", "latest", 12)):
        model = create_torch_model(weights_fixtures.NANO, 10)
        report = load_pretrained(model, source, checkpoint)
        assert report.fmt == "flax" and report.source == str(run / "checkpoints" / str(step))
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(value.numpy(), weights[step][name], err_msg=name)


def test_a_run_without_validated_checkpoints_has_no_best(tmp_path):
    run = weights_fixtures.write_flax_run(tmp_path / "flax" / "run", [(3, weights_fixtures.random_weights(3), None)],
                                   {"model": weights_fixtures.NANO, "img_size": 64})
    with pytest.raises(WeightsFormatError, match="none is the best; ask for the latest"):
        read_source(run)
    assert read_source(run, "latest")[2] == str(run / "checkpoints" / "3")
