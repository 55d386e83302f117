"""ImageNet per-channel normalisation constants, defined once for both stacks (+ a numpy reference)."""

from __future__ import annotations

import numpy as np

# On the 0..1 scale: each stack computes (x / 255 - MEAN) / STD in float32 on its device.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalize_numpy(images: np.ndarray) -> np.ndarray:
    """Reference normalisation of uint8 NHWC images, what each stack's on-device version must match."""
    mean = np.asarray(MEAN, dtype=np.float32)
    std = np.asarray(STD, dtype=np.float32)
    return (images.astype(np.float32) / np.float32(255) - mean) / std
