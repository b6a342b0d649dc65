"""W2 (big arrays: bandwidth) and W3 (tiny calls one at a time: latency), against raw pyzmq in the same run.

    python -m ndpipe.bench.w2w3            # or: python bench/w2w3.py   (--quick: a few seconds)

W1 measures what the pipeline costs per task when thousands are in flight; these two measure what a
user waiting on one call sees. One ndpipe cluster serves both: a broker and 1 worker daemon × 2
compute processes (``LocalCluster(workers=1, processes=2)``, service ``echo`` =
``ndpipe.examples.handlers:echo``). The baseline (``bench/_raw.py``) does the same hops with nothing
but libzmq: DEALER client → C ``zmq.proxy`` → 2 DEALER echo processes, zero-copy from 64 KiB.

* **W2** — an 8 MiB float64 array (``default_rng(0).standard_normal(1 << 20)``) echoed 50 times,
  one call at a time (``Master.call("echo", (arr,)).result()``; raw: one message, wait for the
  reply). GB/s counts the bytes both ways, 16 MiB (16.8 MB) per call; GB = 10⁹ bytes. The ``map``
  row is ``list(master.map("echo", [arr] * 50))`` with map's defaults, whatever they do (the
  Master's window of 1,000 lets all 50 go out at once; map may group calls into batches by itself;
  the broker hands each of the 2 compute processes one task at a time). Its raw counterpart keeps 2
  in flight (``run(50, window=2)``), one per echo process: the same concurrency at the compute end.
  Results are compared in full once, outside the timing; inside it every reply is checked cheaply
  (dtype, shape, first and last element), on both sides. A round trip moves the array 6 times between
  processes in ndpipe (master → broker → worker daemon → compute process and back) and 4 times in
  raw (client → proxy → echo and back): where copying dominates, a ratio near 0.67 is the ceiling.
* **W3** — 2,000 calls of ``b"x" * 64``, one at a time, after 100 warm-up calls on each path:
  latency p50 / p99 / max in ms. ``submit`` is ``master.submit("echo", payload).result()``; ``map``
  is ``list(master.map("echo", [payload]))`` per call: the fixed cost ``map`` adds to a lone call
  over ``submit`` (it should be the generator's few µs; a map that first asks the broker for its
  STATUS to size batches, as the batching map does when it knows how many items there are, pays
  one more round trip to the broker here).
  The ratios there are ndpipe ÷ raw latency (how many times slower), for p50 and for p99.

Absolute timings on this machine drift by up to 2× from minute to minute, so every ndpipe row is
measured right after its own raw row and divided by it: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from ndpipe.bench._cluster import LocalCluster, machine_line
from ndpipe.bench._raw import RawBaseline, same

TINY = b"x" * 64
MIB = 1 << 20
# Heartbeats share the sockets with the payloads: behind hundreds of MiB queued on a link a PONG or a
# worker heartbeat can be late, so allow 10 silent intervals instead of 3 (no task timeout is set).
CLUSTER_CONFIG: dict[str, dict[str, Any]] = {"broker": {"liveness": 10}, "master": {"liveness": 10}}


def big_array() -> np.ndarray:
    """The W2 payload: 2**20 float64 = 8 MiB."""
    return np.random.default_rng(0).standard_normal(1 << 20)


def check_full(got: Any, want: np.ndarray, who: str) -> None:
    if not (isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want)):
        raise AssertionError(f"{who} echo returned a different array")


# ---- W2 -----------------------------------------------------------------------------------------
@dataclass
class BandwidthRow:
    name: str
    calls: int
    seconds: float
    bytes_per_call: int  # both ways
    raw: BandwidthRow | None = None

    @property
    def gbps(self) -> float:
        return self.calls * self.bytes_per_call / self.seconds / 1e9

    @property
    def ratio(self) -> float | None:
        return self.gbps / self.raw.gbps if self.raw else None


def ndpipe_sequential(master: Any, arr: np.ndarray, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        if not same(master.call("echo", (arr,)).result(), arr):
            raise AssertionError("ndpipe echo returned a different array")
    return time.perf_counter() - t0


def ndpipe_map(master: Any, arr: np.ndarray, n: int) -> float:
    t0 = time.perf_counter()
    results = list(master.map("echo", [arr] * n))
    elapsed = time.perf_counter() - t0
    if len(results) != n or not all(same(r, arr) for r in results):
        raise AssertionError("ndpipe map returned a different array")
    return elapsed


def raw_sequential(raw: RawBaseline, arr: np.ndarray, n: int) -> float:
    return float(sum(raw.roundtrips(n, arr)))


def w2(raw: RawBaseline, master: Any, calls: int, raw_window: int) -> list[BandwidthRow]:
    arr = big_array()
    per_call = 2 * arr.nbytes
    print(f"W2: {calls} echo calls of an {arr.nbytes / MIB:g} MiB float64 array, {per_call / 1e6:.1f} MB per call "
          "counted both ways", flush=True)
    check_full(raw.echo(arr)[0], arr, "raw")
    check_full(master.call("echo", (arr,)).result(), arr, "ndpipe")
    ndpipe_sequential(master, arr, 3)  # warm-up: page faults on fresh buffers, connections
    raw_sequential(raw, arr, 3)  # (raw last: its first row follows it)
    plan: list[tuple[str, Callable[[], float], str, Callable[[], float]]] = [
        ("raw, 1 in flight", lambda: raw_sequential(raw, arr, calls),
         "ndpipe call().result(), sequential", lambda: ndpipe_sequential(master, arr, calls)),
        (f"raw, window {raw_window}", lambda: raw.run(calls, raw_window, arr),
         f"ndpipe map, window {master.window}", lambda: ndpipe_map(master, arr, calls)),
    ]
    rows: list[BandwidthRow] = []
    for raw_name, raw_fn, name, fn in plan:
        base = BandwidthRow(raw_name, calls, raw_fn(), per_call)
        row = BandwidthRow(name, calls, fn(), per_call, raw=base)
        rows += [base, row]
        print(f"  {name}: {row.gbps:.2f} GB/s, raw {base.gbps:.2f} → ratio {row.ratio:.3f}", flush=True)
    return rows


def print_w2(rows: list[BandwidthRow]) -> None:
    head = f"{'W2 configuration':<40} {'calls':>5} {'ms/call':>8} {'GB/s':>6} {'raw GB/s':>8} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        raw = f"{r.raw.gbps:8.2f}" if r.raw else f"{'':>8}"
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else f"{'':>6}"
        print(f"{r.name:<40} {r.calls:5d} {r.seconds / r.calls * 1e3:8.2f} {r.gbps:6.2f} {raw} {ratio}")
    print("(ms/call of a pipelined row is elapsed ÷ calls, i.e. 1 / throughput)")


# ---- W3 -----------------------------------------------------------------------------------------
@dataclass
class LatencyRow:
    name: str
    samples: list[float] = field(repr=False)  # seconds
    raw: LatencyRow | None = None

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples, q))

    @property
    def worst(self) -> float:
        return max(self.samples)

    def ratio(self, q: float) -> float | None:
        return self.pct(q) / self.raw.pct(q) if self.raw else None


def ndpipe_submit_latency(master: Any, n: int) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        result = master.submit("echo", TINY).result()
        out.append(time.perf_counter() - t0)
        if result != TINY:
            raise AssertionError(f"ndpipe echo returned {result!r:.40}")
    return out


def ndpipe_map_latency(master: Any, n: int) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        result = list(master.map("echo", [TINY]))
        out.append(time.perf_counter() - t0)
        if result != [TINY]:
            raise AssertionError(f"ndpipe map returned {result!r:.40}")
    return out


def w3(raw: RawBaseline, master: Any, calls: int, warmup: int) -> list[LatencyRow]:
    print(f"W3: {calls:,} sequential echo calls of {len(TINY)} bytes, after {warmup} warm-up calls on each path",
          flush=True)
    ndpipe_submit_latency(master, warmup)
    ndpipe_map_latency(master, warmup)
    raw.roundtrips(warmup, TINY)  # (raw last: its first row follows it)
    plan: list[tuple[str, Callable[[int], list[float]]]] = [
        ("ndpipe submit().result()", lambda k: ndpipe_submit_latency(master, k)),
        ("ndpipe list(map(…, [x])) per call", lambda k: ndpipe_map_latency(master, k)),
    ]
    rows: list[LatencyRow] = []
    for name, fn in plan:
        base = LatencyRow("raw roundtrip", raw.roundtrips(calls, TINY))
        row = LatencyRow(name, fn(calls), raw=base)
        rows += [base, row]
        print(f"  {name}: p50 {row.pct(50) * 1e3:.3f} ms, p99 {row.pct(99) * 1e3:.3f} ms; raw p50 "
              f"{base.pct(50) * 1e3:.3f} ms, p99 {base.pct(99) * 1e3:.3f} ms", flush=True)
    return rows


def print_w3(rows: list[LatencyRow]) -> None:
    head = (f"{'W3 configuration':<36} {'calls':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} | "
            f"{'raw p50':>7} {'raw p99':>7} | {'×raw p50':>8} {'×raw p99':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r.name:<36} {len(r.samples):5d} {r.pct(50) * 1e3:7.3f} {r.pct(99) * 1e3:7.3f} {r.worst * 1e3:7.3f} | "
        if r.raw:
            line += (f"{r.raw.pct(50) * 1e3:7.3f} {r.raw.pct(99) * 1e3:7.3f} | "
                     f"{r.ratio(50) or 0:8.2f} {r.ratio(99) or 0:8.2f}")
        else:
            line += f"{'':>7} {'':>7} |"
        print(line.rstrip())


# ---- main ---------------------------------------------------------------------------------------
def run(big_calls: int, tiny_calls: int, warmup: int, raw_window: int, only: str | None) -> None:
    print(machine_line())
    print("1 worker daemon × 2 compute processes, prefetch 0; raw: zmq.proxy + 2 echo processes; "
          "each ndpipe row is measured right after the raw row above it\n", flush=True)
    w2_rows: list[BandwidthRow] = []
    w3_rows: list[LatencyRow] = []
    with RawBaseline(workers=2) as raw, LocalCluster(workers=1, processes=2, broker=CLUSTER_CONFIG["broker"],
                                                         master=CLUSTER_CONFIG["master"]) as cluster:
        with cluster.master() as master:
            if only in (None, "w2"):
                w2_rows = w2(raw, master, big_calls, raw_window)
            if only in (None, "w3"):
                w3_rows = w3(raw, master, tiny_calls, warmup)
            c = master.status()["counters"]
            if c.get("failed") or c.get("requeued"):
                print(f"  note: broker counters {c}")
    print()
    if w2_rows:
        print_w2(w2_rows)
        print()
    if w3_rows:
        print_w3(w3_rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke test of a few seconds")
    ap.add_argument("--big-calls", type=int, default=50, help="W2 calls of the 8 MiB array (default 50)")
    ap.add_argument("--tiny-calls", type=int, default=2000, help="W3 calls of 64 bytes (default 2000)")
    ap.add_argument("--warmup", type=int, default=100, help="W3 warm-up calls per path (default 100)")
    ap.add_argument("--raw-window", type=int, default=2, help="messages in flight for the raw row of W2 map")
    ap.add_argument("--only", choices=("w2", "w3"), help="run only one of the two")
    args = ap.parse_args(argv)
    if args.quick:
        args.big_calls, args.tiny_calls, args.warmup = min(args.big_calls, 4), min(args.tiny_calls, 100), 10
    t0 = time.monotonic()
    run(args.big_calls, args.tiny_calls, args.warmup, args.raw_window, args.only)
    print(f"\ntotal wall time {time.monotonic() - t0:.1f} s; load average "
          f"{', '.join(f'{x:.2f}' for x in psutil.getloadavg())} (other work on the machine skews every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
