"""Load canonical (official-named) Swin V2 weights into the torch model: strict keys, head replacement reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from shared_data.swin_weights import LoadReport, WeightsFormatError, canonicalize, read_weights

HEAD_KEYS = ("head.weight", "head.bias")


def load_pretrained(model: nn.Module, path_or_dict: str | Path | Mapping[str, Any]) -> LoadReport:
    """Copy weights into `model` in place; raises WeightsFormatError listing missing, unexpected or mis-shaped keys.

    Derived buffers are never loaded, so weights from another window size or resolution load as long as the
    parameter shapes agree. A head of a different size (or none) leaves the model's own head at its init.
    """
    if isinstance(path_or_dict, Mapping):
        source = "<state dict>"
        state, fmt = canonicalize(path_or_dict, source=source)
    else:
        source = str(path_or_dict)
        state, fmt = read_weights(path_or_dict)
    report = LoadReport(source=source, fmt=fmt)
    targets = model.state_dict()  # persistent entries only: parameters, no derived buffers

    head_shapes = {key: tuple(targets[key].shape) for key in HEAD_KEYS if key in targets}
    given_head = {key: tuple(state[key].shape) for key in HEAD_KEYS if key in state}
    if head_shapes != given_head:
        for key in HEAD_KEYS:
            state.pop(key, None)
        targets = {key: value for key, value in targets.items() if key not in HEAD_KEYS}
        report.head_replaced = True
        report.head_note = (
            f"head {_describe_head(given_head)} replaced by the model's {_describe_head(head_shapes)} at init"
        )

    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    mismatched = sorted(
        f"{key} {tuple(state[key].shape)} vs model {tuple(targets[key].shape)}"
        for key in set(state) & set(targets)
        if tuple(state[key].shape) != tuple(targets[key].shape)
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise WeightsFormatError(f"{source}: weights do not fit the model ({fmt} format); " + "; ".join(problems))

    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(torch.from_numpy(np.ascontiguousarray(state[key])).to(target.dtype))
    report.loaded = sorted(targets)
    return report


def _describe_head(shapes: Mapping[str, tuple[int, ...]]) -> str:
    weight = shapes.get("head.weight")
    return f"with {weight[0]} classes" if weight else "(absent)"
