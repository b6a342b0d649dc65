"""W1: many tiny identity tasks, pipelined, against a raw pyzmq baseline measured in the same run.

    python -m ndpipe.bench.w1            # or: python bench/w1.py   (--help for options)

20,000 tasks of ``b"x" * 64`` through 2 compute processes, at most 1,000 in flight. The baseline
does the same hops with nothing but libzmq: a DEALER client (this process) → a C ``zmq.proxy``
ROUTER/DEALER device (its own process) → 2 DEALER echo processes. ndpipe is measured per message
(``Master.submit`` × N, then wait for all) and through ``Master.map``, for each worker layout and
prefetch. Each ndpipe figure is divided by a baseline run made just before it (timings on this
machine drift by up to 2× from minute to minute, a ratio taken seconds apart much less).

CPU columns are user+system CPU µs per task from psutil, before/after each measurement: broker
(or proxy), worker daemons, compute (or echo) processes, and this process (master or raw client).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import psutil
import zmq

from ndpipe.bench._cluster import LocalCluster, cpu_seconds, machine_line, stop_process

PAYLOAD = b"x" * 64
RAW_HWM = 1_000_000  # a ROUTER drops what it cannot queue; at default HWM bursts of 1,000+ can hit it
PROBE = b"?"  # echo processes answer this with their pid: the baseline waits until both answered
LAYOUTS = {"2x1": (2, 1), "1x2": (1, 2)}  # worker daemons × compute processes each


# ---- the raw pyzmq baseline -----------------------------------------------------------------------
def _raw_proxy(front: str, back: str) -> None:
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.sndhwm = s.rcvhwm = RAW_HWM
        s.linger = 0
    router.bind(front)
    dealer.bind(back)
    zmq.proxy(router, dealer)  # C loop; ends with the process (SIGTERM)


def _raw_echo(back: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.sndhwm = sock.rcvhwm = RAW_HWM
    sock.linger = 0
    sock.connect(back)
    pid = str(os.getpid()).encode()
    while True:
        frames = sock.recv_multipart()  # [client routing id, payload]
        if frames[-1] == PROBE:
            frames[-1] = pid
        sock.send_multipart(frames)


class RawBaseline:
    """The proxy and ``workers`` echo processes; :meth:`run` measures one pipelined batch."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self.ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.tmp = ""

    def __enter__(self) -> RawBaseline:
        self.tmp = tempfile.mkdtemp(prefix="ndpr-")
        front, back = f"ipc://{self.tmp}/f", f"ipc://{self.tmp}/b"
        try:
            self.proxy = self.ctx.Process(target=_raw_proxy, args=(front, back), name="raw-proxy")
            self.proxy.start()
            self.echoes = [self.ctx.Process(target=_raw_echo, args=(back,), name=f"raw-echo-{i}")
                           for i in range(self.workers)]
            self.procs = [self.proxy, *self.echoes]
            for p in self.echoes:
                p.start()
            self.zctx = zmq.Context()
            self.sock = self.zctx.socket(zmq.DEALER)
            self.sock.sndhwm = self.sock.rcvhwm = RAW_HWM
            self.sock.linger = 0
            self.sock.connect(front)
            self._wait_all_echoes()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close(0)
            self.zctx.term()
            self.sock = None
        for p in self.procs:
            stop_process(p)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""

    def _wait_all_echoes(self, timeout: float = 60.0) -> None:
        """Probe until every echo process has answered (so no early connecter gets the whole batch)."""
        seen: set[bytes] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(seen)} of {self.workers} echo processes answered")
            self.sock.send(PROBE)
            if self.sock.poll(100):
                while self.sock.poll(0):
                    seen.add(self.sock.recv())
        time.sleep(0.1)
        while self.sock.poll(50):  # late probe answers
            self.sock.recv()

    def run(self, n: int, window: int) -> float:
        """Send ``n`` payloads with at most ``window`` in flight; return elapsed seconds."""
        sock = self.sock
        sent = received = 0
        t0 = time.perf_counter()
        while received < n:
            while sent < n and sent - received < window:
                sock.send(PAYLOAD)
                sent += 1
            if not sock.poll(30_000):
                raise TimeoutError(f"raw baseline stalled at {received}/{n} replies")
            while True:
                try:
                    reply = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if reply != PAYLOAD:
                    raise AssertionError(f"raw echo returned {reply[:16]!r}")
                received += 1
        return time.perf_counter() - t0

    def pids(self) -> dict[str, list[int]]:
        return {"broker": [self.proxy.pid], "workers": [], "compute": [p.pid for p in self.echoes]}


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

    @property
    def ratio(self) -> float | None:
        return self.rate / self.raw_rate if self.raw_rate else None


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
    head = (f"{'configuration':<38} {'tasks/s':>8} {'raw tasks/s':>11} {'ratio':>6} | CPU µs/task: "
            f"{'broker':>7} {'daemons':>7} {'compute':>7} {'client':>7} {'total':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        raw = f"{r.raw_rate:11,.0f}" if r.raw_rate else f"{'':>11}"
        ratio = f"{r.ratio:6.3f}" if r.ratio else f"{'':>6}"
        c = r.cpu
        print(f"{r.name:<38} {r.rate:8,.0f} {raw} {ratio} |              {fmt_us(c['broker'])} "
              f"{fmt_us(c['workers'])} {fmt_us(c['compute'])} {fmt_us(c['client'])} {fmt_us(sum(c.values()))}")


# (layout, prefetch, modes): the default plan, chosen to fit in well under 2 minutes. ``map`` goes
# through the same broker path as ``submit`` (only the client loop differs), so it is measured on
# one layout; --all measures the full cross product.
PLAN: list[tuple[str, int, tuple[str, ...]]] = [
    ("2x1", 0, ("submit",)),
    ("1x2", 0, ("submit", "map")),
    ("2x1", 16, ("submit",)),
    ("1x2", 16, ("submit", "map")),
]


def run(n: int, window: int, plan: list[tuple[str, int, tuple[str, ...]]], stop_and_wait: bool = True) -> list[Row]:
    rows: list[Row] = []
    print(machine_line())
    print(f"W1: {n:,} identity tasks of {len(PAYLOAD)} bytes, window {window}, 2 compute processes; "
          "each ndpipe row is divided by the raw run made just before it\n", flush=True)
    fns = {"submit": ndpipe_submit, "map": ndpipe_map}
    raw_name = f"raw zmq.proxy, window {window}"
    with RawBaseline(workers=2) as raw:
        raw.run(min(n, 2000), window)  # warm-up
        if stop_and_wait:  # a reference: the same hops with only one task in flight per echo process
            k = min(n, 5000)
            rows.append(measure("raw zmq.proxy, window 2 (reference)", k, raw.pids(), lambda: raw.run(k, 2)))
            print(f"  {rows[-1].name}: {rows[-1].rate:,.0f} tasks/s", flush=True)
        for layout, prefetch, modes in plan:
            workers, processes = LAYOUTS[layout]
            with LocalCluster(workers=workers, processes=processes, prefetch=prefetch) as cluster:
                with cluster.master(window=window) as master:
                    ndpipe_submit(master, min(n, 2000))  # warm-up: imports, caches, connections
                    for mode in modes:
                        base = measure(raw_name, n, raw.pids(), lambda: raw.run(n, window))
                        label = f"ndpipe {mode:<6} {workers}w×{processes}p prefetch={prefetch}"
                        row = measure(label, n, cluster.pids(), lambda m=master, f=fns[mode]: f(m, n))
                        row.raw_rate = base.rate
                        rows += [base, row]
                        print(f"  {label}: {row.rate:,.0f} tasks/s, raw {base.rate:,.0f} → "
                              f"ratio {row.ratio:.3f}; broker {row.cpu['broker'] * 1e6:.1f} µs/task", flush=True)
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
    args = ap.parse_args(argv)
    if args.all:
        plan = [(lay, pf, ("submit", "map")) for lay in LAYOUTS for pf in (0, 16)]
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
