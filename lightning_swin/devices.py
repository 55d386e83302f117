"""The devices the Lightning stack trains on: their shared description string, their arithmetic, their peak memory."""

from __future__ import annotations

import os
from typing import Any

import torch

from shared_data import environment, tags


def device_description(config: dict[str, Any]) -> str:
    """The shared device string for the devices `config` trains on (shared_data.environment.device_description),
    e.g. 'cuda: NVIDIA H200 x1' or 'cpu: AMD EPYC (AVX2) x2 cores'."""
    if config["accelerator"] != "cpu" and torch.cuda.is_available():
        return environment.device_description("cuda", torch.cuda.get_device_name(0), torch.cuda.device_count())
    return environment.device_description("cpu", "", os.cpu_count() or 1)


def set_arithmetic(precision: str) -> None:
    """Make --precision `precision` ('fp32' or 'bf16') the same arithmetic as the Flax stack's (see arithmetic).

    fp32 is full float32 in both stacks: torch's float32 matmuls already are (float32_matmul_precision 'highest'),
    but cuDNN would run the patch-embedding convolution in TF32, so that is turned off. bf16 is Lightning's
    bf16-mixed autocast, which the model completes into shared_data.tags's definition.
    """
    torch.backends.cudnn.allow_tf32 = precision != "fp32"


def arithmetic(precision: str) -> str:
    """What --precision `precision` computes in this process, for config.json's "arithmetic" (the runs table)."""
    settings = (f"float32_matmul_precision {torch.get_float32_matmul_precision()}, "
                f"cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}")
    if precision == "bf16":
        return f"{tags.BF16_SUMMARY} (torch autocast bf16-mixed; {settings})"
    return f"float32 ({settings})"


def device_peak_mb(device: torch.device) -> float | None:
    """Peak MiB allocated on `device` by this process, where it reports memory (CUDA; not CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
