"""bf16 precision of both models against their own float32 logits: the cosine attention, temperature, position bias
and softmax run in float32 in the official order, so bf16 costs little more than its matmuls."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_swin.model import create_model as create_flax_model
from flax_swin.weights import from_canonical
from lightning_swin.model import create_model as create_torch_model
from tests import weights_fixtures

# Relative max logit error, max |bf16 - fp32| / max |fp32|, of the nano model on fixed random weights and images,
# about 1.2x what each model measured after the change (torch autocast 0.0136, Flax bf16 0.0107 on a 2-core x86 CPU).
# Before it, with the queries scaled before a bf16 product, the bias added into it in place and the softmax on it,
# the torch model measured 0.0169.
TORCH_AUTOCAST_BOUND = 0.0165
FLAX_BF16_BOUND = 0.013


@pytest.fixture(scope="module")
def weights_and_images() -> tuple[dict[str, np.ndarray], np.ndarray]:
    images = np.random.default_rng(0).standard_normal((16, 64, 64, 3), dtype=np.float32)
    return weights_fixtures.random_weights(0), images


def _relative_max_error(low: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(low - reference).max() / np.abs(reference).max())


def test_torch_logits_under_bf16_autocast_stay_close_to_float32(weights_and_images):
    weights, images = weights_and_images
    model = create_torch_model(weights_fixtures.NANO, 10).eval()
    model.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()})
    inputs = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        reference = model(inputs).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(inputs).float().numpy()
    assert _relative_max_error(low, reference) <= TORCH_AUTOCAST_BOUND


def test_flax_bf16_logits_stay_close_to_float32(weights_and_images):
    weights, images = weights_and_images
    reference = nnx.jit(lambda: create_flax_model(weights_fixtures.NANO, 10, nnx.Rngs(0)))()
    from_canonical(reference, weights)
    # The same float32 parameters (and every other variable) in the bf16 model: only its computation differs.
    low = nnx.eval_shape(lambda: create_flax_model(weights_fixtures.NANO, 10, nnx.Rngs(0), dtype=jnp.bfloat16))
    nnx.update(low, nnx.state(reference))
    forward = nnx.jit(lambda model, x: model(x))
    logits = []
    for model in (reference, low):
        model.eval()
        logits.append(np.asarray(forward(model, jnp.asarray(images))))
    assert _relative_max_error(logits[1], logits[0]) <= FLAX_BF16_BOUND
