"""bf16 training as shared_data.tags defines it, in both stacks: the dtype of every named tensor of a bf16 forward and
backward pass (the residual stream float32 in both, on a CPU as on a GPU), and the same training from the same start."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from report.stats import SAME_TRAINING_BOUNDS, SAME_TRAINING_STEPS
from shared_data import tags
from tests import stacks, weights_fixtures

# Each stack's training loss is held within the report's bf16 bound of the other's over the first SAME_INIT_STEPS
# common steps of the smoke preset in bf16 from the same weights (float32: tests/test_clock.py's 1e-3).
BF16_SAME_TRAINING_BOUND = SAME_TRAINING_BOUNDS["bf16"]
SAME_INIT_STEPS = SAME_TRAINING_STEPS
IMAGES, LABELS = 2, np.array([1, 7])


def _images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((IMAGES, 64, 64, 3), dtype=np.float32)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class _Recorder:
    """Named tensor -> the set of dtypes it had, over every layer."""

    def __init__(self) -> None:
        self.dtypes: dict[str, set[str]] = defaultdict(set)

    def __call__(self, name: str | None, value: Any) -> None:
        if name is not None:
            self.dtypes[name].add(_dtype_name(value.dtype))

    def table(self) -> dict[str, str]:
        return {name: "/".join(sorted(found)) for name, found in sorted(self.dtypes.items())}

    def passing(self, name: str, value: Any) -> Any:
        """Record `value` as `name` and hand it on."""
        self(name, value)
        return value


# Module outputs by the last part of the module's name.
_OUTPUT_NAMES = {"qkv": "qkv projection", "proj": "attention output projection", "fc1": "MLP hidden",
                 "fc2": "MLP output", "act": "GELU", "reduction": "patch merging reduction", "head": "head"}


def _module_role(path: tuple[Any, ...], kind: str) -> str | None:
    """The named tensor a module's output is (shared_data.tags), from its name and class."""
    if kind == "LayerNorm":
        return "norm outputs"
    if kind in ("SwinTransformerBlock", "PatchEmbed"):
        return "residual stream"  # after each block, and where the stream starts
    if "cpb_mlp" in path:
        return "position bias MLP" if kind == "Linear" else None
    if path and path[-1] == "proj" and "patch_embed" in path:
        return "patch embedding convolution"
    return _OUTPUT_NAMES.get(path[-1]) if path else None


def _check(table: dict[str, str]) -> None:
    expected = {name: "bfloat16" for name in tags.BF16_TENSORS} | {name: "float32" for name in tags.FLOAT32_TENSORS}
    assert table == expected


# ---------------------------------------------------------------------------------------------
# PyTorch: a real autocast pass on this device, its tensors read by forward hooks and a TorchFunctionMode


class _TorchFunctions(TorchFunctionMode):
    """Records the torch functions inside the attention that no module call shows: the qkv projection (F.linear of
    the qkv weight), the normalised queries and keys, the softmax's input (the logits) and output."""

    def __init__(self, record: _Recorder, qkv_weights: set[int]) -> None:
        super().__init__()
        self.record, self.qkv_weights = record, qkv_weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name == "linear" and id(args[1] if len(args) > 1 else kwargs["weight"]) in self.qkv_weights:
            self.record("qkv projection", out)
        elif name == "normalize":
            self.record("normalised queries and keys", out)
        elif name == "softmax":
            self.record("attention logits", args[0])
            self.record("softmax", out)
        return out


