"""The Flax model's construction: its quicker compilation keeps the parameters a seed gives, bit for bit."""

import jax
import numpy as np
from flax import nnx

from flax_swin.model import create_model
from flax_swin.steps import INIT_COMPILER_OPTIONS, build_model


def _leaves(model: nnx.Module) -> list[np.ndarray]:
    def host(leaf: jax.Array) -> np.ndarray:
        return np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)

    return [host(leaf) for leaf in jax.tree.leaves(nnx.state(model))]


def test_the_initialisations_compiler_options_give_the_seeds_parameters_bit_for_bit():
    # Every kind of initialiser the variants use (truncated normal, zeros, ones, the log logit scale, the position
    # tables), in one block per stage; the default options are the reference the seed's parameters were made with.
    def build() -> nnx.Module:
        return create_model("swinv2_nano_window4_64", 10, nnx.Rngs(params=3, dropout=3), depths=(1, 1, 1, 1))

    assert INIT_COMPILER_OPTIONS  # with none, this test would compare the default with itself
    graphdef, state = jax.jit(lambda: nnx.split(build()))()
    reference, built = _leaves(nnx.merge(graphdef, state)), _leaves(build_model(build))
    assert len(built) == len(reference) > 50
    for got, want in zip(built, reference):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
