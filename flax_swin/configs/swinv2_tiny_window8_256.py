"""The origin's setting: Swin V2 tiny, window 8, 256x256 images, batch 32."""

import ml_collections

from flax_swin.configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config(preset="swinv2_tiny_window8_256")
