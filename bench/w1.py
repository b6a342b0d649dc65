"""W1: many tiny identity tasks, pipelined, against raw pyzmq baselines measured in the same run.

    python -m ndpipe.bench.w1            # or: python bench/w1.py   (--help for options)

20,000 tasks of ``b"x" * 64`` through 2 compute processes, at most 1,000 in flight. Two baselines
do the same hops (``bench/_raw.py``): a DEALER client (this process) → a C ``zmq.proxy``
ROUTER/DEALER device (its own process) → 2 DEALER echo processes; and the same with the proxy
replaced by a minimal pure-Python ROUTER/ROUTER broker (round robin, no bookkeeping: the floor for
any broker written in Python). ndpipe is measured per message (``Master.submit`` × N, one task
per message, then wait for all) and through ``Master.map`` (batches of calls per message, chosen
automatically), for each worker layout and prefetch. Each ndpipe figure is divided by baseline runs
made just before it (timings on this machine drift by up to 2× from minute to minute, a ratio taken
seconds apart much less).

CPU columns are user+system CPU µs per task from psutil, before/after each measurement: broker
(or proxy), worker daemons, compute (or echo) processes, and this process (master or raw client).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import Any

import psutil

from ndpipe.bench._cluster import LocalCluster, cpu_seconds, machine_line
from ndpipe.bench._raw import PAYLOAD, RawBaseline

LAYOUTS = {"2x1": (2, 1), "1x2": (1, 2)}  # worker daemons × compute processes each


# ---- ndpipe -------------------------------------------------------------------------------------
def ndpipe_submit(master: Any, n: int) -> float:
    t0 = time.perf_counter()
    futures = [master.submit("echo", PAYLOAD) for _ in range(n)]
    results = [f.result(timeout=120) for f in futures]
    elapsed = time.perf_counter() - t0
    if results.count(PAYLOAD) != n:
        raise AssertionError("ndpipe echo returned a wrong value")
    return elapsed


def ndpipe_map(master: Any, n: int) -> float:
    t0 = time.perf_counter()
    results = list(master.map("echo", repeat(PAYLOAD, n)))
    elapsed = time.perf_counter() - t0
    if len(results) != n or results.count(PAYLOAD) != n:
        raise AssertionError("ndpipe map returned a wrong value")
    return elapsed


# ---- measurement --------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    rate: float
    cpu: dict[str, float]  # seconds per task by role
    raw_rate: float | None = None
    py_rate: float | None = None  # the minimal Python broker, for per-message rows

    @property
    def ratio(self) -> float | None:
        return self.rate / self.raw_rate if self.raw_rate else None

    @property
    def py_ratio(self) -> float | None:
        return self.rate / self.py_rate if self.py_rate else None


@contextmanager
def cpu_meter(pids: dict[str, Any], out: dict[str, float]) -> Iterator[None]:
    """Fill ``out`` with CPU seconds spent by each role (broker / workers / compute / client) meanwhile."""
    roles = {k: [v] if isinstance(v, int) else list(v) for k, v in pids.items()}
    roles["client"] = [os.getpid()]
    before = {k: sum(cpu_seconds(p) for p in ps) for k, ps in roles.items()}
    yield
    for k, ps in roles.items():
        out[k] = sum(cpu_seconds(p) for p in ps) - before[k]


def measure(name: str, n: int, pids: dict[str, Any], fn: Callable[[], float]) -> Row:
    cpu: dict[str, float] = {}
    with cpu_meter(pids, cpu):
        elapsed = fn()
    return Row(name, n / elapsed, {k: v / n for k, v in cpu.items()})


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:7.1f}"


def print_table(rows: list[Row]) -> None:
    head = (f"{'configuration':<40} {'tasks/s':>8} {'raw':>8} {'×raw':>6} {'py-brk':>7} {'×py':>5} | CPU µs/task: "
            f"{'broker':>7} {'daemons':>7} {'compute':>7} {'client':>7} {'total':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        raw = f"{r.raw_rate:8,.0f}" if r.raw_rate else f"{'':>8}"
        ratio = f"{r.ratio:6.3f}" if r.ratio else f"{'':>6}"
        py = f"{r.py_rate:7,.0f}" if r.py_rate else f"{'':>7}"
        py_ratio = f"{r.py_ratio:5.2f}" if r.py_ratio else f"{'':>5}"
        c = r.cpu
        print(f"{r.name:<40} {r.rate:8,.0f} {raw} {ratio} {py} {py_ratio} |              {fmt_us(c['broker'])} "
              f"{fmt_us(c['workers'])} {fmt_us(c['compute'])} {fmt_us(c['client'])} {fmt_us(sum(c.values()))}")


# (layout, prefetch, modes): the default plan. ``submit`` is one task per message; ``map`` batches.
PLAN: list[tuple[str, int, tuple[str, ...]]] = [
    ("1x2", 0, ("submit", "map")),
    ("2x1", 16, ("submit",)),
    ("1x2", 16, ("submit", "map")),
    ("1x2", 64, ("submit",)),
]


def run(n: int, window: int, plan: list[tuple[str, int, tuple[str, ...]]], stop_and_wait: bool = True) -> list[Row]:
    rows: list[Row] = []
    print(machine_line())
    print(f"W1: {n:,} identity tasks of {len(PAYLOAD)} bytes, window {window}, 2 compute processes; "
          "each ndpipe row is divided by the baseline runs made just before it\n", flush=True)
    fns = {"submit": ndpipe_submit, "map": ndpipe_map}
    raw_name = f"raw zmq.proxy, window {window}"
    py_name = f"raw Python broker, window {window}"
    with RawBaseline(workers=2) as raw, RawBaseline(workers=2, broker="python") as py:
        raw.run(min(n, 2000), window)  # warm-up
        py.run(min(n, 2000), window)
        if stop_and_wait:  # a reference: the same hops with only one task in flight per echo process
            k = min(n, 5000)
            rows.append(measure("raw zmq.proxy, window 2 (reference)", k, raw.pids(), lambda: raw.run(k, 2)))
            print(f"  {rows[-1].name}: {rows[-1].rate:,.0f} tasks/s", flush=True)
        for layout, prefetch, modes in plan:
            workers, processes = LAYOUTS[layout]
            with LocalCluster(workers=workers, processes=processes, prefetch=prefetch) as cluster:
                with cluster.master(window=window) as master:
                    ndpipe_submit(master, min(n, 2000))  # warm-up: imports, caches, connections
                    ndpipe_map(master, min(n, 2000))
                    for mode in modes:
                        base = measure(raw_name, n, raw.pids(), lambda: raw.run(n, window))
                        pyb = measure(py_name, n, py.pids(), lambda: py.run(n, window))
                        label = f"ndpipe {mode:<6} {workers}w×{processes}p prefetch={prefetch}"
                        row = measure(label, n, cluster.pids(), partial(fns[mode], master, n))
                        row.raw_rate, row.py_rate = base.rate, pyb.rate
                        rows += [base, pyb, row]
                        print(f"  {label}: {row.rate:,.0f} tasks/s, raw {base.rate:,.0f} → ratio {row.ratio:.3f}, "
                              f"Python broker {pyb.rate:,.0f} → ratio {row.py_ratio:.2f}; "
                              f"broker {row.cpu['broker'] * 1e6:.1f} µs/task", flush=True)
                    c = master.status()["counters"]
                    if c["failed"] or c["requeued"]:
                        print(f"  note: broker counters {c}")
    print()
    print_table(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--all", action="store_true",
                    help="every layout × prefetch × mode (about 100 s here) instead of the default plan")
    ap.add_argument("--layouts", help="only these layouts (daemons x processes), e.g. 2x1,1x2")
    ap.add_argument("--prefetch", help="only these prefetch values, e.g. 0,16")
    ap.add_argument("--modes", help="only these modes: submit,map")
    ap.add_argument("--no-reference", action="store_true", help="skip the raw window-2 reference row")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2,000 tasks, one layout (a few seconds)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.layouts, args.prefetch, args.no_reference = 2000, "1x2", "16", True
    plan: list[tuple[str, int, tuple[str, ...]]]
    if args.all:
        plan = [(lay, pf, ("submit", "map")) for lay in LAYOUTS for pf in (0, 16, 64)]
    else:
        plan = list(PLAN)
    if args.layouts:
        plan = [p for p in plan if p[0] in args.layouts.split(",")]
    if args.prefetch:
        plan = [p for p in plan if p[1] in [int(x) for x in args.prefetch.split(",")]]
    if args.modes:
        keep = args.modes.split(",")
        plan = [(lay, pf, tuple(m for m in modes if m in keep)) for lay, pf, modes in plan]
        plan = [p for p in plan if p[2]]
    t0 = time.monotonic()
    run(args.tasks, args.window, plan, stop_and_wait=not args.no_reference)
    print(f"\ntotal wall time {time.monotonic() - t0:.1f} s; load average "
          f"{', '.join(f'{x:.2f}' for x in psutil.getloadavg())} (other work on the machine skews every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
