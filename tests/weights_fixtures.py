"""Random Swin V2 weights with every parameter in play, and a Flax run folder holding given weights (written as
flax_swin.train writes one, without training): for the tests of the models and of what reads weights and runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

NANO = "swinv2_nano_window4_64"


def randomise(model: torch.nn.Module, seed: int, *, spread: float = 0.02, logit_spread: float = 0.1,
              probe_clamp: bool = False) -> torch.nn.Module:
    """Move every parameter of a torch Swin V2 off its init, in place (post-norms start at zero, which makes every
    block the identity, and biases at zero), so that a misplaced tensor changes the logits: matrices and biases
    N(0, spread), logit scales log(10) + N(0, logit_spread), norms 1 + N(0, 0.2).

    With probe_clamp, one head per block sits above the log(100) temperature clamp, which both stacks must apply.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("logit_scale"):
                param.copy_(math.log(10.0) + logit_spread * noise)
                if probe_clamp:
                    param.view(-1)[0] = 5.0
            elif param.ndim > 1 or "bias" in name:
                param.copy_(spread * noise)
            else:
                param.copy_(1.0 + 0.2 * noise)
    return model


def random_weights(seed: int, num_classes: int = 10) -> dict[str, np.ndarray]:
    """Official-named nano weights, randomised with the wider spreads of a trained model (see randomise)."""
    from lightning_swin.model import create_model

    torch.manual_seed(seed)
    model = randomise(create_model(NANO, num_classes), seed, spread=0.05, logit_spread=0.3)
    return {key: value.numpy() for key, value in model.state_dict().items()}


def write_flax_run(run_dir: Path, checkpoints: Sequence[tuple[int, Mapping[str, np.ndarray], float | None]],
                   config: Mapping[str, object]) -> Path:
    """`run_dir` holding one checkpoint per (step, official-named weights, val accuracy) and config.json (`config`
    plus stack "flax"); returns it."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from flax_swin import checkpointing
    from flax_swin.model import create_model
    from flax_swin.train import TrainState, checkpoint_meta
    from flax_swin.weights import from_canonical

    num_classes = checkpoints[0][1]["head.weight"].shape[0]
    model = nnx.eval_shape(lambda: create_model(config["model"], num_classes, nnx.Rngs(0), img_size=config["img_size"]))
    checkpointer = checkpointing.Checkpointer(run_dir, keep=len(checkpoints) + 1)
    try:
        for step, weights, val_accuracy in checkpoints:
            from_canonical(model, weights)
            params = nnx.state(model, nnx.Param).to_pure_dict()
            state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                               opt_state=optax.adamw(1e-3).init(params))
            checkpointer.save(step, state, checkpoint_meta(step, 6, val_accuracy, val_accuracy, []), val_accuracy)
            checkpointer.wait()
    finally:
        checkpointer.close()
    (run_dir / "config.json").write_text(json.dumps({**config, "stack": "flax"}))
    return run_dir
