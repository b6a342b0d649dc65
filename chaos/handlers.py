"""Handlers the chaos scenarios run (``ndpipe.chaos.handlers:NAME``).

``work`` derives its answer from its input alone (an array seeded by the task id), so the checker
can recompute what every answer must be. Each run also appends ``task-id start-time`` to a file
named after its pid in ``log_dir``: after the run, the scenario knows which tasks a killed or
frozen process was holding and when each of them started again elsewhere.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

import numpy as np

_logs: dict[str, IO[str]] = {}


def expected(tid: int, size: int) -> float:
    """The one correct answer for task ``tid``: the sum of squares of a seeded array."""
    x = np.random.default_rng(tid).standard_normal(size)
    return float(np.dot(x, x))


def _log_start(log_dir: str, tid: int) -> float:
    start = time.monotonic()
    if log_dir:
        f = _logs.get(log_dir)
        if f is None:
            f = _logs[log_dir] = open(os.path.join(log_dir, f"{os.getpid()}.starts"), "a", buffering=1)
        f.write(f"{tid} {start:.6f}\n")
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


def hog(tid: int, log_dir: str = "") -> None:
    """Allocate (and touch) 64 MiB blocks until the process runs out of memory."""
    _log_start(log_dir, tid)
    blocks = []
    while True:
        blocks.append(np.ones(8 << 20))
