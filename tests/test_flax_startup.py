"""The Flax start-up's shortcuts: the seed's parameters bit for bit, and optax's own optimiser state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_swin.configs import default as default_config
from flax_swin.model import create_model
from flax_swin.steps import (INIT_COMPILER_OPTIONS, build_model, initial_optimizer_state, make_optimizer,
                             unrolled_threefry_on_cpu)


def _leaves(model: nnx.Module) -> list[np.ndarray]:
    def host(leaf: jax.Array) -> np.ndarray:
        return np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)

    return [host(leaf) for leaf in jax.tree.leaves(nnx.state(model))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_the_quicker_build_gives_the_seeds_parameters_bit_for_bit(dtype):
    # Every kind of initialiser the variants use (truncated normal, zeros, ones, the log logit scale, the position
    # tables), in one block per stage; a plain jax.jit (jax's rolled threefry, the default compiler options) is the
    # reference the seed's parameters were made with.
    def build() -> nnx.Module:
        return create_model("swinv2_nano_window4_64", 10, nnx.Rngs(params=3, dropout=3), depths=(1, 1, 1, 1),
                            dtype=dtype)

    assert INIT_COMPILER_OPTIONS  # with none, this test would compare the default with itself
    graphdef, state = jax.jit(lambda: nnx.split(build()))()
    reference, built = _leaves(nnx.merge(graphdef, state)), _leaves(build_model(build))
    assert len(built) == len(reference) > 50
    for got, want in zip(built, reference):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def _has_while_loop(key: jax.Array) -> bool:
    return "stablehlo.while" in jax.jit(lambda k: jax.random.bits(k, (8,))).lower(key).as_text()


def test_only_the_initialisation_takes_the_unrolled_threefry_and_the_cpu_lowering_is_restored_after_an_error():
    key = jax.random.key(0)
    assert _has_while_loop(key)  # jax's CPU lowering: a rolled loop, what the train step keeps
    with unrolled_threefry_on_cpu():
        assert not _has_while_loop(key)
    assert _has_while_loop(key)
    with pytest.raises(RuntimeError), unrolled_threefry_on_cpu():
        raise RuntimeError("a failed build")
    assert _has_while_loop(key)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_the_optimiser_state_made_on_the_host_is_optaxs_init_leaf_for_leaf(grad_clip):
    config = default_config.resolve(default_config.get_config("smoke"))
    with config.unlocked():
        config.grad_clip = grad_clip
    model = create_model("swinv2_nano_window4_64", 10, nnx.Rngs(0), depths=(1, 1, 1, 1))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    optimizer = make_optimizer(config, params, steps_per_epoch=6)
    want, got = jax.jit(optimizer.init)(params), initial_optimizer_state(optimizer, params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert len(jax.tree.leaves(want)) > 2 * len(jax.tree.leaves(params))  # the moments and the counts
    for leaf, reference in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == reference.dtype and leaf.shape == reference.shape
        np.testing.assert_array_equal(leaf, np.asarray(reference))
