"""Canonical (official-named, torch-layout numpy) Swin V2 weights <-> Flax NNX parameters, lossless both ways."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from shared_data.swin_weights import LoadReport, WeightsFormatError, canonicalize, read_weights

HEAD_KEYS = ("head.weight", "head.bias")
# safetensors metadata value that shared_data.swin_weights reads back as the "flax" format.
FLAX_FORMAT = "flax"


def canonical_name(path: tuple[Any, ...]) -> str:
    """Flax state path -> official parameter name.

    Three renames: nnx.Sequential keeps its items under `layers` (`cpb_mlp.layers.0` is `cpb_mlp.0`), and
    Linear/Conv `kernel` and LayerNorm `scale` are torch's `weight`.
    """
    parts = [str(part) for part in path]
    parts = [part for i, part in enumerate(parts) if not (part == "layers" and i > 0 and parts[i - 1] == "cpb_mlp")]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_torch_layout(path: tuple[Any, ...], value: np.ndarray) -> np.ndarray:
    """Linear kernels are [in, out] in Flax and [out, in] in torch; conv kernels HWIO vs OIHW."""
    if str(path[-1]) == "kernel":
        value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    return np.ascontiguousarray(value)


def _to_flax_layout(path: tuple[Any, ...], value: np.ndarray) -> np.ndarray:
    if str(path[-1]) == "kernel":
        value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(value)


def _flat_params(model: nnx.Module | nnx.State) -> list[tuple[tuple[Any, ...], nnx.Variable]]:
    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)
    return list(nnx.to_flat_state(state))


def to_canonical(model: nnx.Module | nnx.State) -> dict[str, np.ndarray]:
    """Every parameter of `model` (or of a Param state, e.g. its gradients) under its official name, torch layout."""
    return {
        canonical_name(path): _to_torch_layout(path, np.asarray(variable.get_value()))
        for path, variable in _flat_params(model)
    }


def canonical_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Official name -> torch-layout shape of every parameter the model expects (no copies made)."""
    shapes = {}
    for path, variable in _flat_params(model):
        shape = tuple(variable.get_value().shape)
        if str(path[-1]) == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        shapes[canonical_name(path)] = shape
    return shapes


def from_canonical(model: nnx.Module, weights: Mapping[str, np.ndarray], *, source: str = "<weights>") -> list[str]:
    """Set every parameter of `model` from official-named torch-layout arrays, in place; returns the names set.

    Strict: raises WeightsFormatError listing missing, unexpected and mis-shaped keys, and changes nothing then.
    """
    flat = _flat_params(model)
    expected = {canonical_name(path): (path, variable) for path, variable in flat}
    expected_shapes = canonical_shapes(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(np.shape(weights[key]))} vs model {expected_shapes[key]}"
        for key in set(weights) & set(expected)
        if tuple(np.shape(weights[key])) != expected_shapes[key]
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise WeightsFormatError(f"{source}: weights do not fit the model; " + "; ".join(problems))

    updates = []
    for name, (path, variable) in expected.items():
        value = _to_flax_layout(path, np.asarray(weights[name]))
        updates.append((path, jnp.asarray(value, dtype=variable.get_value().dtype)))
    state = nnx.state(model, nnx.Param)
    state_flat = dict(nnx.to_flat_state(state))
    for path, value in updates:
        state_flat[path].set_value(value)
    nnx.update(model, nnx.from_flat_state(state_flat))
    return sorted(expected)


def load_pretrained(model: nnx.Module, path_or_dict: str | Path | Mapping[str, Any]) -> LoadReport:
    """Copy weights from any readable file (or in-memory state dict) into `model` in place.

    Raises WeightsFormatError listing missing, unexpected or mis-shaped keys. Derived buffers are never loaded,
    so weights from another window size or resolution load as long as the parameter shapes agree. A head of a
    different size (or none) leaves the model's own head at its init, and the report says so.
    """
    if isinstance(path_or_dict, Mapping):
        source = "<state dict>"
        state, fmt = canonicalize(path_or_dict, source=source)
    else:
        source = str(path_or_dict)
        state, fmt = read_weights(path_or_dict)
    report = LoadReport(source=source, fmt=fmt)
    targets = canonical_shapes(model)

    head_shapes = {key: targets[key] for key in HEAD_KEYS if key in targets}
    given_head = {key: tuple(state[key].shape) for key in HEAD_KEYS if key in state}
    if head_shapes != given_head:
        for key in HEAD_KEYS:
            state.pop(key, None)
        current = to_canonical(model)
        for key in head_shapes:
            state[key] = current[key]  # keep the model's own head at its init
        report.head_replaced = True
        report.head_note = f"head {_describe_head(given_head)} replaced by the model's {_describe_head(head_shapes)} at init"

    loaded = from_canonical(model, state, source=f"{source} ({fmt} format)")
    report.loaded = [name for name in loaded if not (report.head_replaced and name in HEAD_KEYS)]
    return report


def save_safetensors(weights: Mapping[str, np.ndarray], path: str | Path, *, fmt: str = FLAX_FORMAT,
                     config: Mapping[str, Any] | None = None) -> None:
    """Write official-named torch-layout arrays as safetensors, with the format and model config as metadata.

    Written to a temporary name first and renamed, so a crash never leaves a half-written file at `path`.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    metadata = {"format": fmt}
    if config is not None:
        metadata["config"] = json.dumps(dict(config), sort_keys=True)
    partial = path.with_name(path.name + ".partial")
    save_file({key: np.ascontiguousarray(value) for key, value in weights.items()}, str(partial), metadata=metadata)
    partial.replace(path)


def read_safetensors_config(path: str | Path) -> dict[str, Any] | None:
    """The model config stored by save_safetensors, or None when the file carries none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        text = (handle.metadata() or {}).get("config")
    return json.loads(text) if text else None


def _describe_head(shapes: Mapping[str, tuple[int, ...]]) -> str:
    weight = shapes.get("head.weight")
    return f"with {weight[0]} classes" if weight else "(absent)"
