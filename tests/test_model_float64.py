"""Both models in float64 compute timm's Swin V2 in float64 from the same random weights, to 1e-10 relative: every
upcast in them is to at least float32 (the promoted type of the input and float32), never down to it."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_swin.model import create_model as create_flax_model
from flax_swin.weights import from_canonical
from lightning_swin.model import create_model as create_torch_model
from shared_data.swin_weights import canonicalize
from shared_data.variants import VARIANTS
from tests.weights_fixtures import randomise

# float64 keeps 16 digits; a float32 step anywhere in a model leaves about 1e-6 (5e-6 measured before the upcasts
# kept float64), one in bf16 about 1e-2.
FLOAT64_RTOL = 1e-10
NUM_CLASSES = 10
# timm's name for every tiny configuration below: the window options are constructor arguments.
TIMM_NAME = "swinv2_tiny_window8_256"

CONFIGS = [
    pytest.param("swinv2_tiny_window8_256", {}, id="tiny-window8-256"),
    pytest.param("swinv2_tiny_window8_256", dict(ape=True), id="absolute-position-embedding"),
    pytest.param("swinv2_tiny_window12to16_192to256", {}, id="pretrained-window-sizes-12-12-12-6"),
    pytest.param("swinv2_tiny_window16_256", {}, id="window16"),
]


def float64_coords_tables(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with each attention's relative_coords_table (a constant the official code computes in float32 even in
    a float64 model) computed in float64, in the buffer's own shape: numpy's and torch's float32 log2 differ by an ulp
    in places (one entry of window 16 from 12), which alone parts the models by 1e-10, so all three use the formula in
    float64, as the Flax float64 model computes it."""
    from lightning_swin.model import relative_coords_table

    for module in model.modules():
        table = getattr(module, "relative_coords_table", None)
        if isinstance(table, torch.Tensor):
            side = math.isqrt(table.numel() // 2)  # 2w - 1
            window = (side + 1) // 2
            pretrained = getattr(module, "pretrained_window_size", 0)
            pretrained = pretrained[0] if isinstance(pretrained, (tuple, list)) else pretrained
            exact = relative_coords_table(window, int(pretrained), torch.float64)
            module.relative_coords_table = exact.reshape(table.shape)
    return model


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def timm_reference(name: str, seed: int = 0, ape: bool = False) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    """timm's Swin V2 with `name`'s windows in float64, randomised (see randomise), and the same weights under the
    official names; with `ape`, an absolute position embedding N(0, 0.02) among them, which timm lacks."""
    import timm

    variant = VARIANTS[name]
    torch.manual_seed(seed)
    model = timm.create_model(
        TIMM_NAME, pretrained=False, num_classes=NUM_CLASSES, img_size=variant["img_size"],
        window_size=variant["window_size"], pretrained_window_sizes=variant["pretrained_window_sizes"],
        drop_path_rate=0.0,
    ).double().eval()
    float64_coords_tables(model)
    randomise(model, seed, probe_clamp=True)
    # numpy arrays pass canonicalize unchanged (a tensor there is read as float32).
    weights, fmt = canonicalize({key: value.numpy() for key, value in model.state_dict().items()})
    assert fmt == "timm"
    if ape:
        side = variant["img_size"] // 4
        generator = np.random.default_rng(seed)
        weights["absolute_pos_embed"] = 0.02 * generator.standard_normal((1, side * side, 96))
    return model, weights


def timm_logits(model: torch.nn.Module, images: np.ndarray, absolute_pos_embed: np.ndarray | None) -> np.ndarray:
    """timm's forward in float64; with an absolute position embedding, the official code's order around timm's own
    modules: patch embedding, plus the embedding, the stages, the final norm, pooling and head."""
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        if absolute_pos_embed is None:
            return model(x).numpy()
        tokens = model.patch_embed(x)  # NHWC
        tokens = tokens + torch.from_numpy(absolute_pos_embed).view(1, *tokens.shape[1:])
        return model.forward_head(model.norm(model.layers(tokens))).numpy()


def torch_float64_logits(name: str, overrides: dict[str, Any], weights: dict[str, np.ndarray],
                         images: np.ndarray) -> np.ndarray:
    model = float64_coords_tables(create_torch_model(name, NUM_CLASSES, drop_path_rate=0.0, **overrides).double().eval())
    model.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()})
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def flax_float64_logits(name: str, overrides: dict[str, Any], weights: dict[str, np.ndarray],
                        images: np.ndarray) -> np.ndarray:
    # Only inside this block: jax_enable_x64 is back at its setting afterwards, for every later test.
    with jax.enable_x64(True):
        model = create_flax_model(name, NUM_CLASSES, nnx.Rngs(0), drop_path_rate=0.0, dtype=jnp.float64, **overrides)
        from_canonical(model, weights)
        model.eval()
        logits = nnx.jit(lambda model, x: model(x))(model, jnp.asarray(images))
        assert logits.dtype == jnp.float64
        return np.asarray(logits)


@pytest.fixture(scope="module")
def x64_restored():
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before


@pytest.mark.parametrize("name, overrides", CONFIGS)
def test_both_models_in_float64_compute_timms_float64_logits(name, overrides, x64_restored):
    images = np.random.default_rng(1).standard_normal((2, 256, 256, 3))
    reference, weights = timm_reference(name, ape=overrides.get("ape", False))
    expected = timm_logits(reference, images, weights.get("absolute_pos_embed"))
    assert expected.dtype == np.float64
    errors = {
        "torch": _relative_error(torch_float64_logits(name, overrides, weights, images), expected),
        "flax": _relative_error(flax_float64_logits(name, overrides, weights, images), expected),
    }
    assert max(errors.values()) <= FLOAT64_RTOL, errors