def torch_bf16_dtypes(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Named tensor -> dtype in one training step of `model` under bf16 autocast on the CPU, as Lightning's
    `bf16-mixed` runs it, with the Lightning stack's training loss."""
    from lightning_swin import model as torch_model
    from lightning_swin.module import soft_target_cross_entropy

    record = _Recorder()

    def output_as(role: str) -> Any:
        return lambda module, inputs, output: record(role, output)

    for name, module in model.named_modules():
        role = _module_role(tuple(name.split(".")) if name else (), type(module).__name__)
        if role is not None:
            module.register_forward_hook(output_as(role))
    model.head.register_forward_hook(lambda _, inputs, __: record("pooled features", inputs[0]))
    attentions = [module for module in model.modules() if isinstance(module, torch_model.WindowAttention)]
    for attention in attentions:
        attention.proj.register_forward_hook(lambda _, inputs, __: record("attention-weighted values", inputs[0]))
    position_bias = torch_model.WindowAttention.position_bias
    monkeypatch.setattr(torch_model.WindowAttention, "position_bias",
                        lambda self: record.passing("position bias", position_bias(self)))

    qkv_weights = {id(attention.qkv.weight) for attention in attentions}
    targets = F.one_hot(torch.from_numpy(LABELS), model.num_classes).float()
    with _TorchFunctions(record, qkv_weights), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = soft_target_cross_entropy(model(torch.from_numpy(_images()).permute(0, 3, 1, 2)), targets)
    record("loss", loss)
    loss.backward()
    for param in model.parameters():
        record("parameters", param)
        record("gradients", param.grad)
    return record.table()


def test_torch_bf16_autocast_keeps_each_named_tensor_in_its_dtype(monkeypatch):
    from lightning_swin.model import create_model

    model = create_model(weights_fixtures.NANO, 10, ape=True)  # in training mode: drop path in play
    _check(torch_bf16_dtypes(weights_fixtures.randomise(model, 0), monkeypatch))


# ---------------------------------------------------------------------------------------------
# Flax: a bf16 model's training step traced (not compiled), its tensors read by wrapping its modules and functions


def flax_bf16_dtypes(monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> dict[str, str]:
    """Named tensor -> dtype in one training step of the bf16 nano model, with the Flax stack's training loss."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_swin import model as flax_model
    from flax_swin.steps import soft_target_cross_entropy

    record = _Recorder()
    paths: dict[int, tuple[Any, ...]] = {}

    def wrap_call(cls: type) -> None:
        call = cls.__call__

        def recorded_call(self, x, *args, **kwargs):
            out = call(self, x, *args, **kwargs)
            path = paths.get(id(self), ())
            record(_module_role(path, cls.__name__), out)
            if path and path[-1] == "head":
                record("pooled features", x)
            elif path and path[-1] == "proj" and "attn" in path:
                record("attention-weighted values", x)
            return out

        monkeypatch.setattr(cls, "__call__", recorded_call)

    for cls in (nnx.Linear, nnx.Conv, flax_model.LayerNorm, flax_model.SwinTransformerBlock, flax_model.PatchEmbed):
        wrap_call(cls)

    def wrap_function(name: str, role: str, record_input: str | None = None) -> None:
        function = getattr(flax_model, name)

        def recorded(x, *args):
            if record_input:
                record(record_input, x)
            return record.passing(role, function(x, *args))

        monkeypatch.setattr(flax_model, name, recorded)

    wrap_function("_normalize", "normalised queries and keys")
    wrap_function("softmax", "softmax", record_input="attention logits")
    wrap_function("gelu", "GELU")
    position_bias = flax_model.WindowAttention.position_bias
    monkeypatch.setattr(flax_model.WindowAttention, "position_bias",
                        lambda self: record.passing("position bias", position_bias(self)))

    model = nnx.eval_shape(lambda: flax_model.create_model(weights_fixtures.NANO, 10, nnx.Rngs(0), dtype=jnp.bfloat16,
                                                           **overrides))
    graphdef, state = nnx.split(model)

    def train_loss(state, images, targets):
        model = nnx.merge(graphdef, state)  # in training mode: drop path in play

        def loss_fn(model):
            paths.update({id(module): path for path, module in nnx.iter_modules(model)})  # the copy grad traces
            return soft_target_cross_entropy(model(images), targets)

        return nnx.value_and_grad(loss_fn)(model)

    targets = jax.nn.one_hot(LABELS, 10)
    loss, grads = jax.eval_shape(train_loss, state, jnp.asarray(_images()), targets)
    record("loss", loss)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        record("parameters", leaf)
    for leaf in jax.tree.leaves(grads):
        record("gradients", leaf)
    return record.table()


def test_flax_bf16_model_keeps_each_named_tensor_in_its_dtype(monkeypatch):
    _check(flax_bf16_dtypes(monkeypatch, ape=True))


# ---------------------------------------------------------------------------------------------
# The same training from the same start, in bf16


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory) -> Path:
    """The smoke preset's own synthetic set, `small` (1000 train images: 31 steps of 32 per epoch)."""
    from shared_data.synthetic import write_synthetic

    data_dir = tmp_path_factory.mktemp("small-data")
    write_synthetic(data_dir, size="small", seed=0, progress=False)
    return data_dir


@pytest.mark.slow
def test_same_start_trains_the_same_in_both_stacks_in_bf16(tmp_path, small_data_dir, compilation_cache):
    """The smoke preset in bf16 (its 5-epoch schedule, stopped after step SAME_INIT_STEPS + 1), both stacks from the
    same random nano weights: the training losses of the first SAME_INIT_STEPS steps stay within the bound."""
    from lightning_swin.model import create_model

    torch.manual_seed(1)
    init = tmp_path / "init.pth"
    torch.save(create_model(weights_fixtures.NANO, num_classes=10, img_size=64).state_dict(), init)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several suites share two cores
    try:
        for stack in stacks.STACKS:
            with pytest.raises(stacks.Interrupt):
                stacks.train(stack, tmp_path, small_data_dir, "--synthetic-size", "small", "--precision", "bf16",
                             "--pretrained", str(init), extras=[stacks.interrupt_after(stack, SAME_INIT_STEPS + 1)])
    finally:
        torch.set_num_threads(threads)
    lightning, flax = (dict(stacks.scalars(tmp_path / stack / "run")[tags.TRAIN_LOSS]) for stack in stacks.STACKS)
    steps = sorted(set(lightning) & set(flax))[:SAME_INIT_STEPS]
    assert steps == list(range(1, SAME_INIT_STEPS + 1))
    difference = np.abs(np.array([lightning[step] - flax[step] for step in steps]))
    assert difference.max() <= BF16_SAME_TRAINING_BOUND, difference
