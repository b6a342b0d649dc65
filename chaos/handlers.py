"""Handlers the chaos scenarios and the test suite run (``ndpipe.chaos.handlers:NAME``): faults and
probes, kept out of ``ndpipe.examples`` (which shows what a handler looks like).

``work`` derives its answer from its input alone (an array seeded by the task id), so the checker
can recompute what every answer must be. Each run also appends ``task-id start-time`` to a file
named after its pid in ``log_dir``: after the run, the scenario knows which tasks a killed or
frozen process was holding and when each of them started again elsewhere.
"""

from __future__ import annotations

import os
import signal
import time
from typing import IO, Any

import numpy as np

# The services of a chaos cluster (``Cluster(SERVICES, ...)``); scenarios that need more add their own.
SERVICES: dict[str, Any] = {
    "work": "ndpipe.chaos.handlers:work",
    "hang": "ndpipe.chaos.handlers:hang",
    "hog": "ndpipe.chaos.handlers:hog",
}
_logs: dict[str, IO[str]] = {}


def expected(tid: int, size: int) -> float:
    """The one correct answer for task ``tid``: the sum of squares of a seeded array."""
    x = np.random.default_rng(tid).standard_normal(size)
    return float(np.dot(x, x))


def _log_start(log_dir: str, tid: int, stage: str = "") -> float:
    start = time.monotonic()
    if log_dir:
        f = _logs.get(log_dir)
        if f is None:
            f = _logs[log_dir] = open(os.path.join(log_dir, f"{os.getpid()}.starts"), "a", buffering=1)
        f.write(f"{tid} {start:.6f} {stage}\n" if stage else f"{tid} {start:.6f}\n")
    return start


def work(tid: int, size: int = 64, seconds: float = 0.0, log_dir: str = "") -> list[Any]:
    """``[tid, expected(tid, size), pid, start]`` after sleeping ``seconds``."""
    start = _log_start(log_dir, tid)
    if seconds:
        time.sleep(seconds)
    return [tid, expected(tid, size), os.getpid(), start]


def hang(tid: int, log_dir: str = "") -> None:
    """Never returns: a busy loop holding the GIL (only the worker's deadline ends it)."""
    _log_start(log_dir, tid)
    n = 0
    while True:
        n += 1


def hang_deaf(tid: int, log_dir: str = "") -> None:
    """Like :func:`hang`, but first ignores SIGALRM, the lane's own deadline timer: only the daemon's
    backstop can end it."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    hang(tid, log_dir)


def hog(tid: int, log_dir: str = "") -> None:
    """Allocate (and touch) 64 MiB blocks until the process runs out of memory."""
    _log_start(log_dir, tid)
    blocks = []
    while True:
        blocks.append(np.ones(8 << 20))


# ---- faults and probes for the test suite (not examples of handlers) ----------------------------


def crash(code: int = 0) -> None:
    """Kill the compute process outright (as a segfault or the OOM killer would)."""
    os.kill(os.getpid(), signal.SIGKILL)


def zeros(n: int) -> np.ndarray:
    """A float64 array of ``n`` zeros: a small call with a large result."""
    return np.zeros(n)


def crash_on(x: Any, bad: Any) -> Any:
    """Return ``x``, but kill the compute process when ``x == bad`` (a poison input)."""
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def spin(seconds: float) -> int:
    """A pure-Python busy loop holding the GIL for ``seconds``."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def nap(x: np.ndarray) -> np.ndarray:
    """Sleep for the shard's largest value in seconds, then return it: a slow ``ndpipe submit`` service."""
    time.sleep(float(np.max(x)))
    return x


def pid() -> int:
    """The compute process's pid (tests use it to pick a victim)."""
    return os.getpid()


def slow_pid(seconds: float) -> int:
    """Sleep, then return the pid that ran the task."""
    time.sleep(seconds)
    return os.getpid()


def array_info(x: Any, scale: float = 1.0) -> list[Any]:
    """What a handler sees of an array (from a ref or not): [writeable, sum × scale, shape, pid]."""
    return [bool(x.flags.writeable), float(np.sum(x)) * scale, list(x.shape), os.getpid()]


class Resident:
    """A resident service for the tests: counts its constructions (a file per pid in ``log_dir``)
    and its calls, so a test sees that each lane built it once, before its first task."""

    def __init__(self, log_dir: str = "", scale: float = 1.0) -> None:
        self.scale = scale
        self.calls = 0
        if log_dir:
            with open(os.path.join(log_dir, f"{os.getpid()}.built"), "a") as f:
                f.write(f"{time.monotonic():.6f}\n")

    def __call__(self, x: float) -> list[Any]:
        self.calls += 1
        return [x * self.scale, os.getpid(), self.calls]


class BrokenInit:
    """A resident service whose constructor always fails (``init`` names what it raises)."""

    def __init__(self, error: str = "ValueError", message: str = "weights file is corrupt") -> None:
        raise {"ValueError": ValueError, "MemoryError": MemoryError, "KeyError": KeyError}[error](message)

    def __call__(self) -> None:  # never reached
        raise AssertionError("constructed after all")


