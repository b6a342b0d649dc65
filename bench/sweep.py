"""Payload sweep: float64 arrays from 64 B to 64 MiB, one at a time and pipelined, ndpipe ÷ raw pyzmq.

    python -m ndpipe.bench.sweep                      # or: python bench/sweep.py    (~1–2 min)
    python -m ndpipe.bench.sweep --sizes 1M 64M       # only these sizes (B, K/KiB, M/MiB suffixes)
    python -m ndpipe.bench.sweep --quick              # smoke test, a few seconds, figures meaningless

W1–W3 look at one payload size each; this shows where ndpipe's per-call cost stops mattering and
copies start to. For each size an echo of ``default_rng(0).standard_normal(size // 8)`` is measured
four ways, each raw figure right before its ndpipe counterpart (timings here drift 2× minute to
minute, the ratio much less):

* **seq** — one call at a time: ``Master.call("echo", (arr,)).result()`` vs one raw message and its
  reply. Every call is timed; tasks/s is calls ÷ the sum of their times.
* **pipe** — at most ``--window`` (8) in flight: ``master.map`` over a Master with that window vs
  the raw client with the same window. map's items come from a generator that stops after the time
  budget, so map cannot know their number and sends one task per call (it batches only when it
  knows the count, or is told a chunksize): this row is per-task pipelining, like the raw one.

Each measurement runs for ``--seconds`` (1.5 s; then the tasks in flight are collected), and for at
least 3 calls (seq) or one window's worth (pipe), so a 64 MiB point may take longer. GB/s counts the
bytes both ways (2 × size per task; GB = 10⁹ bytes); ratio = ndpipe ÷ raw. Each reply is checked
cheaply inside the timing (dtype, shape, first and last element) and in full once per size outside it.
Before the measurements each side gets warm-up calls, one at a time and one window's worth pipelined.
A round trip moves the payload 6 times between processes in ndpipe (master → broker → worker daemon
→ compute process and back) and 4 times in raw (client → proxy → echo and back), so where copying
dominates (large arrays) a ratio near 0.67 is the most to expect from this design.

ndpipe: a broker and 1 worker daemon × 2 compute processes, prefetch 0, service ``echo`` =
``ndpipe.examples.handlers:echo``. Arrays under 64 KiB travel inside ndpipe's msgpack header
(copied), larger ones in their own zero-copy frame; ``max_frame_bytes`` defaults to 1 GiB on broker,
worker and master, so 64 MiB fits. Raw (``bench/_raw.py``): DEALER → C ``zmq.proxy`` → 2 DEALER
echo processes, copying frames under 64 KiB and zero-copy from there, the same line ndpipe draws.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from ndpipe.bench._common import bench_cluster, machine_line
from ndpipe.bench._raw import RawBaseline, same

SIZES = ["64", "1K", "16K", "64K", "256K", "1M", "8M", "64M"]
QUICK_SIZES = ["64", "64K", "8M"]
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GIB": 1 << 30}
# Heartbeats share the sockets with the payloads: behind 8 × 64 MiB queued on a link a PONG or a
# worker heartbeat can be late, so allow 10 silent intervals instead of 3 (no task timeout is set).
CLUSTER_CONFIG: dict[str, dict[str, Any]] = {"broker": {"liveness": 10}, "master": {"liveness": 10}}


def parse_size(text: str) -> int:
    """``64``, ``16K``, ``16KiB``, ``8M``, ``64MiB`` → bytes; must be a positive multiple of 8 (float64)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 64, 16K, 8MiB")
    size = int(m[1]) * _UNITS[m[2].upper()]
    if size <= 0 or size % 8:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 8 bytes (float64)")
    return size


