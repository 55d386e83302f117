"""Canonical (official-named, torch-layout numpy) Swin V2 weights <-> Flax NNX parameters, lossless both ways."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from shared_data.swin_weights import (
    HEAD_KEYS,
    LoadReport,
    check_fit,
    flax_to_official,
    flax_to_torch_layout,
    read_source,
    torch_to_flax_layout,
)

# safetensors metadata value that shared_data.swin_weights reads back as the "flax" format.
FLAX_FORMAT = "flax"


def _flat_params(model: nnx.Module | nnx.State) -> list[tuple[tuple[Any, ...], nnx.Variable]]:
    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)
    return list(nnx.to_flat_state(state))


def to_canonical(model: nnx.Module | nnx.State) -> dict[str, np.ndarray]:
    """Every parameter of `model` (or of a Param state, e.g. its gradients) under its official name, torch layout."""
    return {
        flax_to_official(path): flax_to_torch_layout(path, np.asarray(variable.get_value()))
        for path, variable in _flat_params(model)
    }


def canonical_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Official name -> torch-layout shape of every parameter the model expects (no copies made)."""
    shapes = {}
    for path, variable in _flat_params(model):
        shape = tuple(variable.get_value().shape)
        if str(path[-1]) == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        shapes[flax_to_official(path)] = shape
    return shapes


def from_canonical(model: nnx.Module, weights: Mapping[str, np.ndarray], *, source: str = "<weights>") -> list[str]:
    """Set every parameter of `model` from official-named torch-layout arrays, in place; returns the names set.

    Strict: raises WeightsFormatError listing missing, unexpected and mis-shaped keys, and changes nothing then.
    """
    check_fit(weights, canonical_shapes(model), source)
    state = nnx.state(model, nnx.Param)
    state_flat = dict(nnx.to_flat_state(state))
    for path, variable in state_flat.items():
        value = torch_to_flax_layout(path, np.asarray(weights[flax_to_official(path)]))
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
    nnx.update(model, nnx.from_flat_state(state_flat))
    return sorted(flax_to_official(path) for path in state_flat)


def load_pretrained(model: nnx.Module, path_or_dict: str | Path | Mapping[str, Any],
                    checkpoint: str = "best") -> LoadReport:
    """Copy weights into `model` in place; raises WeightsFormatError listing missing, unexpected or mis-shaped keys.

    Reads what shared_data.swin_weights.read_source reads: any weights file, a run folder of either stack (its
    `checkpoint`, best or latest) or an in-memory state dict. Derived buffers are never loaded, so weights from
    another window size or resolution load as long as the parameter shapes agree. A head of a different size (or
    none) leaves the model's own head at its init, and the report says so.
    """
    state, fmt, source = read_source(path_or_dict, checkpoint)
    report = LoadReport(source=source, fmt=fmt)
    if report.drop_foreign_head(state, canonical_shapes(model)):
        current = to_canonical(model)
        state.update({key: current[key] for key in HEAD_KEYS if key in current})  # the model's own head, at init
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
