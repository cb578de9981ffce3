"""Where a long flow stands: "step k of N" before each step, its time and an estimate of what is left after.

A flow that knows its steps up front (bootstrap: flows/bootstrap.py `planned_steps`) opens a
`StepClock` with the command of each step, in order; `run_step` (flows/tasks.py), which every
flow's steps go through, asks the open clock for its lines. The estimate of the time left is the
mean time of the steps of the same command so far (a `train stage1` is not a `caption`), else the
mean of all steps so far, summed over the steps still to run: a guess that improves as steps finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


def estimate_left(done: Sequence[tuple[str, float]], remaining: Sequence[str]) -> float | None:
    """Seconds the `remaining` commands may take, from the (command, seconds) of those `done`;
    None before any step finished (nothing to estimate from)."""
    if not done:
        return None
    overall = sum(s for _, s in done) / len(done)
    by_command: dict[str, list[float]] = {}
    for command, seconds in done:
        by_command.setdefault(command, []).append(seconds)
    mean = {command: sum(times) / len(times) for command, times in by_command.items()}
    return sum(mean.get(command, overall) for command in remaining)


def format_duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 1 h 02 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_step_start(k: int, n: int, label: str, command: str) -> str:
    return f"step {k} of {n}: {label} (capfilt {command})"


def format_step_end(k: int, n: int, label: str, seconds: float, left_s: float | None) -> str:
    line = f"step {k} of {n}: {label} done in {format_duration(seconds)}"
    if k >= n:
        return line + "; that was the last step"
    if left_s is None:
        return line
    return line + f"; about {format_duration(left_s)} left (estimate from the {k} step{'s' if k > 1 else ''} so far)"


class StepClock:
    """Counts the steps of one flow run against its plan (the command of each step, in order)."""

    def __init__(self, plan: Sequence[str], clock: Callable[[], float] = time.perf_counter):
        self.plan, self.clock = list(plan), clock
        self.done: list[tuple[str, float]] = []
        self.started = 0  # steps started: a step run beside others (flows/tasks.py) has its own number
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return max(len(self.plan), self.started)  # a step the plan missed still counts

    def start(self, label: str, command: str) -> tuple[int, float, str]:
        with self._lock:
            self.started += 1
            k = self.started
        return k, self.clock(), format_step_start(k, self.total, label, command)

    def end(self, k: int, started: float, label: str, command: str) -> str:
        seconds = self.clock() - started
        self.done.append((command, seconds))
        n = self.total if k < len(self.plan) else max(len(self.plan), k)
        return format_step_end(k, n, label, seconds, estimate_left(self.done, self.plan[k:]))


_lock = threading.Lock()
_current: StepClock | None = None


@contextmanager
def step_clock(plan: Sequence[str]) -> Iterator[StepClock]:
    """Count the steps run inside the block (a flow's body); nested flows share the outer clock."""
    global _current
    with _lock:
        outer = _current
        if outer is None:
            _current = StepClock(plan)
        clock = _current
    try:
        yield clock
    finally:
        if outer is None:
            with _lock:
                _current = None


def current() -> StepClock | None:
    return _current
