"""The devices the Flax stack trains on: their shared description string, their arithmetic, their peak memory."""

from __future__ import annotations

import jax

from shared_data import environment, tags


def device_description() -> str:
    """The shared device string for this process's devices (shared_data.environment.device_description), e.g.
    'cuda: NVIDIA H200 x1' or 'cpu: AMD EPYC (AVX2) x2 cores'."""
    device = jax.devices()[0]
    return environment.device_description(device.platform, device.device_kind, len(jax.devices()))


def set_arithmetic(precision: str) -> None:
    """Make --precision `precision` ('fp32' or 'bf16') the same arithmetic as the Lightning stack's (see arithmetic).

    fp32 is full float32 in both stacks: on a GPU, XLA's default precision would use TF32 for float32 matmuls and
    convolutions, where torch keeps full float32, so jax_default_matmul_precision is 'highest' (no effect on a CPU).
    bf16 is the model built with dtype bfloat16 (steps.create_model_and_state), which follows shared_data.tags's
    definition.
    """
    if precision == "fp32":
        jax.config.update("jax_default_matmul_precision", "highest")


def arithmetic(precision: str) -> str:
    """What --precision `precision` computes in this process, for config.json's "arithmetic" (the runs table)."""
    settings = f"jax_default_matmul_precision {jax.config.jax_default_matmul_precision or 'default'}"
    if precision == "bf16":
        return f"{tags.BF16_SUMMARY} (model dtype bfloat16; {settings})"
    return f"float32 ({settings})"


def device_peak_mb() -> float | None:
    """Peak MiB in use on the first local device, where the backend reports it (GPU, TPU; not CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # backends without memory statistics raise rather than return None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20
