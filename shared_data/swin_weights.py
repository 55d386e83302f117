"""Read any Swin V2 weights file (official, timm, torchvision, Lightning, safetensors) as official-named arrays."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

# Buffers every implementation derives from its configuration; loading them would pin the window size.
DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")
FORMATS = ("official", "timm", "torchvision", "lightning", "flax")

_TORCHVISION_STAGE = re.compile(r"^features\.(\d+)\.(.*)$")
_TIMM_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


class WeightsFormatError(ValueError):
    """A weights file or state dict that cannot be read as Swin V2 weights; the message names the source."""


def read_weights(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """Load `path` (.pth/.pt/.ckpt via torch.load(weights_only=True), or .safetensors) -> (arrays, format).

    The format is one of FORMATS; derived buffers are dropped; unknown keys are kept so the loader can report them.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFormatError(f"{path}: not a weights file (missing, or a directory); check the path")
    raw, declared = _load_file(path)
    state, fmt = canonicalize(raw, source=str(path))
    return state, declared or fmt


def canonicalize(raw: Mapping[str, Any], source: str = "<state dict>") -> tuple[dict[str, np.ndarray], str]:
    """An in-memory checkpoint or state dict of any supported format -> (official-named float arrays, format)."""
    state, fmt = _unwrap(raw, source)
    if fmt == "lightning":
        state = {key.removeprefix("model."): value for key, value in state.items()}
    state = {key.replace("_orig_mod.", ""): value for key, value in state.items()}
    if fmt is None:
        fmt = _detect_flat_format(state)
    if fmt == "torchvision":
        state = _from_torchvision(state, source)
    elif fmt == "timm":
        state = _from_timm(state)
    return {key: _to_numpy(value) for key, value in state.items() if not key.endswith(DERIVED_BUFFERS)}, fmt


def _load_file(path: Path) -> tuple[Mapping[str, Any], str | None]:
    """(raw mapping, format declared in safetensors metadata or None)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                raw = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own untyped errors for corrupt headers
            raise WeightsFormatError(f"{path}: not a readable safetensors file ({error})") from None
        declared = metadata.get("format")
        return raw, declared if declared in FORMATS else None
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and allow-list failures all mean "not a plain weights file"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsFormatError(
            f"{path}: torch.load(weights_only=True) cannot read it ({first_line}); "
            f"give a state dict, an official/Lightning checkpoint or a .safetensors file"
        ) from None
    if not isinstance(raw, Mapping):
        raise WeightsFormatError(f"{path}: holds a {type(raw).__name__}, not a state dict; save model.state_dict()")
    return raw, None


def _unwrap(raw: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], str | None]:
    """Find the tensors inside a checkpoint container: official {'model': ...} or Lightning {'state_dict': ...}."""
    if isinstance(raw.get("model"), Mapping):
        return raw["model"], "official"
    inner = raw.get("state_dict")
    if isinstance(inner, Mapping):
        if any(key.startswith("model.") for key in inner):
            return inner, "lightning"
        return inner, None
    if not raw or not all(_is_array(value) for value in raw.values()):
        raise WeightsFormatError(
            f"{source}: unknown weights format (no 'model' or 'state_dict' entry and not a flat dict of tensors)"
        )
    return raw, None


def _detect_flat_format(state: Mapping[str, Any]) -> str:
    if any(key.startswith("features.") for key in state):
        return "torchvision"
    downsampled = {int(match.group(1)) for key in state if (match := _TIMM_DOWNSAMPLE.match(key))}
    # timm puts each PatchMerging at the start of the next stage, so stage 0 never has one there.
    if "head.fc.weight" in state or (downsampled and 0 not in downsampled):
        return "timm"
    return "official"


def _from_timm(state: Mapping[str, Any]) -> dict[str, Any]:
    """timm -> official: `layers.{i}.downsample` belongs to official stage i-1, and `head.fc.` is `head.`."""
    renamed = {}
    for key, value in state.items():
        key = _TIMM_DOWNSAMPLE.sub(lambda match: f"layers.{int(match.group(1)) - 1}.downsample.", key)
        renamed[key.replace("head.fc.", "head.", 1) if key.startswith("head.fc.") else key] = value
    return renamed


def _from_torchvision(state: Mapping[str, Any], source: str) -> dict[str, Any]:
    """torchvision `features.N` -> official names; its single qkv bias splits into q_bias and v_bias."""
    converted: dict[str, Any] = {}
    for key, value in state.items():
        match = _TORCHVISION_STAGE.match(key)
        if match is None:
            converted[key] = value  # norm.*, head.* already match; anything else is reported by the loader
            continue
        index, rest = int(match.group(1)), match.group(2)
        if index == 0:
            # features.0 is Sequential(conv, permute, norm).
            rest = rest.replace("0.", "proj.", 1) if rest.startswith("0.") else rest.replace("2.", "norm.", 1)
            converted[f"patch_embed.{rest}"] = value
        elif index % 2 == 1:
            block = re.sub(r"^(\d+)\.", r"blocks.\1.", rest)
            block = block.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
            if block.endswith(".attn.qkv.bias"):
                converted.update(_split_qkv_bias(f"layers.{(index - 1) // 2}.{block}", value, source))
            else:
                converted[f"layers.{(index - 1) // 2}.{block}"] = value
        else:
            converted[f"layers.{index // 2 - 1}.downsample.{rest}"] = value
    return converted


def _split_qkv_bias(key: str, bias: Any, source: str) -> dict[str, Any]:
    width = bias.shape[0] // 3
    k_slice = _to_numpy(bias[width : 2 * width])
    if np.any(k_slice != 0):
        raise WeightsFormatError(
            f"{source}: {key} has a non-zero key-bias slice (max |k| = {np.abs(k_slice).max():.3g}); "
            f"Swin V2 has no key bias, so these are not Swin V2 weights"
        )
    prefix = key.removesuffix("qkv.bias")
    return {f"{prefix}q_bias": bias[:width], f"{prefix}v_bias": bias[2 * width :]}


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    value = value.detach().cpu()
    if value.is_floating_point():
        # numpy has no bfloat16; float32 holds every half-precision value exactly.
        value = value.float()
    return value.numpy()


@dataclass
class LoadReport:
    """What load_pretrained did: where the weights came from and whether the head was kept at its init."""

    source: str
    fmt: str
    loaded: list[str] = field(default_factory=list)
    head_replaced: bool = False
    head_note: str = ""

    def __str__(self) -> str:
        text = f"loaded {len(self.loaded)} tensors from {self.source} ({self.fmt} format)"
        return f"{text}; {self.head_note}" if self.head_replaced else text
