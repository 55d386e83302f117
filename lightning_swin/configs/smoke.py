"""The `smoke` preset: a nano model on a small synthetic set, a whole run in under two minutes on CPU."""

from typing import Any

from lightning_swin.configs import default


def get_config() -> dict[str, Any]:
    """The `smoke` preset as a config dict (see default.get_config)."""
    return default.get_config(preset="smoke")
