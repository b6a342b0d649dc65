"""Handlers for the benchmarks (``ndpipe.bench._handlers:NAME``)."""

from __future__ import annotations

import os
import time
from typing import Any


def stamped_sleep(seconds: float, marker_dir: str = "") -> dict[str, Any]:
    """Sleep ``seconds``; return when this run started and which process ran it.

    ``start`` is ``time.monotonic()``: on Linux that is CLOCK_MONOTONIC, one clock for the whole host,
    so it compares with the master's reading in another process (and, unlike ``time.time()``, an NTP
    step cannot move it). With ``marker_dir``, a file named after this pid is written at start so the
    benchmark knows, while the task still runs, which compute process to kill.
    """
    start = time.monotonic()
    pid = os.getpid()
    if marker_dir:
        path = os.path.join(marker_dir, str(pid))
        with open(path + ".tmp", "w") as f:
            f.write(repr(start))
        os.replace(path + ".tmp", path)  # the reader never sees a half-written file
    time.sleep(seconds)
    return {"start": start, "pid": pid, "ppid": os.getppid()}


def cpu_work(iterations: int) -> int:
    """A fixed amount of pure-Python CPU work: ``iterations`` rounds of an integer LCG; returns the last value.

    Fixed work, not a loop that watches the clock (like ``ndpipe.chaos.handlers:spin``): when more
    processes than cores share the CPU, a clock-watching loop still ends on time, having done less,
    and would show a speed-up the machine does not have. No numpy, so no BLAS threads either.
    """
    x = 0
    for i in range(iterations):
        x = (x * 1103515245 + 12345 + i) & 0xFFFFFFFF
    return x


def pick(w: Any, i: int) -> float:
    """One element of a (large) array: the task is the data movement, not the work (bench refs)."""
    flat = w.reshape(-1)
    return float(flat[i % flat.size])


def raw_pick(frames: list[Any]) -> list[bytes]:
    """``pick`` for the raw baseline: frame 0 the array's float64 bytes, frame 1 an index (8 octets)."""
    import numpy as np

    arr = np.frombuffer(frames[0].buffer, np.float64)
    i = int.from_bytes(frames[1].bytes, "big")
    return [arr[i % arr.size].tobytes()]


def add_one(x: Any) -> Any:
    """A tiny pipeline stage (bench stages): ``x + 1``."""
    return x + 1


def raw_add_one(frames: list[Any]) -> list[bytes]:
    """``add_one`` for the raw baseline: frame 0 float64 bytes, returned plus one."""
    import numpy as np

    return [(np.frombuffer(frames[0].buffer, np.float64) + 1).tobytes()]


def make_parts(n: int, seconds: float = 0.0) -> Any:
    """A generator of ``n`` small parts (a 16-float array each), one every ``seconds``: a stand-in
    for token-by-token generation (bench stages, the stream rows)."""
    import numpy as np

    for i in range(n):
        if seconds:
            time.sleep(seconds)
        yield np.full(16, float(i))


def all_parts(n: int, seconds: float = 0.0) -> list[Any]:
    """The same parts returned at once, as a list: what a caller without streams would get."""
    return list(make_parts(n, seconds))
