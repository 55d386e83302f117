"""The Flax NNX Swin V2 on its own: official shapes and init, modes and randomness, buffers, decay mask, loading."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_swin.model import SwinTransformerV2, create_model, decay_mask
from flax_swin.weights import load_pretrained, read_safetensors_config, save_safetensors, to_canonical
from shared_data.swin_weights import WeightsFormatError

NANO = "swinv2_nano_window4_64"
OFFICIAL_TINY_PARAMS_M = 28.35  # official model zoo, SwinV2-T with a 1000-class head


def _nano(num_classes: int = 10, seed: int = 0, **overrides) -> SwinTransformerV2:
    return create_model(NANO, num_classes, nnx.Rngs(params=seed, dropout=seed + 1), **overrides)


_forward = nnx.jit(lambda model, images: model(images))


def _images(batch: int = 2, size: int = 64, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32))


def test_tiny_parameter_count_matches_the_official_figure():
    abstract = nnx.eval_shape(lambda: create_model("swinv2_tiny_window8_256", 1000, nnx.Rngs(0)))
    count = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    print(f"flax swinv2_tiny_window8_256: {count / 1e6:.2f}M parameters (official {OFFICIAL_TINY_PARAMS_M}M)")
    assert round(count / 1e6, 2) == OFFICIAL_TINY_PARAMS_M


@pytest.mark.parametrize(
    "overrides, named",
    [(dict(img_size=250), "img_size"), (dict(num_heads=(3, 2, 4, 8)), "num_heads")],
)
def test_impossible_configuration_fails_at_construction_naming_the_value(overrides, named):
    with pytest.raises(ValueError, match=named):
        _nano(**overrides)


def test_official_init_post_norms_zero_logit_scale_log10_qv_biases_zero():
    model = _nano()
    block = model.layers[2].blocks[1]
    assert np.all(block.norm1.scale[...] == 0) and np.all(block.norm2.bias[...] == 0)
    assert np.allclose(block.attn.logit_scale[...], np.log(10.0))
    assert np.all(block.attn.q_bias[...] == 0) and np.all(block.attn.v_bias[...] == 0)
    assert np.all(model.layers[0].downsample.norm.scale[...] == 1)
    kernel = np.asarray(block.mlp.fc1.kernel[...])
    assert 0.015 < kernel.std() < 0.025


def test_derived_buffers_are_not_in_the_model_state():
    state = nnx.state(_nano())
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}
    assert not any(key in name for name in names for key in ("relative_position_index", "coords_table", "attn_mask"))
    # Parameters plus one shared dropout stream (key and count) and nothing else.
    non_params = nnx.to_flat_state(nnx.state(_nano(), nnx.Not(nnx.Param)))
    assert sorted(path[-1] for path, _ in non_params) == ["count", "key"]


def test_clipped_stages_use_the_whole_stage_as_window_and_never_shift():
    model = _nano()
    windows = [(block.window_size, block.shift_size) for layer in model.layers for block in layer.blocks]
    # Stages at 16, 8, 4, 2 tokens with window 4; depths (1, 1, 2, 1) and only odd blocks shift.
    assert windows == [(4, 0), (4, 0), (4, 0), (4, 0), (2, 0)]
    shifted = SwinTransformerV2(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                window_size=4, rngs=nnx.Rngs(0))
    assert [layer.blocks[1].shift_size for layer in shifted.layers] == [2, 2, 0, 0]
    assert shifted.layers[0].blocks[1].attn_mask.shape == (16, 16, 16)


def test_eval_is_deterministic_and_train_mode_draws_from_the_dropout_stream():
    model = _nano(drop_path_rate=0.5, drop_rate=0.1)
    images = _images()
    model.eval()
    first, second = _forward(model, images), _forward(model, images)
    np.testing.assert_array_equal(first, second)

    model.train()
    noisy_a, noisy_b = _forward(model, images), _forward(model, images)
    assert not np.allclose(noisy_a, noisy_b) and not np.allclose(noisy_a, first)
    nnx.reseed(model, dropout=123)
    replay_a = _forward(model, images)
    nnx.reseed(model, dropout=123)
    np.testing.assert_array_equal(replay_a, _forward(model, images))


def test_bfloat16_compute_keeps_float32_parameters_and_float32_logits():
    model = _nano(dtype=jnp.bfloat16)
    model.eval()
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    logits = _forward(model, _images())
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_wrong_input_shape_names_the_expected_layout():
    with pytest.raises(ValueError, match="NHWC"):
        _nano()(jnp.zeros((1, 3, 64, 64)))


def test_decay_mask_excludes_the_official_no_decay_parameters():
    mask = {".".join(map(str, path)): variable.get_value()
            for path, variable in nnx.to_flat_state(decay_mask(nnx.state(_nano(ape=True), nnx.Param)))}
    decayed = sorted(name for name, decay in mask.items() if decay)
    assert "layers.0.blocks.0.attn.qkv.kernel" in decayed and "patch_embed.proj.kernel" in decayed
    assert "head.kernel" in decayed and "layers.0.downsample.reduction.kernel" in decayed
    for name in decayed:
        assert not name.endswith(("bias", "scale")), name
        assert not any(key in name for key in ("cpb_mlp", "logit_scale", "absolute_pos_embed")), name


def test_weights_load_into_another_window_size_and_resolution(tmp_path):
    source = _nano(seed=1)
    save_safetensors(to_canonical(source), tmp_path / "w4.safetensors", config={"model": NANO})
    other = _nano(seed=2, window_size=2, img_size=32)
    report = load_pretrained(other, tmp_path / "w4.safetensors")
    assert report.fmt == "flax" and not report.head_replaced
    assert read_safetensors_config(tmp_path / "w4.safetensors") == {"model": NANO}
    for name, value in to_canonical(source).items():
        np.testing.assert_array_equal(to_canonical(other)[name], value)


def test_different_head_size_is_replaced_and_reported(tmp_path):
    weights = to_canonical(_nano(num_classes=1000, seed=1))
    torch.save({"model": {key: torch.from_numpy(value.copy()) for key, value in weights.items()}}, tmp_path / "official.pth")
    model = _nano(num_classes=10, seed=2)
    head_before = np.asarray(model.head.kernel[...])
    report = load_pretrained(model, tmp_path / "official.pth")
    assert report.fmt == "official" and report.head_replaced and "1000 classes" in str(report)
    np.testing.assert_array_equal(model.head.kernel[...], head_before)
    np.testing.assert_array_equal(to_canonical(model)["norm.weight"], weights["norm.weight"])


def test_missing_and_unexpected_keys_are_an_error_listing_them():
    model = _nano()
    weights = to_canonical(model)
    del weights["layers.0.blocks.0.attn.q_bias"]
    weights["layers.0.blocks.0.attn.extra"] = np.zeros(3, np.float32)
    before = to_canonical(model)
    with pytest.raises(WeightsFormatError, match=r"missing \(1\): layers.0.blocks.0.attn.q_bias.*unexpected"):
        load_pretrained(model, weights)
    for name, value in before.items():
        np.testing.assert_array_equal(to_canonical(model)[name], value)


def test_hand_written_backward_passes_match_autodiff_of_the_same_functions():
    """gelu, layer_norm and softmax keep less for the backward pass than autodiff would; their gradients must not
    change: each against jax.grad of the reference function, in float32 (and gelu's forward against jax.nn.gelu)."""
    from flax_swin.model import gelu, layer_norm, softmax

    x = jax.random.normal(jax.random.key(0), (4, 16, 32), jnp.float32) * 3.0
    weights = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
    scale = jax.random.normal(jax.random.key(2), (32,), jnp.float32)
    bias = jax.random.normal(jax.random.key(3), (32,), jnp.float32)

    def reference_layer_norm(x, scale, bias):
        return nnx.LayerNorm(32, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0))(x) * scale + bias

    pairs = [
        (lambda x: gelu(x), lambda x: jax.nn.gelu(x, approximate=False)),
        (lambda x: softmax(x), lambda x: jax.nn.softmax(x, axis=-1)),
        (lambda x: layer_norm(x, scale, bias, 1e-5), lambda x: reference_layer_norm(x, scale, bias)),
    ]
    for ours, reference in pairs:
        np.testing.assert_allclose(ours(x), reference(x), rtol=1e-5, atol=1e-6)
        grad_ours = jax.grad(lambda x: (ours(x) * weights).sum())(x)
        grad_reference = jax.grad(lambda x: (reference(x) * weights).sum())(x)
        np.testing.assert_allclose(grad_ours, grad_reference, rtol=1e-4, atol=1e-5)
    for argnum in (1, 2):  # the layer norm's scale and bias
        grad_ours = jax.grad(lambda *a: (layer_norm(*a, 1e-5) * weights).sum(), argnums=argnum)(x, scale, bias)
        grad_reference = jax.grad(lambda *a: (reference_layer_norm(*a) * weights).sum(), argnums=argnum)(x, scale, bias)
        np.testing.assert_allclose(grad_ours, grad_reference, rtol=1e-4, atol=1e-4)


def test_backward_pass_keeps_no_more_than_torch_would_for_the_activation_norm_and_softmax():
    """Autodiff of jax.nn.gelu and nnx.LayerNorm keeps 3 tensors of the input's shape (softmax, in the model, 2);
    ours keep 1, as torch's kernels do."""
    # Private: the public jax.ad_checkpoint.print_saved_residuals only prints what this returns.
    from jax._src.ad_checkpoint import saved_residuals

    from flax_swin.model import gelu, layer_norm, softmax

    x = jnp.ones((8, 64, 32), jnp.float32)
    scale, bias = jnp.ones((32,)), jnp.zeros((32,))
    for function in (gelu, softmax, lambda x: layer_norm(x, scale, bias, 1e-5)):
        full = [aval for aval, _ in saved_residuals(lambda x: function(x).sum(), x) if aval.shape == x.shape]
        assert len(full) == 1, (function, full)
