"""The Swin V2 facts both model files share: constants of the official code and its weight-decay rule."""

from __future__ import annotations

import math

# torch.nn.LayerNorm's default, which the official code keeps.
LAYER_NORM_EPS = 1e-5
# Added to attention logits between tokens that came from different regions after the cyclic shift.
SHIFT_MASK_VALUE = -100.0
# Upper bound of the learned cosine-attention temperature (the paper clamps at 1 / 0.01).
MAX_LOGIT_SCALE = math.log(100.0)
# Parameter-name fragments the official optimiser builder excludes from weight decay.
NO_DECAY_KEYWORDS = ("cpb_mlp", "logit_scale", "absolute_pos_embed")


def is_no_decay(name: str, ndim: int) -> bool:
    """Official rule (optimizer.py, set_weight_decay): no weight decay for 1-D parameters, biases, cpb_mlp,
    logit_scale and absolute_pos_embed; `name` is the dotted parameter name, `ndim` its number of axes."""
    return ndim <= 1 or name.endswith(".bias") or any(key in name for key in NO_DECAY_KEYWORDS)