class Hog:
    """A resident service whose constructor allocates ``mib`` MiB (past worker.memory_limit)."""

    def __init__(self, mib: int = 1024) -> None:
        self.block = bytearray(mib * 2**20)

    def __call__(self) -> int:
        return len(self.block)


class NotCallable:
    """A class without ``__call__``: a worker must refuse it as a handler at start."""


class Tally:
    """A pipeline stage for the tests: ``x + add`` after ``seconds``, appending its pid to
    ``log_dir/name.calls`` at the start of every call (so a test counts each stage's runs)."""

    def __init__(self, log_dir: str, name: str, add: float = 1.0, seconds: float = 0.0) -> None:
        self.path = os.path.join(log_dir, f"{name}.calls")
        self.add, self.seconds = add, seconds

    def __call__(self, x: Any) -> Any:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.seconds:
            time.sleep(self.seconds)
        return x + self.add


class Relay:
    """A later pipeline stage for the chaos runs: logs a start for the task its input belongs to (in
    ``log_dir``, as ``work`` does, tagged with ``stage``), sleeps ``seconds``, and passes
    ``[tid, value]`` on unchanged."""

    def __init__(self, log_dir: str = "", seconds: float = 0.0, stage: str = "relay") -> None:
        self.log_dir, self.seconds, self.stage = log_dir, seconds, stage

    def __call__(self, prev: list[Any]) -> list[Any]:
        start = _log_start(self.log_dir, int(prev[0]), self.stage)
        if self.seconds:
            time.sleep(self.seconds)
        return [prev[0], prev[1], os.getpid(), start]


def ref_work(tid: int, x: Any, log_dir: str = "") -> list[Any]:
    """``[tid, checksum of x's bytes, pid, start]``: ``x`` arrives as an array ref (cache pressure).
    A checksum of every byte, not a float sum: a sum's rounding depends on the BLAS threads."""
    start = _log_start(log_dir, tid)
    return [tid, checksum(x), os.getpid(), start]


def checksum(x: Any) -> str:
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=8).hexdigest()


def work_from(args: list[Any]) -> list[Any]:
    """``work(*args)`` as a pipeline's first stage (a stage takes one argument)."""
    return work(*args)


def counter(n: int, seconds: float = 0.0, fail_at: int = -1, log_dir: str = "") -> Any:
    """A generator handler (``Master.stream``): yields ``[i, pid]`` for i < n, each after ``seconds``;
    raises at part ``fail_at``. When it ends, however it ends, appends ``made`` to
    ``log_dir/<pid>.closed``, so a test sees that a closed stream stopped its generator."""
    made = 0
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"failed at part {i}")
            if seconds:
                time.sleep(seconds)
            made += 1
            yield [i, os.getpid()]
    finally:
        if log_dir:
            with open(os.path.join(log_dir, f"{os.getpid()}.closed"), "a") as f:
                f.write(f"{made}\n")


# ---- iterations (Master.iterate): steps for the tests and the chaos runs --------------------------
def slow_ring_step(state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Any:
    """``examples.exchange.ring_step`` after sleeping ``state["delay"]`` seconds (a round long enough
    to kill a lane in)."""
    from ndpipe.examples.exchange import ring_step

    time.sleep(float(state.get("delay", 0.0)))
    return ring_step(state, inbox, round)


class WeightedRing:
    """A resident step (a class service, built once per lane with ``init``): the ring's averaging with
    the received row weighted by ``weight`` (0.5 is ``ring_step``'s plain mean)."""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def __call__(self, state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Any:
        x = np.asarray(state["x"], dtype=np.float64)
        change = float("inf")
        if inbox:
            (_src, received), = inbox
            new = (1.0 - self.weight) * x + self.weight * received
            change, x = float(np.max(np.abs(new - x))), new
        return {**state, "x": x}, {(int(state["i"]) + 1) % int(state["n"]): x}, change


def bad_step(state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Any:
    """Misbehaves at ``state["at"]`` (round) in partition ``state["i"] == 1`` as ``state["how"]`` says."""
    if round == state.get("at", 0) and state.get("i") == 1:
        how = state.get("how")
        if how == "raise":
            raise ValueError(f"bad data in round {round}")
        if how == "hang":
            time.sleep(3600)
        if how == "huge":
            return state, {}, 10**400
        if how == "long":
            raise ValueError("x" * 2_000_000)
        if how == "shape":
            return state, {}
        if how == "dest":
            return state, {99: 1.0}, 0.0
        if how == "metric":
            return state, {}, "small"
        if how == "message":
            return state, {0: {1, 2}}, 0.0
        if how == "state":
            return {**state, "s": {3}}, {}, 0.0
    return state, {}, float(state.get("metric", 1.0))


class Spooled:
    """The spool scenario's handler (resident, so ``log_dir`` comes from YAML): logs a start for the job
    whose id is the input's first element, sleeps ``seconds``, returns ``2 x + 1``."""

    def __init__(self, log_dir: str = "", seconds: float = 0.0) -> None:
        self.log_dir, self.seconds = log_dir, seconds

    def __call__(self, x: np.ndarray) -> np.ndarray:
        _log_start(self.log_dir, int(x.flat[0]))
        if self.seconds:
            time.sleep(self.seconds)
        out: np.ndarray = 2 * x + 1
        return out