def fmt_size(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


@dataclass
class Point:
    size: int
    mode: str  # "seq" or "pipe"
    tasks: int
    seconds: float
    raw_tasks: int
    raw_seconds: float

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds

    @property
    def raw_rate(self) -> float:
        return self.raw_tasks / self.raw_seconds

    @property
    def gbps(self) -> float:
        return self.rate * 2 * self.size / 1e9

    @property
    def raw_gbps(self) -> float:
        return self.raw_rate * 2 * self.size / 1e9

    @property
    def ratio(self) -> float:
        return self.rate / self.raw_rate


# ---- the four measurements ----------------------------------------------------------------------
def raw_seq(raw: RawBaseline, arr: np.ndarray, seconds: float, min_tasks: int) -> tuple[int, float]:
    n, busy = 0, 0.0
    end = time.perf_counter() + seconds
    while n < min_tasks or time.perf_counter() < end:
        busy += raw.roundtrip(arr)
        n += 1
    return n, busy


def ndpipe_seq(master: Any, arr: np.ndarray, seconds: float, min_tasks: int) -> tuple[int, float]:
    n, busy = 0, 0.0
    end = time.perf_counter() + seconds
    while n < min_tasks or time.perf_counter() < end:
        t0 = time.perf_counter()
        result = master.call("echo", (arr,)).result()
        ok = same(result, arr)
        busy += time.perf_counter() - t0
        if not ok:
            raise AssertionError("ndpipe echo returned a different array")
        n += 1
    return n, busy


def ndpipe_pipe(master: Any, arr: np.ndarray, seconds: float, min_tasks: int) -> tuple[int, float]:
    """``master.map`` over items that stop coming after ``seconds``; the Master's window bounds what is in flight."""
    t0 = time.perf_counter()
    end = t0 + seconds

    def items() -> Iterator[np.ndarray]:
        k = 0
        while k < min_tasks or time.perf_counter() < end:
            yield arr
            k += 1

    n = 0
    for result in master.map("echo", items()):
        if not same(result, arr):
            raise AssertionError("ndpipe map returned a different array")
        n += 1
    return n, time.perf_counter() - t0


def check_full(raw: RawBaseline, master: Any, arr: np.ndarray) -> None:
    """One echo on each side, compared in full (untimed); doubles as a warm-up."""
    for who, got in (("raw", raw.echo(arr)[0]), ("ndpipe", master.call("echo", (arr,)).result())):
        if not (isinstance(got, np.ndarray) and got.dtype == arr.dtype and np.array_equal(got, arr)):
            raise AssertionError(f"{who} echo of {fmt_size(arr.nbytes)} returned a different array")


def sweep_size(raw: RawBaseline, master: Any, size: int, seconds: float, window: int, min_seq: int) -> list[Point]:
    arr = np.random.default_rng(0).standard_normal(size // 8)
    check_full(raw, master, arr)
    # Each warm-up right before its own measurement (raw, then ndpipe), so no side measures while the
    # other is still freeing the buffers of its warm-up; more warm-up calls where each is cheap.
    warm = max(1, min(50, (1 << 20) // size))
    points = []
    raw_seq(raw, arr, 0.0, warm)
    r = raw_seq(raw, arr, seconds, min_seq)
    ndpipe_seq(master, arr, 0.0, warm)
    d = ndpipe_seq(master, arr, seconds, min_seq)
    points.append(Point(size, "seq", *d, *r))
    raw.run(window, window, arr)  # the first full window meets fresh buffers on every hop
    r = raw.run_for(seconds, window, arr, min_tasks=window)
    ndpipe_pipe(master, arr, 0.0, window)
    d = ndpipe_pipe(master, arr, seconds, window)
    points.append(Point(size, "pipe", *d, *r))
    for p in points:
        print(f"  {fmt_size(size):>7} {p.mode:<4}: ndpipe {p.rate:9,.1f} tasks/s {p.gbps:6.3f} GB/s, raw "
              f"{p.raw_rate:9,.1f} tasks/s {p.raw_gbps:6.3f} GB/s → ratio {p.ratio:.3f}", flush=True)
    return points


def print_table(points: list[Point], window: int) -> None:
    head = (f"{'size':>7} {'mode':<8} | {'tasks':>5} {'tasks/s':>9} {'GB/s':>6} | "
            f"{'raw tasks':>9} {'raw tasks/s':>11} {'raw GB/s':>8} | {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for p in points:
        mode = "seq" if p.mode == "seq" else f"pipe w{window}"
        print(f"{fmt_size(p.size):>7} {mode:<8} | {p.tasks:5d} {p.rate:9,.1f} {p.gbps:6.3f} | "
              f"{p.raw_tasks:9d} {p.raw_rate:11,.1f} {p.raw_gbps:8.3f} | {p.ratio:6.3f}")


def run(sizes: list[int], seconds: float, window: int, min_seq: int) -> list[Point]:
    print(machine_line())
    print(f"sweep: float64 echo, {', '.join(fmt_size(s) for s in sizes)}; ~{seconds:g} s per measurement, "
          f"pipelined window {window}; ndpipe 1 daemon × 2 compute processes, raw zmq.proxy + 2 echo processes\n",
          flush=True)
    points: list[Point] = []
    with RawBaseline(workers=2) as raw, bench_cluster(1, 2, broker=CLUSTER_CONFIG["broker"],
                                                          master=CLUSTER_CONFIG["master"]) as cluster:
        with cluster.master(window=window) as master:
            for size in sizes:
                points += sweep_size(raw, master, size, seconds, window, min_seq)
            c = master.status()["counters"]
            if c.get("failed") or c.get("requeued"):
                print(f"  note: broker counters {c}")
    print()
    print_table(points, window)
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help=f"{', '.join(QUICK_SIZES)} (unless --sizes) at ~0.05 s each: a smoke test of a few seconds")
    ap.add_argument("--sizes", nargs="+", type=parse_size, metavar="SIZE",
                    help=f"payload sizes in bytes, K/KiB or M/MiB (default {' '.join(SIZES)})")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per measurement (default 1.5)")
    ap.add_argument("--window", type=int, default=8, help="tasks in flight when pipelined (default 8)")
    ap.add_argument("--min-seq", type=int, default=3, help="at least this many sequential calls (default 3)")
    args = ap.parse_args(argv)
    sizes = args.sizes or [parse_size(s) for s in (QUICK_SIZES if args.quick else SIZES)]
    seconds, min_seq = (min(args.seconds, 0.05), 1) if args.quick else (args.seconds, args.min_seq)
    t0 = time.monotonic()
    run(sizes, seconds, args.window, min_seq)
    print(f"\ntotal wall time {time.monotonic() - t0:.1f} s; load average "
          f"{', '.join(f'{x:.2f}' for x in psutil.getloadavg())} (other work on the machine skews every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
