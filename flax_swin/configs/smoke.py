"""The `smoke` preset: a nano model on a small synthetic set, a whole run in under two minutes on CPU."""

import ml_collections

from flax_swin.configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config(preset="smoke")
