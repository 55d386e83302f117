"""Swin V2 named variants (the official model zoo plus a nano model for smoke runs) and config checks."""

from __future__ import annotations

from typing import Any

# Widths, depths and heads per size, as in the official Swin V2 configs.
_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.5),
}

# Window schedules: (suffix, img_size, window_size, pretrained_window_sizes). The "12toN" ones are
# the official fine-tunes of a window-12, 192px ImageNet-22k model, whose last stage ran at 6x6.
_WINDOWS = (
    ("window8_256", 256, 8, (0, 0, 0, 0)),
    ("window16_256", 256, 16, (0, 0, 0, 0)),
    ("window12_192", 192, 12, (0, 0, 0, 0)),
    ("window12to16_192to256", 256, 16, (12, 12, 12, 6)),
    ("window12to24_192to384", 384, 24, (12, 12, 12, 6)),
)

VARIANTS: dict[str, dict[str, Any]] = {
    f"swinv2_{size}_{suffix}": dict(
        img_size=img_size, window_size=window, pretrained_window_sizes=pretrained, **arch
    )
    for size, arch in _SIZES.items()
    for suffix, img_size, window, pretrained in _WINDOWS
}
# A model small enough to train a few epochs on a 2-core CPU in a minute; its last two stages
# are smaller than the window, so smoke runs also exercise window clipping.
VARIANTS["swinv2_nano_window4_64"] = dict(
    img_size=64, window_size=4, pretrained_window_sizes=(0, 0, 0, 0),
    embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.1,
)


def variant_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of a named variant, with overrides applied and checked."""
    if name not in VARIANTS:
        raise ValueError(f"--model: unknown variant {name!r}; choose one of: {', '.join(sorted(VARIANTS))}")
    config = dict(VARIANTS[name])
    config.update({k: v for k, v in overrides.items() if v is not None})
    check_config(**config)
    return config


def stage_resolutions(img_size: int, patch_size: int, num_stages: int) -> list[int]:
    """Token-grid side length of each stage."""
    side = img_size // patch_size
    return [side // (2**i) for i in range(num_stages)]


def effective_window(resolution: int, window_size: int) -> tuple[int, bool]:
    """(window, shifted?) of a stage: a window at least as large as the stage is clipped to it and not shifted."""
    if resolution <= window_size:
        return resolution, False
    return window_size, True


def check_config(
    img_size: int,
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    window_size: int,
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0),
    patch_size: int = 4,
    **_: Any,
) -> None:
    """Raise ValueError naming the value to change when a Swin V2 configuration cannot work."""
    stages = len(depths)
    if len(num_heads) != stages:
        raise ValueError(f"num_heads has {len(num_heads)} entries but depths has {stages}: give one per stage")
    if len(pretrained_window_sizes) != stages:
        raise ValueError(
            f"pretrained_window_sizes has {len(pretrained_window_sizes)} entries but there are {stages} stages"
        )
    if window_size < 1:
        raise ValueError(f"window_size must be positive, got {window_size}")
    factor = patch_size * 2 ** (stages - 1)
    if img_size <= 0 or img_size % factor:
        raise ValueError(
            f"img_size {img_size} must be a multiple of {factor} (patch {patch_size} x 2^{stages - 1} merges); "
            f"change --img-size to e.g. {max(factor, round(img_size / factor) * factor)}"
        )
    for i, (resolution, heads) in enumerate(zip(stage_resolutions(img_size, patch_size, stages), num_heads)):
        width = embed_dim * 2**i
        if width % heads:
            raise ValueError(f"stage {i}: {heads} heads do not divide width {width}; change num_heads or embed_dim")
        window, _ = effective_window(resolution, window_size)
        if resolution % window:
            raise ValueError(
                f"stage {i}: resolution {resolution} is not a multiple of window_size {window_size}; "
                f"change window_size or img_size"
            )
