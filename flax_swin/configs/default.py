"""get_config(): the Flax stack's ml_collections.ConfigDict, built from shared_data.run_config's defaults."""

from __future__ import annotations

import argparse
from typing import Any

import ml_collections

from shared_data import run_config

STACK = "flax"
# Flags only the Flax stack has; every shared hyperparameter lives in shared_data.run_config.
STACK_DEFAULTS: dict[str, Any] = dict(
    profile_steps=None,  # "first,last" global steps to trace with jax.profiler, e.g. "5,10"
)


def add_stack_flags(parser: argparse.ArgumentParser) -> None:
    """The flags only this stack has (beside shared_data.run_config's)."""
    group = parser.add_argument_group("JAX/Flax")
    group.add_argument("--profile-steps", metavar="FIRST,LAST",
                       help="write a jax.profiler trace of global steps FIRST..LAST into <run>/profile "
                            "(TensorBoard's profile plugin), e.g. 5,10")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The shared defaults with `preset` applied; None values are derived at run time (see resolve)."""
    return ml_collections.ConfigDict(run_config.preset_values(preset, STACK_DEFAULTS))


def resolve(config: ml_collections.ConfigDict | dict[str, Any]) -> ml_collections.ConfigDict:
    """Fill the derived values (lr, img_size, drop path, run folder) and check every flag; raises ConfigError."""
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    stack_values = {key: values.pop(key, default) for key, default in STACK_DEFAULTS.items()}
    resolved = run_config.resolve(values, STACK)
    parse_profile_steps(stack_values["profile_steps"])
    resolved.update(stack_values)
    return ml_collections.ConfigDict(resolved)


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
    """'5,10' -> (5, 10): trace global steps 5 to 10 inclusive; raises ConfigError naming the flag."""
    if not text:
        return None
    parts = text.split(",")
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last:
        raise run_config.ConfigError(
            f"--profile-steps must be 'FIRST,LAST' global steps with 1 <= FIRST <= LAST, got {text!r}")
    return first, last
