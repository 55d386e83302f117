"""Read Swin V2 weights (official, timm, torchvision, Lightning, safetensors, Flax runs) as official-named arrays."""

from __future__ import annotations

import collections
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from shared_data.retention import CheckpointInfo, best_steps

# Buffers every implementation derives from its configuration; loading them would pin the window size.
DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")
FORMATS = ("official", "timm", "torchvision", "lightning", "flax")
HEAD_KEYS = ("head.weight", "head.bias")
# Which checkpoint of a run folder to read: the best by validation accuracy, or the newest.
CHECKPOINT_CHOICES = ("best", "latest")
# Each stack's checkpointing module is the one home of its checkpoint layout (list_checkpoints); a run folder's
# config.json names its stack.
_CHECKPOINT_MODULES = {"lightning": "lightning_swin.checkpointing", "flax": "flax_swin.checkpointing"}
# The TrainState item of a Flax step folder (flax_swin.checkpointing.STATE_ITEM) and the entry holding the weights.
_FLAX_STATE_ITEM = "state"
_FLAX_PARAMS = "params"
# Where a placeholder keeps the name of the class it stands in for.
_PICKLED_CLASS = "__pickled_class__"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

_TORCHVISION_STAGE = re.compile(r"^features\.(\d+)\.(.*)$")
_TIMM_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


class WeightsFormatError(ValueError):
    """A weights file or state dict that cannot be read as Swin V2 weights; the message names the source."""


def read_weights(path: str | Path, checkpoint: str = "best") -> tuple[dict[str, np.ndarray], str]:
    """Load weights -> (official-named arrays, format); the format is one of FORMATS.

    `path` is a file (.pth/.pt/.bin/.ckpt read by torch's weights-only unpickler, or .safetensors), a Flax step
    folder (`<run>/checkpoints/<step>`), or a run folder of either stack, whose `checkpoint` (see
    find_checkpoint) is read. Derived buffers are dropped; unknown keys are kept so the loader can report them.
    """
    path = find_checkpoint(path, checkpoint)
    if path.is_dir():
        raw, declared = _load_flax_step(path), "flax"
    else:
        raw, declared = _load_file(path)
    state, fmt = canonicalize(raw, source=str(path))
    return state, declared or fmt


def read_source(source: str | Path | Mapping[str, Any],
                checkpoint: str = "best") -> tuple[dict[str, np.ndarray], str, str]:
    """(official-named arrays, format, what was read) from anything read_weights reads or an in-memory state dict;
    what was read names the checkpoint a run folder stood for."""
    if isinstance(source, Mapping):
        return (*canonicalize(source), "<state dict>")
    path = find_checkpoint(source, checkpoint)
    return (*read_weights(path), str(path))


def find_checkpoint(path: str | Path, checkpoint: str = "best") -> Path:
    """The weights `path` stands for: a file or a Flax step folder is itself; for a run folder of either stack
    (holding `checkpoints/`), its complete checkpoint named by `checkpoint`: "best" (highest validation accuracy,
    the earlier of equals, as retention keeps it) or "latest" (highest step).

    Raises WeightsFormatError naming the path and what to give instead.
    """
    path = Path(path)
    if checkpoint not in CHECKPOINT_CHOICES:
        raise WeightsFormatError(f"{path}: unknown checkpoint {checkpoint!r}; choose {' or '.join(CHECKPOINT_CHOICES)}")
    if path.is_file() or _is_flax_step(path):
        return path
    if path.name == "checkpoints":
        path = path.parent
    if not path.is_dir():
        raise WeightsFormatError(f"{path}: no such file or folder; check the path")
    if not (path / "checkpoints").is_dir():
        raise WeightsFormatError(f"{path}: a folder that is neither a run (no checkpoints/) nor a Flax checkpoint "
                                 "(<run>/checkpoints/<step>); give a weights file or a run folder")
    stack = run_stack(path)
    infos = [info for info in importlib.import_module(_CHECKPOINT_MODULES[stack]).list_checkpoints(path)
             if info.complete and info.step is not None]
    if not infos:
        raise WeightsFormatError(f"{path}: this {stack} run has no complete checkpoint yet")
    return _pick(infos, checkpoint, path).path


def find_run_config(path: str | Path) -> dict[str, Any] | None:
    """The config.json of the run that `path` (a run folder, or a checkpoint in its checkpoints/) belongs to, or
    None for weights from elsewhere."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "checkpoints").is_dir() and (folder / "config.json").is_file():
            try:
                config = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                return None
            return config if isinstance(config, dict) else None
    return None


def run_stack(run_dir: str | Path) -> str:
    """The stack that wrote a run folder: its config.json's "stack", else told by its checkpoint files."""
    run_dir = Path(run_dir)
    stack = (find_run_config(run_dir) or {}).get("stack")
    if stack in _CHECKPOINT_MODULES:
        return stack
    return "lightning" if any((run_dir / "checkpoints").glob("*.ckpt")) else "flax"


