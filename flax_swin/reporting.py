"""The Flax stack's reporting side: step and epoch tags, the progress bar, the device, its peak memory, profiles."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

from shared_data import environment, event_files, op_profile, tags
from shared_data.run_report import EpochResult
from shared_data.trash_safe import atomic_write_bytes

HLO_FILE = "train_step.hlo.txt"  # the compiled train step, beside a profile


def device_description() -> str:
    """The shared device string for this process's devices, e.g. 'cuda: NVIDIA H200 x1'."""
    device = jax.devices()[0]
    return environment.device_description(device.platform, device.device_kind, len(jax.devices()))


def device_peak_mb() -> float | None:
    """Peak MiB in use on the first local device, where the backend reports it (GPU, TPU; not CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # backends without memory statistics raise rather than return None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


class EventFile:
    """A run's TensorBoard event file, written by the tensorboard package's own writer (no TensorFlow needed).

    Not tensorboardX's SummaryWriter: its flush() leaves the events still queued for its writer thread unwritten, and a
    run killed after a checkpoint then loses tags of the steps that checkpoint holds, which its resume cannot write
    again. flush() here returns once every event added before it is on disk. `purge_step` writes what
    SummaryWriter(purge_step=...) writes: readers drop every point of the earlier files at that step or later.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None, flush_secs: int = 30) -> None:
        self.file = EventFileWriter(str(run_dir), flush_secs=flush_secs)
        if purge_step is not None:
            self.file.add_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
            self.file.add_event(Event(step=purge_step, wall_time=time.time(),
                                      session_log=SessionLog(status=SessionLog.START)))

    def add_summary(self, summary: Summary, step: int, walltime: float | None = None) -> None:
        """Queue `summary` at TensorBoard step `step` (wall time: now, unless given in seconds since the epoch)."""
        self.file.add_event(Event(wall_time=time.time() if walltime is None else walltime, step=int(step),
                                  summary=summary))

    def add_scalar(self, tag: str, value: float, step: int, walltime: float | None = None) -> None:
        """Queue one scalar; the signature of SummaryWriter.add_scalar, which event_files.write_points calls."""
        self.add_summary(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step, walltime)

    def flush(self) -> None:
        """Return once every event queued so far is written to the file."""
        self.file.flush()

    def close(self) -> None:
        """Write everything queued and close the file."""
        self.file.close()


class Reporter:
    """Writes the shared TensorBoard tags and drives the progress bar; on processes other than 0 it does nothing.

    With `step_tags` False (--step-timing off) only the epoch tags are written. A resumed run passes the
    `purge_step` and the `replay` points of shared_data.event_files.resume_purge, so that its event files hold
    each step once.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, step_tags: bool = True,
                 purge_step: int | None = None, replay: Iterable[event_files.Point] = ()) -> None:
        self.step_tags = step_tags  # False (--step-timing off): the epoch tags only
        self.writer = EventFile(run_dir, purge_step) if enabled else None
        if self.writer is not None:
            event_files.write_points(self.writer, replay)
        self.bar = (tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)
                    if enabled else None)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Show the 1-based epoch being trained."""
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}/{epochs}")

    def step(self, step: int, loss: float, accuracy: float, lr: float, step_s: float, data_wait_s: float) -> None:
        """The step tags of one global optimiser step (seconds; lr is the rate that step's update used)."""
        if self.writer is not None and self.step_tags:
            values = [(tags.TRAIN_LOSS, loss), (tags.TRAIN_ACCURACY, accuracy), (tags.TRAIN_LR, lr),
                      (tags.STEP_TIME, step_s), (tags.DATA_WAIT_TIME, data_wait_s),
                      (tags.COMPUTE_TIME, step_s - data_wait_s)]
            if step == 1:
                values.append((tags.FIRST_STEP_TIME, step_s))
            # One event holding every scalar of the step: a fifth of the cost of one add_scalar call per tag.
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])
            self.writer.add_summary(summary, step)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == 1:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def epoch_validated(self, result: EpochResult) -> None:
        """The epoch tags known once its validation is over (step = 1-based epoch), host and device peak memory,
        flushed to disk with every step tag before them: call it before the epoch's checkpoint is saved."""
        if self.writer is None:
            return
        scalars = dict(result.scalars())
        scalars[tags.HOST_PEAK_MB] = environment.host_peak_mb()
        peak = device_peak_mb()
        if peak is not None:
            scalars[tags.DEVICE_PEAK_MB] = peak
        self._write_epoch(scalars, result.epoch)

    def epoch_done(self, result: EpochResult, epochs: int) -> None:
        """The epoch's checkpoint and wall times, which include its save (flushed), and the epoch's line."""
        if self.writer is None:
            return
        self._write_epoch(result.closing_scalars(), result.epoch)
        self.bar.write(result.line(epochs))

    def flush(self) -> None:
        """Put every tag written so far on disk: before a step checkpoint is saved, so that a run killed after it
        resumes with all its steps' tags (a resumed run keeps only what is on disk, shared_data.event_files)."""
        if self.writer is not None:
            self.writer.flush()

    def _write_epoch(self, scalars: dict[str, float], epoch: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        """Flush the event file and end the bar."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class StepProfiler:
    """A jax.profiler trace of global steps first..last (inclusive) into `folder`, for TensorBoard's profile plugin,
    and the per-operation summary of the train step beside it (shared_data.op_profile, ops.json); process 0's.

    clu.periodic_actions.Profile does the tracing, but importing clu.periodic_actions imports TensorFlow,
    which the Flax stack runs without.
    """

    def __init__(self, steps: tuple[int, int] | None, folder: Path,
                 compiled_step: Callable[[], str] | None = None) -> None:
        """`compiled_step` returns the HLO text of the compiled train step (`lowered.compile().as_text()`), which
        tells what each traced operation computes; without it no ops.json."""
        self.first, self.last = steps if steps else (0, -1)
        self.folder = folder
        self.compiled_step = compiled_step
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
            self.started = time.time()
            jax.profiler.start_trace(str(self.folder))
            self.active = True

    def stop(self, complete: bool = False) -> None:
        """End the trace (if one runs); after a `complete` one, write ops.json from it and the step's HLO."""
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        if complete and self.compiled_step is not None:
            try:
                hlo_text = self.compiled_step()
                # Beside the trace: what each operation named in ops.json and the trace computes.
                atomic_write_bytes(self.folder / HLO_FILE, hlo_text.encode())
                ops, clock = xla_op_times(self.folder, hlo_text, self.last - self.first + 1, since=self.started)
                op_profile.write_ops(self.folder, stack="flax", steps=(self.first, self.last), clock=clock, ops=ops)
            except Exception as error:  # the trace is written; a summary that fails must not end the training run
                warnings.warn(f"{self.folder}: no {op_profile.OPS_FILE} from the trace ({error})", stacklevel=2)


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
