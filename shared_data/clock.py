"""The clock of shared_data.tags in code, for both stacks: named timed sections, and each step's time from its
completion stamp."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Iterator

# Sections whose host time is left out of the step they fall in (shared_data.tags: step time).
EXCLUDED_SECTIONS = ("checkpoint", "profile")


@dataclasses.dataclass
class Span:
    """One timed stretch of host time, perf_counter seconds: `start` and `end` (0 until it ends)."""

    start: float
    end: float = 0.0

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Sections:
    """Host seconds spent in named sections of a training loop (data, train_step, eval, checkpoint, profile), as
    gemma's loop names them: `with sections("eval") as span: ...` times one stretch and adds it to `totals["eval"]`
    (running totals over the object's life, seconds). clu's timing helpers import TensorFlow, which the Flax stack
    runs without."""

    def __init__(self) -> None:
        self.totals: collections.defaultdict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[Span]:
        span = Span(time.perf_counter())
        try:
            yield span
        finally:
            span.end = time.perf_counter()
            self.totals[name] += span.seconds

    def add(self, name: str, seconds: float) -> None:
        """Count `seconds` of host time spent in section `name` that was timed elsewhere."""
        self.totals[name] += seconds


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """One optimiser step's times in seconds, as shared_data.tags defines them."""

    step_s: float
    data_wait_s: float

    @property
    def compute_s(self) -> float:
        return self.step_s - self.data_wait_s


class StepClock:
    """Each step's time and data wait from its completion (shared_data.tags), for one process of either stack.

    `start()` opens a training stretch (an epoch's training, or the rest of it after a resume): its first step counts
    from there. Host time spent in the EXCLUDED_SECTIONS of `sections` (saving, starting or stopping a profile) since
    the previous completion is left out of the next step. A completion is a host perf_counter stamp (completed_at) or,
    where only the device knows it, the device interval since the previous one (completed_after: CUDA events).
    """

    def __init__(self, sections: Sections) -> None:
        self.sections = sections
        self._since: float | None = None  # host time the next step's interval starts at
        self._excluded_seen = 0.0

    def _excluded_since_last(self) -> float:
        total = sum(self.sections.totals[name] for name in EXCLUDED_SECTIONS)
        excluded, self._excluded_seen = total - self._excluded_seen, total
        return excluded

    def start(self, now: float | None = None) -> None:
        """A training stretch starts at host time `now` (default: now)."""
        self._since = time.perf_counter() if now is None else now
        self._excluded_since_last()

    def completed_at(self, done: float, fetch: Span) -> StepTimes:
        """The step whose work finished at host time `done` and whose batch the host fetched during `fetch`.

        Its data wait is the part of the fetch inside the step's interval: a fetch that overlapped the previous
        step's computation (JAX's asynchronous dispatch) counts from that step's completion on.
        """
        if self._since is None:
            raise RuntimeError("StepClock.start() was not called before the first step")
        since, self._since = self._since, done
        step_s = max(done - since - self._excluded_since_last(), 0.0)
        wait = max(fetch.end - max(fetch.start, since), 0.0)
        return StepTimes(step_s, min(wait, step_s))

    def completed_after(self, interval_s: float, fetch: Span) -> StepTimes:
        """The step that finished `interval_s` device seconds after the previous one (or after the stretch's start);
        its fetch is host time, which the device clock cannot place, so its data wait is capped at the step time."""
        step_s = max(interval_s - self._excluded_since_last(), 0.0)
        return StepTimes(step_s, min(fetch.seconds, step_s))