def _pick(infos: Sequence[CheckpointInfo], checkpoint: str, run_dir: Path) -> CheckpointInfo:
    if checkpoint == "best":
        chosen = best_steps([(info.step, info.val_accuracy) for info in infos], keep=2)
        if not chosen:
            raise WeightsFormatError(f"{run_dir}: no checkpoint records a validation accuracy, so none is the best; "
                                     "ask for the latest")
        step = chosen.pop()
    else:
        step = max(info.step for info in infos)
    # Every file of one step holds the same weights; prefer the one named for the role asked for.
    role = "best" if checkpoint == "best" else "last"
    return max((info for info in infos if info.step == step), key=lambda info: info.role == role)


def _is_flax_step(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit() and (path / _FLAX_STATE_ITEM).is_dir()


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
            raise WeightsFormatError(f"{path}: not a readable safetensors file ({_one_line_cause(error)})") from None
        declared = metadata.get("format")
        return raw, declared if declared in FORMATS else None
    try:
        raw = _torch_load(path)
    except Exception as error:  # pickle, zip and allow-list failures all mean "not a plain weights file"
        cause = _one_line_cause(error)
        # Torch refuses a few modules (os, sys) outright, before any placeholder could stand in.
        blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", cause)
        name = error.name if isinstance(error, _ForbiddenCall) else blocked.group(1) if blocked else None
        if name is not None:
            raise WeightsFormatError(f"{path}: refused: loading it would call {name}, which could run arbitrary "
                                     "code; only tensors, containers and plain objects are read") from None
        raise WeightsFormatError(f"{path}: torch's weights-only unpickler cannot read it ({cause}); give a state "
                                 "dict, an official/Lightning checkpoint or a .safetensors file") from None
    if not isinstance(raw, Mapping) or _pickled_class(raw):
        kind = _pickled_class(raw) or type(raw).__name__
        raise WeightsFormatError(f"{path}: holds a {kind} object, not a state dict; save model.state_dict()")
    return raw, None


class _ForbiddenCall(Exception):
    """A pickle asked to call a global that is not allow-listed: the way a file runs code when loaded."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Placeholder(type):
    """Metaclass of the stand-ins for globals a file names that torch does not allow-list (a training
    script's config class, subprocess.call). Creating an instance the way pickle stores plain objects (NEWOBJ) gives
    an inert OrderedDict, the one container whose items (SETITEMS) and attributes (BUILD) torch's unpickler fills
    without running code, so a yacs CfgNode or any config object beside `model` is skipped; calling the global
    (REDUCE) is refused."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _ForbiddenCall(cls.global_name)


def _placeholder(name: str) -> type:
    def __new__(cls: type, *args: Any) -> collections.OrderedDict:
        stand_in = collections.OrderedDict()
        stand_in.__dict__[_PICKLED_CLASS] = name
        return stand_in

    return _Placeholder(name.rpartition(".")[2], (), {"__new__": __new__, "global_name": name})


def _pickled_class(value: Any) -> str | None:
    """The class a placeholder stands in for; None for anything else."""
    return vars(value).get(_PICKLED_CLASS) if isinstance(value, collections.OrderedDict) else None


def _numpy_globals() -> list[Any]:
    """What pickled numpy arrays and scalars are rebuilt from (our Lightning checkpoints keep numpy RNG states):
    functions that copy bytes into a new array or scalar and call nothing else, under numpy 1's and 2's names."""
    core = np._core if hasattr(np, "_core") else np.core
    rebuild = [(getattr(core.multiarray, name), f"{module}.multiarray.{name}")
               for module in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")]
    dtypes = [getattr(np.dtypes, name) for name in getattr(np.dtypes, "__all__", ())]
    return [*rebuild, np.ndarray, np.dtype, *dtypes]


def _torch_load(path: Path) -> Any:
    """torch.load with the weights-only unpickler, every global it does not allow-list given an inert placeholder
    (see _Placeholder): arbitrary objects are never unpickled, and objects beside the weights never stop a load."""
    import torch

    with torch.serialization.safe_globals(_numpy_globals()):
        try:
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip archive (legacy or not torch at all): torch.load's own checks report it
            unknown = []
        with torch.serialization.safe_globals([(_placeholder(name), name) for name in unknown]):
            return torch.load(path, map_location="cpu", weights_only=True)


def _one_line_cause(error: BaseException) -> str:
    """The unpickler's own reason inside torch's multi-line, ANSI-coloured message, as one plain line."""
    text = _ANSI_ESCAPE.sub("", str(error))
    match = re.search(r"WeightsUnpickler error: *(\S[^\n]*)", text)
    if match:
        cause = match.group(1)
    else:
        # torch puts its general advice first and the unpickler's message in a paragraph of its own.
        paragraphs = [part.strip() for part in text.split("\n\n") if part.strip()]
        specific = [part for part in paragraphs
                    if not part.startswith(("Weights only load failed", "Check the documentation"))]
        cause = (specific or paragraphs or [type(error).__name__])[0]
    cause = cause.split(" Please use `torch.serialization")[0]  # advice to allow-list it: never, for us
    return " ".join(cause.split())


def _load_flax_step(step_dir: Path) -> dict[str, np.ndarray]:
    """The parameters of a Flax step folder's TrainState (not its optimiser state), official names, torch layout."""
    import jax
    import orbax.checkpoint as ocp

    item = step_dir / _FLAX_STATE_ITEM
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(item).tree
        if not isinstance(tree, Mapping) or _FLAX_PARAMS not in tree:
            raise WeightsFormatError(f"{step_dir}: not a Flax training checkpoint (no {_FLAX_PARAMS} in its state)")
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree[_FLAX_PARAMS])
        restored = handler.restore(item, args=ocp.args.PyTreeRestore(
            item={_FLAX_PARAMS: tree[_FLAX_PARAMS]}, restore_args={_FLAX_PARAMS: as_numpy}, partial_restore=True))
    except WeightsFormatError:
        raise
    except Exception as error:  # orbax and tensorstore raise many types; all mean "unreadable"
        raise WeightsFormatError(f"{step_dir}: cannot be restored ({type(error).__name__}: "
                                 f"{_one_line_cause(error)})") from None
    finally:
        handler.close()
    return {flax_to_official(path): flax_to_torch_layout(path, np.asarray(value))
            for path, value in _flatten(restored[_FLAX_PARAMS])}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key)), value


