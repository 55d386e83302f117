"""Per-operation profiles in one form for both stacks: each operation's self time and kind, in <run>/profile/ops.json."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from shared_data.trash_safe import atomic_write_json

OPS_FILE = "ops.json"
# The kinds of operation a step's time is split into, in the order tables and bars show them.
MATMUL = "matmul and convolution"
ATTENTION = "attention softmax and bias"
NORM = "normalisation"
ACTIVATION = "activations"
LAYOUT = "layout changes and copies"
OPTIMISER = "optimiser"
OTHER = "other"
KINDS = (MATMUL, ATTENTION, NORM, ACTIVATION, LAYOUT, OPTIMISER, OTHER)

# Named scopes (jax.named_scope) the Flax model and train step open, so XLA's fused operations can be told apart:
# XLA keeps them in each operation's op_name, forward ("jvp(attention)") and backward ("transpose(jvp(attention))").
SCOPE_KINDS = {"attention": ATTENTION, "norm": NORM, "activation": ACTIVATION, "optimizer": OPTIMISER}

# The torch.profiler range our LightningModule opens around its forward pass and loss.
FORWARD_RANGE = "forward"
# The range the Lightning StepProfiler opens around each traced training step (batch start to batch end).
STEP_RANGE = "train_step"

# HLO opcodes that only move or replicate data; a fusion of nothing else is a layout change or copy.
_DATA_MOVEMENT = frozenset({
    "parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice",
    "dynamic-update-slice", "concatenate", "pad", "tuple", "get-tuple-element", "copy-start", "copy-done", "iota",
    "reverse", "gather", "scatter", "select", "compare",
})
_MATMUL_OPCODES = frozenset({"dot", "convolution"})
# Custom calls of a matmul or convolution library (cuBLAS, cuDNN, oneDNN, YNNPACK/XNNPACK fusions are plain fusions).
_MATMUL_TARGET = re.compile(r"gemm|matmul|conv", re.IGNORECASE)

# aten operations by kind, for torch.profiler's events (forward and autograd's backward ops alike).
_TORCH_KINDS: dict[str, tuple[str, ...]] = {
    MATMUL: ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "conv", "convolution", "_convolution",
             "mkldnn_convolution", "convolution_backward", "_mkldnn_convolution", "cudnn_convolution",
             "scaled_dot_product", "_scaled_dot_product"),
    ATTENTION: ("softmax", "_softmax", "_softmax_backward_data", "masked_fill", "masked_fill_", "index_select",
                "index", "index_add_", "index_put_", "_index_put_impl_", "linalg_vector_norm", "norm",
                "clamp", "clamp_min", "clamp_max", "exp"),
    NORM: ("layer_norm", "native_layer_norm", "native_layer_norm_backward", "batch_norm"),
    ACTIVATION: ("gelu", "gelu_backward", "relu", "relu_", "threshold_backward", "sigmoid", "sigmoid_backward",
                 "silu", "silu_backward"),
    LAYOUT: ("copy_", "clone", "contiguous", "cat", "roll", "permute", "transpose", "t", "reshape", "view",
             "_unsafe_view", "as_strided", "empty", "empty_like", "empty_strided", "fill_", "zero_", "zeros",
             "zeros_like", "constant_pad_nd", "slice_backward", "select_backward", "split", "unbind", "stack",
             "expand", "narrow", "slice", "select", "flatten", "squeeze", "unsqueeze", "_to_copy", "to"),
}
_TORCH_KIND_OF = {op: kind for kind, ops in _TORCH_KINDS.items() for op in ops}


@dataclass(frozen=True)
class OpTime:
    """One operation's self time per profiled step (seconds, summed over threads and calls), its calls, its kind."""

    name: str
    kind: str
    calls: float  # per step
    self_s: float
    detail: str = ""  # XLA: what the fusion computes, from its op_name, and its output shape


def torch_kind(name: str, ancestors: Sequence[str] = ()) -> str:
    """The kind of a torch.profiler event `name` (e.g. 'aten::mm') whose enclosing events are `ancestors`, nearest
    first.

    The optimiser's operations are those inside an 'Optimizer.step#...' or 'Optimizer.zero_grad#...' range and not
    inside the forward pass (FORWARD_RANGE) or autograd's backward: Lightning runs both inside optimizer.step.
    """
    for scope in (name, *ancestors):
        if scope == FORWARD_RANGE or scope.startswith("autograd::engine"):
            break
        if scope.startswith("Optimizer.") or scope.startswith("aten::_foreach_"):
            return OPTIMISER
    op = name.split("::", 1)[-1]
    return _TORCH_KIND_OF.get(op, OTHER)


