"""Load canonical (official-named) Swin V2 weights into the torch model: strict keys, head replacement reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from shared_data.swin_weights import HEAD_KEYS, LoadReport, check_fit, read_source


def load_pretrained(model: nn.Module, path_or_dict: str | Path | Mapping[str, Any],
                    checkpoint: str = "best") -> LoadReport:
    """Copy weights into `model` in place; raises WeightsFormatError listing missing, unexpected or mis-shaped keys.

    Reads what shared_data.swin_weights.read_source reads: any weights file, a run folder of either stack (its
    `checkpoint`, best or latest) or an in-memory state dict. Derived buffers are never loaded, so weights from
    another window size or resolution load as long as the parameter shapes agree. A head of a different size (or
    none) leaves the model's own head at its init.
    """
    state, fmt, source = read_source(path_or_dict, checkpoint)
    report = LoadReport(source=source, fmt=fmt)
    targets = model.state_dict()  # persistent entries only: parameters, no derived buffers
    if report.drop_foreign_head(state, {key: tuple(value.shape) for key, value in targets.items()}):
        targets = {key: value for key, value in targets.items() if key not in HEAD_KEYS}
    check_fit(state, {key: tuple(value.shape) for key, value in targets.items()}, f"{source} ({fmt} format)")

    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(torch.from_numpy(np.ascontiguousarray(state[key])).to(target.dtype))
    report.loaded = sorted(targets)
    return report

