"""The Flax and PyTorch Swin V2 compute the same function: logits, gradients, foreign weights, lossless conversion."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from flax_swin.model import create_model as create_flax_model
from flax_swin.weights import from_canonical, load_pretrained, to_canonical
from lightning_swin.model import create_model as create_torch_model
from tools import convert_weights
from tests.weights_fixtures import randomise

LOGITS_RTOL = 1e-5
GRADIENT_RTOL = 1e-4
# Nano has shifted stages and two clipped ones (4x4 and 2x2 tokens under a window of 4); ape and pretrained
# windows bring in every parameter kind for the gradient check.
NANO_OVERRIDES = dict(ape=True, pretrained_window_sizes=(6, 6, 4, 2), drop_path_rate=0.0)


def _torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


_jitted_forward = nnx.jit(lambda model, images: model(images))


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def _pair(name: str, num_classes: int = 10, seed: int = 0, probe_clamp: bool = True, **overrides):
    """(torch model, flax model) in eval mode holding the same random weights; probe_clamp puts one head per block
    above the temperature clamp (see randomise), which the gradient test leaves out: its near one-hot softmax makes
    float32 gradients ill-conditioned."""
    torch.manual_seed(seed)
    torch_model = create_torch_model(name, num_classes, **overrides).eval()
    randomise(torch_model, seed, probe_clamp=probe_clamp)
    flax_model = create_flax_model(name, num_classes, nnx.Rngs(params=seed + 1, dropout=seed + 2), **overrides)
    flax_model.eval()
    from_canonical(flax_model, {key: value.numpy() for key, value in torch_model.state_dict().items()})
    return torch_model, flax_model


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_pair():
    return _pair("swinv2_tiny_window8_256")


def test_tiny_window8_logits_match_torch_at_256(tiny_pair):
    torch_model, flax_model = tiny_pair
    images = _images(256)
    expected = _torch_logits(torch_model, images)
    actual = np.asarray(_jitted_forward(flax_model, jnp.asarray(images)))
    assert actual.shape == expected.shape == (2, 10)
    assert _relative_error(actual, expected) <= LOGITS_RTOL


@pytest.mark.parametrize(
    "name, overrides",
    [
        pytest.param("swinv2_tiny_window8_256", dict(ape=True), id="absolute-position-embedding"),
        pytest.param("swinv2_tiny_window12to16_192to256", {}, id="pretrained-window-sizes-12-12-12-6"),
        pytest.param("swinv2_tiny_window16_256", {}, id="window16"),
        # Stages 3 and 4 (4x4 and 2x2 tokens) are smaller than the window: clipped and never shifted.
        pytest.param("swinv2_nano_window4_64", NANO_OVERRIDES, id="clipped-windows-nano"),
    ],
)
def test_option_logits_match_torch(name, overrides):
    torch_model, flax_model = _pair(name, **overrides)
    images = _images(torch_model.img_size, batch=1)
    expected = _torch_logits(torch_model, images)
    actual = np.asarray(_jitted_forward(flax_model, jnp.asarray(images)))
    assert _relative_error(actual, expected) <= LOGITS_RTOL


def test_loss_gradients_match_torch_for_every_parameter():
    torch_model, flax_model = _pair("swinv2_nano_window4_64", seed=3, probe_clamp=False, **NANO_OVERRIDES)
    images = _images(64, batch=2, seed=3)
    labels = np.array([1, 5], dtype=np.int32)

    loss = F.cross_entropy(torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)), torch.from_numpy(labels).long())
    loss.backward()
    expected = {name: param.grad.numpy() for name, param in torch_model.named_parameters()}

    def flax_loss(model):
        logits = model(jnp.asarray(images))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

    flax_value, grads = nnx.jit(nnx.value_and_grad(flax_loss))(flax_model)
    assert abs(float(flax_value) - loss.item()) <= LOGITS_RTOL * abs(loss.item())
    # Gradients share the parameters' layout, so the same name/transposition rules map them to torch names.
    actual = to_canonical(grads)
    assert set(actual) == set(expected)
    errors = {name: _relative_error(actual[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRADIENT_RTOL, f"{worst}: relative gradient error {errors[worst]:.2e}"
    assert all(np.any(expected[name] != 0) for name in expected), "a parameter got no gradient: test is too weak"


def test_torchvision_swin_v2_t_converted_into_ours_gives_the_same_logits():
    from torchvision.models import swin_v2_t

    torch.manual_seed(5)
    reference = swin_v2_t(num_classes=10).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("qkv.bias"):
                width = param.shape[0] // 3
                param[:width].normal_(0, 0.5, generator=generator)
                param[2 * width :].normal_(0, 0.5, generator=generator)  # its key slice stays zero, as in swin v2
            elif name.endswith("logit_scale"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.normal_(0, 0.5, generator=generator)
    flax_model = create_flax_model("swinv2_tiny_window8_256", 10, nnx.Rngs(params=0, dropout=0))
    flax_model.eval()
    report = load_pretrained(flax_model, reference.state_dict())
    assert report.fmt == "torchvision" and not report.head_replaced

    images = _images(256, batch=1, seed=5)
    expected = _torch_logits(reference, images)
    actual = np.asarray(_jitted_forward(flax_model, jnp.asarray(images)))
    assert _relative_error(actual, expected) <= LOGITS_RTOL


def test_torch_to_flax_to_torch_round_trip_is_exact(tiny_pair):
    torch_model, flax_model = tiny_pair
    original = {key: value.numpy() for key, value in torch_model.state_dict().items()}
    back = to_canonical(flax_model)
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_convert_weights_cli_round_trips_a_pth_exactly(tmp_path):
    torch_model = create_torch_model("swinv2_nano_window4_64", 10)
    randomise(torch_model, 7, probe_clamp=True)
    original = {key: value.clone() for key, value in torch_model.state_dict().items()}
    torch.save({"model": original}, tmp_path / "official.pth")

    to_flax = [str(tmp_path / "official.pth"), str(tmp_path / "flax.safetensors"), "--model", "swinv2_nano_window4_64"]
    assert convert_weights.main(to_flax) == 0
    # No --model: the Flax file records its variant and head size.
    assert convert_weights.main([str(tmp_path / "flax.safetensors"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]  # the official release layout
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_convert_weights_cli_says_which_flag_is_missing(tmp_path, capsys):
    torch.save({"model": {"norm.weight": torch.ones(3)}}, tmp_path / "official.pth")
    assert convert_weights.main([str(tmp_path / "official.pth"), str(tmp_path / "out.safetensors")]) == 2
    assert "--model" in capsys.readouterr().err