def flax_to_official(path: Sequence[Any]) -> str:
    """Flax parameter path -> official parameter name.

    Three renames: nnx.Sequential keeps its items under `layers` (`cpb_mlp.layers.0` is `cpb_mlp.0`), and
    Linear/Conv `kernel` and LayerNorm `scale` are torch's `weight`.
    """
    parts = [str(part) for part in path]
    parts = [part for i, part in enumerate(parts) if not (part == "layers" and i > 0 and parts[i - 1] == "cpb_mlp")]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def flax_to_torch_layout(path: Sequence[Any], value: np.ndarray) -> np.ndarray:
    """Linear kernels are [in, out] in Flax and [out, in] in torch; conv kernels HWIO vs OIHW."""
    if str(path[-1]) == "kernel":
        value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    return np.ascontiguousarray(value)


def torch_to_flax_layout(path: Sequence[Any], value: np.ndarray) -> np.ndarray:
    """The inverse of flax_to_torch_layout for the parameter at Flax `path`."""
    if str(path[-1]) == "kernel":
        value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(value)


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


def check_fit(weights: Mapping[str, Any], model_shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise WeightsFormatError listing the missing, unexpected and mis-shaped tensors of official-named `weights`
    against a model whose parameters have `model_shapes` (official names, torch layout)."""
    missing = sorted(set(model_shapes) - set(weights))
    unexpected = sorted(set(weights) - set(model_shapes))
    mismatched = sorted(
        f"{key} {tuple(np.shape(weights[key]))} vs model {tuple(model_shapes[key])}"
        for key in set(weights) & set(model_shapes)
        if tuple(np.shape(weights[key])) != tuple(model_shapes[key])
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise WeightsFormatError(f"{source}: weights do not fit the model; " + "; ".join(problems))


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

    def drop_foreign_head(self, state: dict[str, np.ndarray], model_shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """When the head in `state` differs from the model's (another class count, or none), remove it from
        `state`, so the model keeps its own head at its init, and say so in this report. Returns whether it did."""
        wanted = {key: tuple(model_shapes[key]) for key in HEAD_KEYS if key in model_shapes}
        given = {key: tuple(state[key].shape) for key in HEAD_KEYS if key in state}
        if wanted == given:
            return False
        for key in HEAD_KEYS:
            state.pop(key, None)
        self.head_replaced = True
        self.head_note = f"head {_describe_head(given)} replaced by the model's {_describe_head(wanted)} at init"
        return True


def _describe_head(shapes: Mapping[str, tuple[int, ...]]) -> str:
    weight = shapes.get("head.weight")
    return f"with {weight[0]} classes" if weight else "(absent)"
