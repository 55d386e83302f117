"""Convert Swin V2 weights between any readable format and our Flax safetensors (and back to a PyTorch state dict)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shared_data.swin_weights import WeightsFormatError, read_weights
from shared_data.variants import VARIANTS

TORCH_SUFFIXES = (".pth", ".pt")
OUTPUT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Convert Swin V2 weights. Input: an official Microsoft .pth, a timm or torchvision state dict, a "
            "Lightning checkpoint, or our Flax safetensors. Output --to flax: a safetensors of official-named "
            "arrays whose metadata holds format=flax and the model config (loads with no flags). Output --to torch: "
            "an official-named PyTorch state dict, .pth or .safetensors. Every conversion loads the weights into "
            "the Flax model with strict key checks and reads them back, so a file that does not fit fails loudly."
        )
    )
    parser.add_argument("input", type=Path, help="weights file to read")
    parser.add_argument("output", type=Path, help=f"file to write ({', '.join(OUTPUT_SUFFIXES)})")
    parser.add_argument(
        "--to", choices=("flax", "torch"), default=None,
        help="target format (default: torch when the input is a Flax export, else flax)",
    )
    parser.add_argument(
        "--model", default=None,
        help="variant name (shared_data.variants); needed unless the input is a Flax export that records it",
    )
    parser.add_argument("--num-classes", type=int, default=None, help="head size (default: the input's head)")
    return parser.parse_args(argv)


def convert(input_path: Path, output_path: Path, to: str | None = None, model_name: str | None = None,
            num_classes: int | None = None) -> str:
    """Do the conversion; returns a one-line summary. Raises WeightsFormatError/ValueError with a clear message."""
    from flax import nnx

    from flax_swin.model import SwinTransformerV2, create_model
    from flax_swin.weights import from_canonical, read_safetensors_config, save_safetensors, to_canonical

    if output_path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {output_path}: unknown suffix; use one of {', '.join(OUTPUT_SUFFIXES)}")
    weights, fmt = read_weights(input_path)
    to = to or ("torch" if fmt == "flax" else "flax")
    if to == "flax" and output_path.suffix != ".safetensors":
        raise ValueError(f"output {output_path}: the Flax format is a .safetensors file; change the suffix")

    stored = read_safetensors_config(input_path) if input_path.suffix == ".safetensors" else None
    if model_name is None and stored is None:
        raise ValueError(f"--model: {input_path} does not record its variant; give one of {', '.join(sorted(VARIANTS))}")
    if num_classes is None:
        num_classes = int(weights["head.weight"].shape[0]) if "head.weight" in weights else 0
    if model_name is not None:
        config: dict[str, Any] = {"model": model_name, "num_classes": num_classes}
        build = lambda: create_model(model_name, num_classes, nnx.Rngs(0))  # noqa: E731
    else:
        config = {**stored, "num_classes": num_classes}
        variant = {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()
                   if key not in ("model", "num_classes")}
        build = lambda: SwinTransformerV2(num_classes=num_classes, rngs=nnx.Rngs(0), **variant)  # noqa: E731
    # Shapes only: the weights about to be loaded replace every parameter, so random init would be wasted work.
    model = nnx.eval_shape(build)
    from_canonical(model, weights, source=f"{input_path} ({fmt} format)")
    canonical = to_canonical(model)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    if to == "flax":
        save_safetensors(canonical, output_path, config=_full_config(config))
    elif output_path.suffix == ".safetensors":
        save_safetensors(canonical, output_path, fmt="official")
    else:
        import torch

        partial = output_path.with_name(output_path.name + ".partial")
        torch.save({key: torch.from_numpy(np.array(value)) for key, value in canonical.items()}, partial)
        partial.replace(output_path)
    count = sum(value.size for value in canonical.values())
    return f"{input_path} ({fmt}) -> {output_path} ({to}): {len(canonical)} tensors, {count / 1e6:.2f}M parameters"


def _full_config(config: dict[str, Any]) -> dict[str, Any]:
    """The variant's complete keyword arguments, so the file rebuilds its model without the variant table."""
    if "model" not in config or config["model"] not in VARIANTS:
        return config
    from shared_data.variants import variant_config

    return {"model": config["model"], "num_classes": config["num_classes"], **variant_config(config["model"])}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(convert(args.input, args.output, args.to, args.model, args.num_classes))
    except (WeightsFormatError, ValueError) as error:
        print(f"convert_weights: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
