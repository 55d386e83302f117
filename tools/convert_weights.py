"""Convert Swin V2 weights between any readable format (a Flax run included) and our Flax or PyTorch files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shared_data.swin_weights import CHECKPOINT_CHOICES, WeightsFormatError, find_run_config, read_source
from shared_data.variants import VARIANTS, variant_config

TORCH_SUFFIXES = (".pth", ".pt")
OUTPUT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Convert Swin V2 weights. Input: an official Microsoft .pth (a training checkpoint too), a timm or "
            "torchvision state dict, a Lightning checkpoint, our Flax safetensors, or a run folder of either stack "
            "(its best or latest checkpoint; a Flax step folder <run>/checkpoints/<step> too). Output --to flax: a "
            "safetensors of official-named arrays whose metadata holds format=flax and the model config (loads with "
            "no flags). Output --to torch: official names in torch layouts, which the official code and timm load: "
            "a .pth holding {'model': state_dict} as the official releases do, or a flat .safetensors. Every "
            "conversion loads the weights into the Flax model with strict key checks and reads them back, so a file "
            "that does not fit fails loudly."
        )
    )
    parser.add_argument("input", type=Path, help="weights file, run folder or Flax step folder to read")
    parser.add_argument("output", type=Path, help=f"file to write ({', '.join(OUTPUT_SUFFIXES)})")
    parser.add_argument(
        "--to", choices=("flax", "torch"), default=None,
        help="target format (default: torch when the input is Flax (an export or a run), else flax)",
    )
    parser.add_argument(
        "--model", default=None,
        help="variant name (shared_data.variants); needed unless the input is a run folder or a Flax export, "
             "which record it",
    )
    parser.add_argument("--num-classes", type=int, default=None, help="head size (default: the input's head)")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help="which checkpoint of a run folder: the best by validation accuracy (default) or "
                             "the latest")
    return parser.parse_args(argv)


def convert(input_path: Path, output_path: Path, to: str | None = None, model_name: str | None = None,
            num_classes: int | None = None, checkpoint: str = "best") -> str:
    """Do the conversion; returns a one-line summary. Raises WeightsFormatError/ValueError with a clear message."""
    from flax import nnx

    from flax_swin.model import SwinTransformerV2
    from flax_swin.weights import from_canonical, read_safetensors_config, save_safetensors, to_canonical

    if output_path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {output_path}: unknown suffix; use one of {', '.join(OUTPUT_SUFFIXES)}")
    weights, fmt, source = read_source(input_path, checkpoint)
    to = to or ("torch" if fmt == "flax" else "flax")
    if to == "flax" and output_path.suffix != ".safetensors":
        raise ValueError(f"output {output_path}: the Flax format is a .safetensors file; change the suffix")

    if num_classes is None:
        num_classes = int(weights["head.weight"].shape[0]) if "head.weight" in weights else 0
    config = _model_config(input_path, model_name, num_classes, read_safetensors_config)
    variant = {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()
               if key not in ("model", "num_classes")}
    # Shapes only: the weights about to be loaded replace every parameter, so random init would be wasted work.
    model = nnx.eval_shape(lambda: SwinTransformerV2(num_classes=num_classes, rngs=nnx.Rngs(0), **variant))
    from_canonical(model, weights, source=f"{source} ({fmt} format)")
    canonical = to_canonical(model)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    if to == "flax":
        save_safetensors(canonical, output_path, config=config)
    elif output_path.suffix == ".safetensors":
        save_safetensors(canonical, output_path, fmt="official")
    else:
        import torch

        partial = output_path.with_name(output_path.name + ".partial")
        # The official release layout: the official code reads checkpoint["model"], and timm unwraps it too.
        torch.save({"model": {key: torch.from_numpy(np.array(value)) for key, value in canonical.items()}}, partial)
        partial.replace(output_path)
    count = sum(value.size for value in canonical.values())
    return f"{source} ({fmt}) -> {output_path} ({to}): {len(canonical)} tensors, {count / 1e6:.2f}M parameters"


def _model_config(input_path: Path, model_name: str | None, num_classes: int, stored_config: Any) -> dict[str, Any]:
    """The variant's complete keyword arguments (so the output rebuilds its model without the variant table), from
    --model, else the Flax export's metadata, else the config.json of the run the input belongs to."""
    if model_name is not None:
        return {"model": model_name, "num_classes": num_classes, **variant_config(model_name)}
    stored = stored_config(input_path) if input_path.suffix == ".safetensors" else None
    if stored is not None:
        return {**stored, "num_classes": num_classes}
    run = find_run_config(input_path)
    if run is not None and run.get("model") in VARIANTS:
        return {"model": run["model"], "num_classes": num_classes,
                **variant_config(run["model"], img_size=run.get("img_size"))}
    raise ValueError(f"--model: {input_path} does not record its variant; give one of {', '.join(sorted(VARIANTS))}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(convert(args.input, args.output, args.to, args.model, args.num_classes, args.checkpoint))
    except (WeightsFormatError, ValueError) as error:
        print(f"convert_weights: {error}", file=sys.stderr)
        return 2
    return 0
