"""The checker: every submission and every answer the caller saw, and what was wrong with them.

Modelled on the ``total-queue`` checker of Jepsen (``checker.clj``): a run passes only when no task
is **lost** (submitted, never answered), **duplicated** (answered to the caller more than once),
**unexpected** (an answer for a task nobody submitted, or carrying another task's id) or **wrong**
(not the value derived from its input), and when the **errors**, by type, are exactly those the
scenario demands (a hung task's TaskTimeout, an overload's QueueFull).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ndpipe.chaos.handlers import expected


@dataclass
class Report:
    scenario: str
    injected: str
    submitted: int = 0
    ok: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    wrong: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    expected_errors: dict[str, int | None] = field(default_factory=dict)  # None: any number allowed
    recovery: dict[str, list[float]] = field(default_factory=dict)  # e.g. "requeue s": [...]
    bounds: dict[str, float] = field(default_factory=dict)  # recovery name -> max allowed; no sample fails
    planned: int | None = None  # tasks the scenario meant to submit: fewer submitted fails the run
    checks: dict[str, bool] = field(default_factory=dict)  # scenario-specific bounds and their outcome
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    logs: str = ""  # the cluster's log tails, shown when the run failed

    @property
    def errors_as_expected(self) -> bool:
        for kind, count in self.errors.items():
            allowed = self.expected_errors.get(kind, 0)
            if allowed is not None and count != allowed:
                return False
        return all(self.errors.get(kind, 0) == n for kind, n in self.expected_errors.items() if n is not None)

    def bound_ok(self, name: str) -> bool:
        values = self.recovery.get(name, [])
        return bool(values) and max(values) <= self.bounds[name]

    @property
    def all_submitted(self) -> bool:
        return self.planned is None or self.submitted == self.planned

    @property
    def passed(self) -> bool:
        return (self.lost == self.duplicated == self.unexpected == self.wrong == 0 and self.errors_as_expected
                and self.all_submitted and all(self.checks.values()) and all(map(self.bound_ok, self.bounds)))

    def table(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        want = ", ".join(f"{k} {'any' if v is None else v}" for k, v in sorted(self.expected_errors.items())) or "none"
        planned = "" if self.planned is None else \
            f" of {self.planned:,} planned{'' if self.all_submitted else ' (FAILED)'}"
        lines = [
            f"scenario   {self.scenario}  ({'PASS' if self.passed else 'FAIL'}, {self.seconds:.1f} s)",
            f"injected   {self.injected}",
            f"tasks      submitted {self.submitted:,}{planned}  ok {self.ok:,}  lost {self.lost}"
            f"  duplicated {self.duplicated}  unexpected {self.unexpected}  wrong {self.wrong}",
            f"errors     {errors}  (expected: {want})",
        ]
        for name, values in self.recovery.items():
            bound = "" if name not in self.bounds else \
                f"  (bound {self.bounds[name]:g}: {'ok' if self.bound_ok(name) else 'FAILED'})"
            if values:
                lines.append(f"recovery   {name}: median {statistics.median(values):.3f}  max {max(values):.3f}"
                             f"  (n = {len(values)}){bound}")
            else:
                lines.append(f"recovery   {name}: no sample{bound}")
        for name, ok in self.checks.items():
            lines.append(f"check      {name}: {'ok' if ok else 'FAILED'}")
        lines += [f"note       {n}" for n in self.notes]
        if not self.passed and self.logs:
            lines.append(f"logs\n{self.logs}")
        return "\n".join(lines)


class History:
    """Thread-safe record of submissions and of every answer delivered to the caller."""

    def __init__(self, expect: Callable[[int, int], Any] = expected) -> None:
        self.expect = expect  # the one correct value of task (tid, size)
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self.sizes: dict[int, int] = {}  # tid -> array size of the task's input
        self.answers: dict[int, list[Any]] = {}  # tid -> every outcome the caller received
        self.strays: list[Any] = []  # answers for tasks never submitted
        self.first_at: dict[int, float] = {}  # tid -> monotonic time of its first answer
        self.answered = 0

    def track(self, tid: int, size: int, future: Future[Any]) -> None:
        """Record a submission and the answer its future delivers."""
        with self._lock:
            self.sizes[tid] = size
        future.add_done_callback(lambda f: self.deliver(tid, _outcome(f)))

    def submitted(self, tid: int, size: int) -> None:
        with self._lock:
            self.sizes[tid] = size

    def deliver(self, tid: int, outcome: Any) -> None:
        with self._done:
            if tid not in self.sizes:
                self.strays.append(outcome)
                return
            got = self.answers.setdefault(tid, [])
            got.append(outcome)
            if len(got) == 1:
                self.first_at[tid] = time.monotonic()
                self.answered += 1
                if self.answered == len(self.sizes):
                    self._done.notify_all()

    def wait(self, timeout: float) -> bool:
        """Block until every submitted task has an answer (or ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        with self._done:
            while self.answered < len(self.sizes):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
            return True

    def answered_after(self, t: float) -> float | None:
        """When the first answer after monotonic time ``t`` arrived (None if none did)."""
        with self._lock:
            later = [a for a in self.first_at.values() if a > t]
        return min(later) if later else None

    def check(self, report: Report) -> Report:
        """Fill ``report``'s counts from what was recorded."""
        with self._lock:
            report.submitted = len(self.sizes)
            report.unexpected += len(self.strays)
            for tid, size in self.sizes.items():
                got = self.answers.get(tid)
                if not got:
                    report.lost += 1
                    continue
                report.duplicated += len(got) > 1
                first = got[0]
                if isinstance(first, BaseException):
                    report.errors[type(first).__name__] += 1
                elif not isinstance(first, list) or len(first) < 2:
                    report.wrong += 1
                elif first[0] != tid:
                    report.unexpected += 1  # another task's answer reached this caller
                elif first[1] != self.expect(tid, size):
                    report.wrong += 1
                else:
                    report.ok += 1
        return report


def _outcome(future: Future[Any]) -> Any:
    if future.cancelled():
        return RuntimeError("cancelled")
    exc = future.exception()
    return exc if exc is not None else future.result()


def read_starts(log_dir: str) -> dict[int, list[tuple[int, float]]]:
    """pid -> [(task id, start time)] from the handlers' start logs, in the order they started."""
    return {pid: [(tid, t) for (tid, _), t in runs] for pid, runs in read_stage_starts(log_dir).items()}


def read_stage_starts(log_dir: str) -> dict[int, list[tuple[tuple[int, str], float]]]:
    """pid -> [((task id, stage), start time)]: as :func:`read_starts`, keyed also by the pipeline stage
    a start names ("" for a plain task or a pipeline's first stage): a pipeline runs one id in several
    stages, and a stage's rerun must be told from the next stage's first run."""
    out: dict[int, list[tuple[tuple[int, str], float]]] = {}
    for name in os.listdir(log_dir):
        if not name.endswith(".starts"):
            continue
        pid = int(name.split(".")[0])
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                parts = line.split()
                if len(parts) in (2, 3):
                    stage = parts[2] if len(parts) == 3 else ""
                    out.setdefault(pid, []).append(((int(parts[0]), stage), float(parts[1])))
    return out


def started(log_dir: str, task: int) -> tuple[int, float] | None:
    """(pid, start time) of the first logged run of ``task``, or None if it has not started."""
    for pid, runs in read_starts(log_dir).items():
        for tid, t in runs:
            if tid == task:
                return pid, t
    return None


def runs_per_task(starts: Mapping[int, list[tuple[int, float]]]) -> dict[int, list[float]]:
    """task id -> the start time of each of its handler runs, sorted: more than one is work done twice."""
    out: dict[int, list[float]] = {}
    for runs in starts.values():
        for tid, t in runs:
            out.setdefault(tid, []).append(t)
    return {tid: sorted(ts) for tid, ts in out.items()}


K = TypeVar("K")


def restarts_after(starts: Mapping[int, list[tuple[K, float]]], victims: set[int], t_fault: float,
                   t_until: float = float("inf")) -> tuple[set[K], list[float]]:
    """Tasks the ``victims`` processes started before ``t_fault`` and that started again elsewhere
    after it: (their ids, delay from the fault to each one's first restart). A task is keyed by
    its id, or by (id, stage) from :func:`read_stage_starts`."""
    held: set[K] = set()
    for pid in victims:
        runs = [(tid, t) for tid, t in starts.get(pid, []) if t <= t_fault]
        if runs:
            held.add(runs[-1][0])  # what it was running when the fault hit (earlier ones finished)
    delays: list[float] = []
    for tid in held:
        later = [t for pid, runs in starts.items() if pid not in victims
                 for t_id, t in runs if t_id == tid and t_fault < t < t_until]
        if later:
            delays.append(min(later) - t_fault)
    return held, delays
