"""Analytic forward FLOPs per image of a Swin V2 variant (matrix multiplies, 2 FLOPs per multiply-add)."""

from __future__ import annotations

import argparse
from typing import Any

from shared_data.variants import effective_window, stage_resolutions, variant_config

# The continuous position bias MLP of every block maps (dy, dx) log-coordinates through a hidden layer
# of this width (Swin V2 paper, section 3.3; the same width in the official code and timm).
CPB_HIDDEN = 512


def _block_macs(tokens: int, width: int, heads: int, window: int, mlp_ratio: float) -> int:
    """Multiply-adds of one Swin V2 block on `tokens` tokens of `width` channels in windows of window x window."""
    window_tokens = window * window
    qkv = tokens * width * 3 * width
    # q @ k^T and attn @ v: every token meets every token of its window, across all heads' channels.
    attention = 2 * tokens * window_tokens * width
    projection = tokens * width * width
    mlp = 2 * tokens * width * int(width * mlp_ratio)
    # The bias table is computed once per forward pass, whatever the batch size.
    table_entries = (2 * window - 1) ** 2
    position_bias = table_entries * (2 * CPB_HIDDEN + CPB_HIDDEN * heads)
    return qkv + attention + projection + mlp + position_bias


def forward_macs(
    img_size: int,
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    window_size: int,
    num_classes: int = 1000,
    patch_size: int = 4,
    in_chans: int = 3,
    mlp_ratio: float = 4.0,
    **_: Any,
) -> int:
    """Multiply-adds of one image's forward pass; norms, softmax and activations are left out (a few percent)."""
    stages = len(depths)
    resolutions = stage_resolutions(img_size, patch_size, stages)
    macs = resolutions[0] ** 2 * (in_chans * patch_size * patch_size) * embed_dim  # patch embedding conv
    for stage, (resolution, depth, heads) in enumerate(zip(resolutions, depths, num_heads)):
        width = embed_dim * 2**stage
        window, _ = effective_window(resolution, window_size)
        macs += depth * _block_macs(resolution**2, width, heads, window, mlp_ratio)
        if stage < stages - 1:
            # Patch merging: each 2x2 group of tokens (4C channels) is projected to 2C.
            macs += (resolution // 2) ** 2 * (4 * width) * (2 * width)
    macs += embed_dim * 2 ** (stages - 1) * num_classes
    return macs


def forward_flops(model: str, img_size: int | None = None, num_classes: int = 1000, **overrides: Any) -> int:
    """Forward FLOPs (2 per multiply-add) per image of the named variant, e.g. `swinv2_tiny_window8_256`."""
    config = variant_config(model, img_size=img_size, **overrides)
    return 2 * forward_macs(num_classes=num_classes, **config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="swinv2_tiny_window8_256", help="Swin V2 variant name")
    parser.add_argument("--img-size", type=int, default=None, help="input side (default: the variant's)")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        flops = forward_flops(args.model, img_size=args.img_size, num_classes=args.num_classes)
    except ValueError as error:
        raise SystemExit(f"model_flops.py: {error}") from None
    print(f"{args.model}: {flops / 1e9:.3f} GFLOPs forward per image ({flops / 2e9:.3f} GMACs)")
    return 0
