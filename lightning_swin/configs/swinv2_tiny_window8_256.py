"""The origin's setting: Swin V2 tiny, window 8, 256x256 images, batch 32."""

from typing import Any

from lightning_swin.configs import default


def get_config() -> dict[str, Any]:
    """The `swinv2_tiny_window8_256` preset as a config dict (see default.get_config)."""
    return default.get_config(preset="swinv2_tiny_window8_256")
