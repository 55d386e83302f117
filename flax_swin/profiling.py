"""Per-operation profiles of the Flax train step: a jax.profiler trace of chosen steps and its ops.json summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax

from shared_data import errors, op_profile
from shared_data.clock import Sections
from shared_data.trash_safe import atomic_write_bytes

HLO_FILE = "train_step.hlo.txt"  # the compiled train step, beside a profile


class StepProfiler:
    """A jax.profiler trace of global steps first..last (inclusive) into `folder`, for TensorBoard's profile plugin,
    and the per-operation summary of the train step beside it (shared_data.op_profile, ops.json); process 0's. The
    mirror of lightning_swin.profiling.StepProfiler.

    The host time it spends starting, stopping and summarising a trace goes into the "profile" section of `sections`,
    which the step clock leaves out of the step times. clu.periodic_actions.Profile does the tracing, but importing
    clu.periodic_actions imports TensorFlow, which the Flax stack runs without.
    """

    def __init__(self, steps: tuple[int, int] | None, folder: Path, compiled_step: Callable[[], str] | None,
                 sections: Sections) -> None:
        """`compiled_step` returns the HLO text of the compiled train step (`lowered.compile().as_text()`), which
        tells what each traced operation computes; without it no ops.json."""
        self.first, self.last = steps if steps else (0, -1)
        self.folder = folder
        self.compiled_step = compiled_step
        self.sections = sections
        self.active = False
        self.started = 0.0

    def is_boundary(self, step: int) -> bool:
        """Whether the trace starts right after `step` or ends with it: the loop waits for such a step."""
        return step in (self.first - 1, self.last)

    def after_step(self, step: int) -> None:
        """Call once step `step` has finished: stops the trace at its last step, starts it before its first."""
        if self.active and step >= self.last:
            self.stop(complete=True)
        # Process 0 only: the processes of one machine would write the same trace file names into one folder.
        if not self.active and step + 1 == self.first and jax.process_index() == 0:
            with self.sections("profile"):
                self.started = time.time()
                jax.profiler.start_trace(str(self.folder))
                self.active = True

    def stop(self, complete: bool = False) -> None:
        """End the trace (if one runs); after a `complete` one, write ops.json from it and the step's HLO."""
        if not self.active:
            return
        with self.sections("profile"):
            jax.profiler.stop_trace()
            self.active = False
            if complete and self.compiled_step is not None:
                self._summarise()

    def _summarise(self) -> None:
        try:
            hlo_text = self.compiled_step()
            # Beside the trace: what each operation named in ops.json and the trace computes.
            atomic_write_bytes(self.folder / HLO_FILE, hlo_text.encode())
            ops, clock = xla_op_times(self.folder, hlo_text, self.last - self.first + 1, since=self.started)
            op_profile.write_ops(self.folder, stack="flax", steps=(self.first, self.last), clock=clock, ops=ops)
        except Exception as error:  # the trace is written; a summary that fails must not end the training run
            errors.warn(f"{self.folder}: no {op_profile.OPS_FILE} from the trace ({errors.first_line(error)})")


def xla_op_times(folder: Path, hlo_text: str, steps: int, since: float = 0.0) -> tuple[list[op_profile.OpTime], str]:
    """Self time per step of each operation of the HLO module `hlo_text` in the newest jax.profiler trace under
    `folder` (written after `since`, seconds since the epoch), with its kind; and the clock: 'device' (GPU/TPU
    kernel time) or 'cpu' (thunk time on the host, summed over threads).

    Raises FileNotFoundError when `folder` holds no trace, and jax.profiler's errors for one it cannot read.
    """
    traces = [path for path in folder.glob("plugins/profile/*/*.xplane.pb") if path.stat().st_mtime >= since - 1]
    if not traces:
        raise FileNotFoundError(f"{folder}: no jax.profiler trace (*.xplane.pb) to summarise")
    trace = max(traces, key=lambda path: path.stat().st_mtime)
    module = hlo_text.split(None, 2)[1].rstrip(",")  # "HloModule jit_train_step, ..."
    hlo = op_profile.parse_hlo(hlo_text)
    data = jax.profiler.ProfileData.from_file(str(trace))
    device_planes = [plane for plane in data.planes if plane.name.startswith(("/device:GPU", "/device:TPU"))]
    planes = device_planes or [plane for plane in data.planes if plane.name == "/host:CPU"]
    rows = []
    for plane in planes:
        for line in plane.lines:
            if line.name in ("XLA Modules", "XLA Ops", "Steps", "Framework Ops"):
                continue  # lines derived from the kernels' own: counting them would count each op twice
            rows += _line_op_times(line, module, hlo)
    details = {name: hlo[name].detail for name, _, _ in rows if name in hlo}
    return op_profile.aggregate(rows, steps, details), "device" if device_planes else "cpu"


def _line_op_times(line: Any, module: str, hlo: dict[str, op_profile.HloOp]) -> list[tuple[str, str, float]]:
    """(op, kind, self seconds) of each event of `module` on one trace line; events nested in another lose
    their time from the outer one (a while loop's body inside the loop)."""
    rows: list[list[Any]] = []
    open_events: list[tuple[int, list[Any]]] = []  # (end ns, row) of the events enclosing the current one
    for event in sorted(line.events, key=lambda event: (event.start_ns, -event.duration_ns)):
        stats = dict(event.stats)
        if stats.get("hlo_module") != module or "hlo_op" not in stats:
            continue
        while open_events and open_events[-1][0] <= event.start_ns:
            open_events.pop()
        if open_events:
            open_events[-1][1][2] -= event.duration_ns / 1e9
        name = str(stats["hlo_op"])
        op = hlo.get(name)
        kind = op_profile.xla_kind(op.opcodes, op.op_name, op.targets) if op else op_profile.OTHER
        row = [name, kind, event.duration_ns / 1e9]
        rows.append(row)
        open_events.append((event.end_ns, row))
    return [tuple(row) for row in rows]