def xla_kind(opcodes: Iterable[str], op_name: str, custom_call_targets: Iterable[str] = ()) -> str:
    """The kind of one XLA operation (a fusion or a single instruction) from what it computes and its op_name.

    `opcodes`: every HLO opcode inside it (fusions included); `op_name`: its metadata op_name, which carries the
    jax.named_scope of the code that built it (SCOPE_KINDS).
    """
    opcodes = set(opcodes) - {"fusion"}  # the container; what it computes is inside
    if opcodes & _MATMUL_OPCODES or any(_MATMUL_TARGET.search(target) for target in custom_call_targets):
        return MATMUL
    scopes = set(re.findall(r"[A-Za-z_]+", op_name))
    if "optimizer" in scopes:
        return OPTIMISER
    if opcodes and opcodes <= _DATA_MOVEMENT:
        return LAYOUT
    # XLA fuses the backward pass's gradient sums into the transposes that precede them: still a layout change.
    if opcodes & {"transpose", "copy"} and opcodes <= _DATA_MOVEMENT | {"add", "convert"}:
        return LAYOUT
    for scope, kind in SCOPE_KINDS.items():
        if scope in scopes:
            return kind
    return OTHER


@dataclass(frozen=True)
class HloOp:
    """What xla_kind needs of one HLO instruction: its opcodes (fusions: all inside), op_name, custom-call targets."""

    opcodes: frozenset[str]
    op_name: str
    targets: tuple[str, ...]
    shape: str = ""

    @property
    def detail(self) -> str:
        """e.g. 'transpose(jvp(norm))/reduce_sum -> f32[8,4096]': the op_name less the jit(...) prefix, the shape."""
        op_name = re.sub(r"^jit\([^)]*\)/", "", self.op_name)
        return f"{op_name} -> {self.shape}" if op_name else self.shape


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")


def parse_hlo(text: str) -> dict[str, HloOp]:
    """Every instruction of an HLO module's text (`compiled.as_text()`), by name, with what xla_kind needs."""
    own: dict[str, tuple[str, str, list[str], list[str]]] = {}  # name -> (opcode, op_name, called, targets)
    shapes: dict[str, str] = {}
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith((" ", "\t")):
            current = computations.setdefault(header.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        shapes[name] = re.sub(r"\{[^}]*\}", "", shape)  # without the layout
        op_name = re.search(r'op_name="([^"]*)"', line)
        called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
        targets = re.findall(r'custom_call_target="([^"]*)"', line)
        own[name] = (opcode, op_name.group(1) if op_name else "", called, targets)
        if current is not None:
            current.append(name)

    def inside(computation: str, seen: set[str]) -> tuple[set[str], list[str]]:
        opcodes: set[str] = set()
        targets: list[str] = []
        if computation in seen:
            return opcodes, targets
        seen.add(computation)
        for member in computations.get(computation, []):
            opcode, _, called, member_targets = own[member]
            opcodes.add(opcode)
            targets += member_targets
            for callee in called:
                more, more_targets = inside(callee, seen)
                opcodes |= more
                targets += more_targets
        return opcodes, targets

    ops = {}
    for name, (opcode, op_name, called, targets) in own.items():
        opcodes, all_targets = {opcode}, list(targets)
        for callee in called:
            more, more_targets = inside(callee, set())
            opcodes |= more
            all_targets += more_targets
        ops[name] = HloOp(frozenset(opcodes), op_name, tuple(all_targets), shapes[name])
    return ops


def aggregate(rows: Iterable[tuple[str, str, float]], steps: int, details: dict[str, str] | None = None) -> list[OpTime]:
    """(name, kind, self seconds) per call -> one OpTime per name and kind, per step, longest first (an aten op such
    as add_ is the optimiser's in optimizer.step and not elsewhere); `details` by name."""
    totals: dict[tuple[str, str], list[Any]] = {}
    for name, kind, seconds in rows:
        entry = totals.setdefault((name, kind), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
    details = details or {}
    ops = [OpTime(name, kind, calls / steps, total / steps, details.get(name, ""))
           for (name, kind), (calls, total) in totals.items()]
    return sorted(ops, key=lambda op: op.self_s, reverse=True)


def by_kind(ops: Iterable[OpTime]) -> dict[str, float]:
    """Self seconds per step of each kind in KINDS (zero where none)."""
    seconds = dict.fromkeys(KINDS, 0.0)
    for op in ops:
        seconds[op.kind] += op.self_s
    return seconds


def write_ops(folder: str | Path, *, stack: str, steps: tuple[int, int], clock: str, ops: Sequence[OpTime]) -> Path:
    """Write <folder>/ops.json: the profiled global steps (first, last), what time was summed ('cpu' self time
    over threads, or 'device' kernel time), and each operation; returns the path."""
    path = Path(folder) / OPS_FILE
    atomic_write_json(path, dict(stack=stack, first_step=steps[0], last_step=steps[1], clock=clock,
                                 ops=[asdict(op) for op in ops]))
    return path


def read_ops(folder: str | Path) -> dict[str, Any] | None:
    """The content of <folder>/ops.json (write_ops: self_s in seconds per step) with `ops` as OpTime objects, or None
    when there is none.

    Raises ValueError naming the file when it is not an ops file.
    """
    path = Path(folder) / OPS_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
        content["ops"] = [OpTime(**op) for op in content["ops"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a per-operation profile ({error}); delete it or profile again") from None
    return content
