"""W1: many tiny identity tasks, pipelined, against raw pyzmq baselines measured in the same run.

    python -m ndpipe.bench.w1            # or: python bench/w1.py   (--help for options)

20,000 calls of ``b"x" * 64`` through 2 lanes, at most 1,000 tasks in flight. ndpipe makes 2
hops each way: master → broker → lane (the worker daemon supervises, off the data path). It is measured per
message (``Master.submit`` × N, one task per message, then wait for all) and through ``Master.map``
(calls packed into batches, one message per batch, sized automatically), for each worker layout
and prefetch. Each ndpipe row is divided by baselines (``bench/_raw.py``) that carry the same calls
packed the same way, measured just before it (timings on this machine drift by up to 2× from
minute to minute, a ratio taken seconds apart much less):

* ``×raw``: DEALER client (this process) → C ``zmq.proxy`` ROUTER/DEALER (its own process) → 2
  DEALER echo processes: 2 hops each way, as many as ndpipe;
* ``×relay``: the same plus a C ``zmq.proxy`` DEALER/DEALER relay process where ndpipe had its
  worker daemon before lanes: 3 hops each way (kept to compare with earlier tables);
* ``submit`` rows also get ``×py`` / ``×py+r``: the proxy replaced by a minimal pure-Python
  ROUTER/ROUTER broker (round robin, no bookkeeping: the floor for any broker in Python, issue 3's
  target), without and with the relay;
* ``map`` rows are divided by batched baselines (``bench/_rawbatch.py``): the same 20,000 calls in
  the batches map picks (same sizes, same number in flight), encoded by ndpipe's codec, each echo
  decoding its batch and returning one result per call, the client decoding the replies. Never by
  the per-message rate: that would divide ~20 messages by 20,000 (issue 8).

Every side keeps its results and checks them after its clock stops. One map of 20,000 tiny calls
takes ~40 ms, so map rows and their baselines run it ``--map-repeat`` times (10) back to back.

CPU columns are user+system CPU µs per call from psutil, before/after each measurement: broker
(or proxy), worker daemons (or relay), compute (or echo) processes, and this process (master or
raw client).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from typing import Any

import psutil

from ndpipe.bench._common import bench_cluster, cpu_seconds, machine_line
from ndpipe.bench._raw import PAYLOAD, RawBaseline
from ndpipe.bench._rawbatch import BATCH_ECHO, map_plan, run_batched
from ndpipe.cluster import Cluster

LAYOUTS = {"2x1": (2, 1), "1x2": (1, 2)}  # worker daemons × compute processes each
NDPIPE_HOPS = 2  # master → broker → lane
RATIOS = {"raw": "×raw", "relay": "×relay", "py": "×py", "py+relay": "×py+r"}  # baseline key → column


# ---- ndpipe -------------------------------------------------------------------------------------
def check(results: list[Any], n: int, who: str) -> None:
    if len(results) != n or results.count(PAYLOAD) != n:
        raise AssertionError(f"{who} returned a wrong value")


def ndpipe_submit(master: Any, n: int) -> float:
    t0 = time.perf_counter()
    futures = [master.submit("echo", PAYLOAD) for _ in range(n)]
    results = [f.result(timeout=120) for f in futures]
    elapsed = time.perf_counter() - t0
    check(results, n, "ndpipe echo")
    return elapsed


def ndpipe_map(master: Any, n: int, times: int = 1) -> float:
    total = 0.0
    for _ in range(times):
        t0 = time.perf_counter()
        results = list(master.map("echo", repeat(PAYLOAD, n)))
        total += time.perf_counter() - t0
        check(results, n, "ndpipe map")
    return total


def raw_batched(raw: RawBaseline, n: int, size: int, in_flight: int, times: int = 1) -> float:
    total = 0.0
    for _ in range(times):
        elapsed, results = run_batched(raw, repeat(PAYLOAD, n), size, in_flight)
        total += elapsed
        check(results, n, "raw batched echo")
    return total


# ---- measurement --------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    hops: int  # each way
    per_msg: int  # calls per message: 1, or a map row's batch size
    rate: float  # calls/s
    cpu: dict[str, float]  # seconds per call by role
    ratios: dict[str, float] = field(default_factory=dict)  # baseline key → rate ÷ that baseline's rate


@contextmanager
def cpu_meter(pids: dict[str, Any], out: dict[str, float]) -> Iterator[None]:
    """Fill ``out`` with CPU seconds spent by each role (broker / workers / compute / client) meanwhile."""
    roles = {k: [v] if isinstance(v, int) else list(v) for k, v in pids.items()}
    roles["client"] = [os.getpid()]
    before = {k: sum(cpu_seconds(p) for p in ps) for k, ps in roles.items()}
    yield
    for k, ps in roles.items():
        out[k] = sum(cpu_seconds(p) for p in ps) - before[k]


def measure(name: str, hops: int, per_msg: int, calls: int, pids: dict[str, Any], fn: Callable[[], float]) -> Row:
    cpu: dict[str, float] = {}
    with cpu_meter(pids, cpu):
        elapsed = fn()
    return Row(name, hops, per_msg, calls / elapsed, {k: v / calls for k, v in cpu.items()})


def label(raw: RawBaseline) -> str:
    return f"raw {'Python broker' if raw.broker == 'python' else 'zmq.proxy'}{' + relay' if raw.relay else ''}"


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:7.1f}"


def print_table(rows: list[Row]) -> None:
    ratio_head = " ".join(f"{c:>6}" for c in RATIOS.values())
    head = (f"{'configuration':<44} {'hops':>4} {'calls/msg':>9} {'calls/s':>8} {ratio_head} | CPU µs/call: "
            f"{'broker':>7} {'daemons':>7} {'compute':>7} {'client':>7} {'total':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratios = " ".join(f"{r.ratios[k]:6.3f}" if k in r.ratios else f"{'':>6}" for k in RATIOS)
        c = r.cpu
        print(f"{r.name:<44} {r.hops:4d} {r.per_msg:9,d} {r.rate:8,.0f} {ratios} |              "
              f"{fmt_us(c['broker'])} {fmt_us(c['workers'])} {fmt_us(c['compute'])} {fmt_us(c['client'])} "
              f"{fmt_us(sum(c.values()))}")
    print("×raw, ×relay: ndpipe calls/s ÷ the raw baseline carrying the same calls per message (map rows: the "
          "batched one) with 2 hops each way like ndpipe, resp. 3; ×py, ×py+r: ÷ the Python broker, 2 resp. 3 hops")


def submit_rows(n: int, window: int, single: dict[str, RawBaseline], cluster: Cluster, master: Any,
                name: str) -> list[Row]:
    """The per-message baselines, then ndpipe submit divided by each."""
    bases = {key: measure(f"{label(b)}, window {window}", b.hops, 1, n, b.pids(),
                          partial(b.run, n, window, check_after=True)) for key, b in single.items()}
    row = measure(name, NDPIPE_HOPS, 1, n, cluster.pids(), partial(ndpipe_submit, master, n))
    row.ratios = {key: row.rate / b.rate for key, b in bases.items()}
    print(f"  {name}: {row.rate:,.0f} calls/s; " + ", ".join(
        f"{b.name} {b.rate:,.0f} → {RATIOS[k]} {row.ratios[k]:.3f}" for k, b in bases.items()), flush=True)
    return [*bases.values(), row]


def map_rows(n: int, window: int, batched: dict[str, RawBaseline], cluster: Cluster, master: Any,
             name: str, times: int) -> list[Row]:
    """The batched baselines (map's batch size and batches in flight), then ndpipe map divided by each."""
    size, in_flight = map_plan(n, cluster.registered_slots("echo", master), window)
    calls = n * times
    bases = {key: measure(f"{label(b)} batched, window {in_flight}", b.hops, size, calls, b.pids(),
                          partial(raw_batched, b, n, size, in_flight, times)) for key, b in batched.items()}
    before = master.status()["counters"].get("submitted", 0)
    row = measure(f"{name} ×{times}", NDPIPE_HOPS, size, calls, cluster.pids(),
                  partial(ndpipe_map, master, n, times))
    tasks = (master.status()["counters"].get("submitted", 0) - before) / times
    if tasks != -(-n // size):
        print(f"  note: ndpipe map sent {tasks:g} tasks per map, the batched baselines {-(-n // size)}")
    row.ratios = {key: row.rate / b.rate for key, b in bases.items()}
    print(f"  {name}: batches of {size} calls, {in_flight} in flight: {row.rate:,.0f} calls/s; " + ", ".join(
        f"{b.name} {b.rate:,.0f} → {RATIOS[k]} {row.ratios[k]:.3f}" for k, b in bases.items()), flush=True)
    return [*bases.values(), row]


# (layout, prefetch, modes): the default plan. ``submit`` is one task per message; ``map`` batches.
PLAN: list[tuple[str, int, tuple[str, ...]]] = [
    ("1x2", 0, ("submit", "map")),
    ("2x1", 16, ("submit",)),
    ("1x2", 16, ("submit", "map")),
    ("1x2", 64, ("submit",)),
]


def start_baselines(stack: ExitStack, modes: set[str], stop_and_wait: bool
                    ) -> tuple[dict[str, RawBaseline], dict[str, RawBaseline]]:
    """(per-message baselines, batched baselines) by ratio key, only those the plan divides by."""
    def start(**kw: Any) -> RawBaseline:
        return stack.enter_context(RawBaseline(workers=2, **kw))

    single: dict[str, RawBaseline] = {}
    batched: dict[str, RawBaseline] = {}
    if "submit" in modes or stop_and_wait:
        single = {"raw": start(), "relay": start(relay=True)}
    if "submit" in modes:
        single |= {"py": start(broker="python"), "py+relay": start(broker="python", relay=True)}
    if "map" in modes:
        batched = {"raw": start(handler=BATCH_ECHO), "relay": start(handler=BATCH_ECHO, relay=True)}
    for key in dict.fromkeys([*single, *batched]):
        print(f"  {RATIOS[key]:<6} {(single.get(key) or batched[key]).path}")
    print(flush=True)
    return single, batched


def run(n: int, window: int, plan: list[tuple[str, int, tuple[str, ...]]], stop_and_wait: bool = True,
        map_repeat: int = 10) -> list[Row]:
    rows: list[Row] = []
    modes = {m for _, _, ms in plan for m in ms}
    print(machine_line())
    print(f"W1: {n:,} identity calls of {len(PAYLOAD)} bytes, window {window} tasks, 2 compute processes; "
          f"ndpipe: master → broker → lane ({NDPIPE_HOPS} hops each way); "
          "each ndpipe row is divided by the baseline runs made just before it", flush=True)
    with ExitStack() as stack:
        single, batched = start_baselines(stack, modes, stop_and_wait)
        for b in single.values():
            b.run(min(n, 2000), window)  # warm-up
        for b in batched.values():
            raw_batched(b, min(n, 2000), 100, 4)
        if stop_and_wait:  # a reference: one task in flight per echo process, 2 hops
            k, raw = min(n, 5000), single["raw"]
            rows.append(measure("raw zmq.proxy, window 2 (reference)", raw.hops, 1, k, raw.pids(),
                                partial(raw.run, k, 2, check_after=True)))
            print(f"  {rows[-1].name}: {rows[-1].rate:,.0f} calls/s", flush=True)
        for layout, prefetch, plan_modes in plan:
            workers, processes = LAYOUTS[layout]
            with bench_cluster(workers, processes, prefetch) as cluster, \
                    cluster.master(window=window) as master:
                ndpipe_submit(master, min(n, 2000))  # warm-up: imports, caches, connections
                ndpipe_map(master, min(n, 2000))
                for mode in plan_modes:
                    name = f"ndpipe {mode:<6} {workers}w×{processes}p prefetch={prefetch}"
                    if mode == "submit":
                        rows += submit_rows(n, window, single, cluster, master, name)
                    else:
                        rows += map_rows(n, window, batched, cluster, master, name, map_repeat)
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
    ap.add_argument("--map-repeat", type=int, default=10,
                    help="run each map (and its batched baselines) this many times back to back (default 10)")
    ap.add_argument("--all", action="store_true",
                    help="every layout × prefetch × mode (a few minutes here) instead of the default plan")
    ap.add_argument("--layouts", help="only these layouts (daemons x processes), e.g. 2x1,1x2")
    ap.add_argument("--prefetch", help="only these prefetch values, e.g. 0,16")
    ap.add_argument("--modes", help="only these modes: submit,map")
    ap.add_argument("--no-reference", action="store_true", help="skip the raw window-2 reference row")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2,000 tasks, one layout (a few seconds)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.layouts, args.prefetch, args.no_reference = 2000, "1x2", "16", True
        args.map_repeat = min(args.map_repeat, 2)
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
    run(args.tasks, args.window, plan, stop_and_wait=not args.no_reference, map_repeat=max(1, args.map_repeat))
    print(f"\ntotal wall time {time.monotonic() - t0:.1f} s; load average "
          f"{', '.join(f'{x:.2f}' for x in psutil.getloadavg())} (other work on the machine skews every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
