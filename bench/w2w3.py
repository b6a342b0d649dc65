"""W2 (big arrays: bandwidth) and W3 (tiny calls one at a time: latency), against raw pyzmq in the same run.

    python -m ndpipe.bench.w2w3            # or: python bench/w2w3.py   (--quick: a few seconds)

W1 measures what the pipeline costs per task when thousands are in flight; these two measure what a
user waiting on one call sees. One ndpipe cluster serves both: a broker and 1 worker daemon × 2
compute processes (``bench_cluster(1, 2)``, service ``echo`` =
``ndpipe.examples.handlers:echo``): master → broker → lane, 2 hops each way (the worker daemon
supervises its 2 lanes, off the data path). Two baselines (``bench/_raw.py``), nothing but libzmq,
zero-copy from 64 KiB: **raw**, DEALER client → C ``zmq.proxy`` → 2 DEALER echo processes (2 hops
each way, like ndpipe), and **raw + relay**, the same with a C ``zmq.proxy`` DEALER/DEALER relay
process where ndpipe had its worker daemon before lanes (3 hops each way). Ratios are printed
against both.

* **W2** — an 8 MiB float64 array (``default_rng(0).standard_normal(1 << 20)``) echoed 50 times,
  one call at a time (``Master.call("echo", (arr,)).result()``; raw: one message, wait for the
  reply). GB/s counts the bytes both ways, 16 MiB (16.8 MB) per call; GB = 10⁹ bytes. The
  pipelined rows give both sides the same window, for each of ``--windows`` (2 and 8): ndpipe is
  ``list(master.map("echo", [arr] * 50))`` on a Master created with ``window=W`` (map cuts batches
  over 8 MiB into single calls, so every call is one task and at most W are in flight; the broker
  hands each of the 2 compute processes one task at a time), raw keeps W messages in flight
  (``run(50, window=W)``). Results are compared in full once, outside the timing, and every reply
  is checked cheaply (dtype, shape, first and last element), on both sides alike: sequential rows
  after each call's clock stops, pipelined rows as each reply arrives (then dropped). A round trip
  moves the array 6 times between processes in ndpipe and raw + relay, 4 times in raw: where
  copying dominates, ×raw near 0.67 is the ceiling and ×relay near 1.
* **W3** — 2,000 calls of ``b"x" * 64``, one at a time, after 100 warm-up calls on each path:
  latency p50 / p99 / max in ms, each call timed from send to reply and checked after. ``submit``
  is ``master.submit("echo", payload).result()``; ``map`` is ``list(master.map("echo", [payload]))``
  per call: the fixed cost ``map`` adds to a lone call
  over ``submit`` (it should be the generator's few µs; a map that first asks the broker for its
  STATUS to size batches, as the batching map does when it knows how many items there are, pays
  one more round trip to the broker here).
  The ratios there are ndpipe ÷ baseline latency (how many times slower), for p50 and for p99.

Absolute timings on this machine drift by up to 2× from minute to minute, so every ndpipe row is
measured right after its own raw rows and divided by them: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import psutil
import zmq

from ndpipe import protocol as P
from ndpipe.bench._common import bench_cluster, machine_line
from ndpipe.bench._raw import RawBaseline, same
from ndpipe.cluster import Cluster
from ndpipe.codec import decode, encode_call

TINY = b"x" * 64
MIB = 1 << 20
NDPIPE_HOPS = 2  # master → broker → lane
LABELS = {"raw": "raw", "relay": "raw + relay"}  # baseline key → row name (2 resp. 3 hops each way)
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
    hops: int  # each way
    calls: int
    seconds: float
    bytes_per_call: int  # both ways
    bases: dict[str, BandwidthRow] = field(default_factory=dict)  # baseline key → its row

    @property
    def gbps(self) -> float:
        return self.calls * self.bytes_per_call / self.seconds / 1e9

    def ratio(self, key: str) -> float | None:
        base = self.bases.get(key)
        return self.gbps / base.gbps if base else None


def ndpipe_sequential(master: Any, arr: np.ndarray, n: int) -> float:
    """Sum of the calls' times, each from call to result; each result checked after its clock stops."""
    total = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        result = master.call("echo", (arr,)).result()
        total += time.perf_counter() - t0
        if not same(result, arr):
            raise AssertionError("ndpipe echo returned a different array")
    return total


def ndpipe_map(master: Any, arr: np.ndarray, n: int) -> float:
    """Each result checked cheaply as map yields it, then dropped, as the raw client does with its
    replies: keeping 50 × 8 MiB would add page faults on fresh receive buffers to both sides."""
    got = 0
    t0 = time.perf_counter()
    for result in master.map("echo", [arr] * n):
        if not same(result, arr):
            raise AssertionError("ndpipe map returned a different array")
        got += 1
    elapsed = time.perf_counter() - t0
    if got != n:
        raise AssertionError(f"ndpipe map returned {got} results for {n} calls")
    return elapsed


def raw_sequential(raw: RawBaseline, arr: np.ndarray, n: int) -> float:
    return float(sum(raw.roundtrips(n, arr)))


def w2(raws: dict[str, RawBaseline], cluster: Cluster, master: Any, calls: int,
       windows: list[int]) -> list[BandwidthRow]:
    arr = big_array()
    per_call = 2 * arr.nbytes
    print(f"W2: {calls} echo calls of an {arr.nbytes / MIB:g} MiB float64 array, {per_call / 1e6:.1f} MB per call "
          f"counted both ways; pipelined rows: the same window on both sides ({', '.join(map(str, windows))})",
          flush=True)
    for key, raw in raws.items():
        check_full(raw.echo(arr)[0], arr, LABELS[key])
    check_full(master.call("echo", (arr,)).result(), arr, "ndpipe")
    ndpipe_sequential(master, arr, 3)  # warm-up: page faults on fresh buffers, connections
    for raw in raws.values():
        raw_sequential(raw, arr, 3)  # (raw last: its first row follows it)
    rows: list[BandwidthRow] = []

    def measured(name: str, fn: Callable[[], float], bases: dict[str, BandwidthRow]) -> None:
        row = BandwidthRow(name, NDPIPE_HOPS, calls, fn(), per_call, bases)
        rows.extend([*bases.values(), row])
        print(f"  {name}: {row.gbps:.2f} GB/s; " + ", ".join(
            f"{b.name} {b.gbps:.2f} → ×{k} {row.ratio(k):.3f}" for k, b in bases.items()), flush=True)

    measured("ndpipe call().result(), sequential", lambda: ndpipe_sequential(master, arr, calls),
             {k: BandwidthRow(f"{LABELS[k]}, 1 in flight", r.hops, calls, raw_sequential(r, arr, calls), per_call)
              for k, r in raws.items()})
    for window in windows:
        with cluster.master(window=window) as m:
            ndpipe_map(m, arr, max(10, 2 * window))  # warm-up: this Master's connection, map's STATUS
            for raw in raws.values():
                raw.run(2 * window, window, arr)
            measured(f"ndpipe map, window {window}", partial(ndpipe_map, m, arr, calls),
                     {k: BandwidthRow(f"{LABELS[k]}, window {window}", r.hops, calls,
                                      r.run(calls, window, arr), per_call)
                      for k, r in raws.items()})
    return rows


def print_w2(rows: list[BandwidthRow]) -> None:
    head = f"{'W2 configuration':<40} {'hops':>4} {'calls':>5} {'ms/call':>8} {'GB/s':>6} {'×raw':>6} {'×relay':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratios = " ".join(f"{x:6.3f}" if (x := r.ratio(k)) is not None else f"{'':>6}" for k in LABELS)
        print(f"{r.name:<40} {r.hops:4d} {r.calls:5d} {r.seconds / r.calls * 1e3:8.2f} {r.gbps:6.2f} {ratios}".rstrip())
    print("(ms/call of a pipelined row is elapsed ÷ calls, i.e. 1 / throughput; ×raw, ×relay: ndpipe GB/s ÷ the "
          "baseline's with 2 resp. 3 hops each way)")


# ---- W3 -----------------------------------------------------------------------------------------
@dataclass
class LatencyRow:
    name: str
    hops: int  # each way
    samples: list[float] = field(repr=False)  # seconds
    bases: dict[str, LatencyRow] = field(default_factory=dict)  # baseline key → its row

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples, q))

    @property
    def worst(self) -> float:
        return max(self.samples)

    def ratio(self, key: str, q: float) -> float | None:
        base = self.bases.get(key)
        return self.pct(q) / base.pct(q) if base else None


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


def ndp_client_latency(endpoint: str, n: int) -> list[float]:
    """A single-threaded client speaking NDP/1 itself (a DEALER: SUBMIT, wait for the RESULT) through
    the same broker and lanes as the Master: what they cost without the Master's own work."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.ROUTING_ID, b"N" + os.urandom(15))
    sock.connect(endpoint)
    payload, options = encode_call([TINY], {}), P.OPTIONS.pack(0, 0, 0)
    out: list[float] = []
    try:
        for _ in range(n):
            tid = os.urandom(16)
            t0 = time.perf_counter()
            sock.send_multipart([P.MASTER, P.SUBMIT, b"echo", tid, options, *payload])
            frames = sock.recv_multipart(copy=True)
            out.append(time.perf_counter() - t0)
            if frames[1] != P.RESULT or frames[2] != tid or decode(frames[3:]) != TINY:
                raise AssertionError(f"the NDP/1 client got {frames[:3]!r:.80}")
    finally:
        sock.close()
    return out


def w3(raws: dict[str, RawBaseline], master: Any, calls: int, warmup: int, endpoint: str) -> list[LatencyRow]:
    print(f"W3: {calls:,} sequential echo calls of {len(TINY)} bytes, after {warmup} warm-up calls on each path",
          flush=True)
    ndpipe_submit_latency(master, warmup)
    ndpipe_map_latency(master, warmup)
    ndp_client_latency(endpoint, warmup)
    for raw in raws.values():
        raw.roundtrips(warmup, TINY)  # (raw last: its first row follows it)
    plan: list[tuple[str, Callable[[int], list[float]]]] = [
        ("ndpipe submit().result()", lambda k: ndpipe_submit_latency(master, k)),
        ("ndpipe list(map(…, [x])) per call", lambda k: ndpipe_map_latency(master, k)),
        ("raw NDP/1 client → ndpipe broker", lambda k: ndp_client_latency(endpoint, k)),
    ]
    rows: list[LatencyRow] = []
    for name, fn in plan:
        bases = {k: LatencyRow(f"{LABELS[k]} roundtrip", r.hops, r.roundtrips(calls, TINY)) for k, r in raws.items()}
        row = LatencyRow(name, NDPIPE_HOPS, fn(calls), bases)
        rows += [*bases.values(), row]
        print(f"  {name}: p50 {row.pct(50) * 1e3:.3f} ms, p99 {row.pct(99) * 1e3:.3f} ms; " + ", ".join(
            f"{b.name} p50 {b.pct(50) * 1e3:.3f} ms, p99 {b.pct(99) * 1e3:.3f} ms" for b in bases.values()),
            flush=True)
    return rows


def print_w3(rows: list[LatencyRow]) -> None:
    cols = " ".join(f"{f'×{k} p{q}':>10}" for k in LABELS for q in (50, 99))
    head = f"{'W3 configuration':<36} {'hops':>4} {'calls':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} | {cols}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r.name:<36} {r.hops:4d} {len(r.samples):5d} {r.pct(50) * 1e3:7.3f} {r.pct(99) * 1e3:7.3f} "
                f"{r.worst * 1e3:7.3f} |")
        if r.bases:
            line += " " + " ".join(f"{r.ratio(k, q) or 0:10.2f}" for k in LABELS for q in (50, 99))
        print(line.rstrip())
    print("(×raw, ×relay: ndpipe latency ÷ the baseline's, 2 resp. 3 hops each way: how many times slower)")


# ---- main ---------------------------------------------------------------------------------------
def run(big_calls: int, tiny_calls: int, warmup: int, windows: list[int], only: str | None) -> None:
    print(machine_line())
    print(f"ndpipe: 1 worker daemon × 2 lanes, prefetch 0: master → broker → lane ({NDPIPE_HOPS} hops each way); "
          "each ndpipe row is measured right after the raw rows above it; the raw NDP/1 client row is a "
          "single-threaded DEALER speaking the protocol itself through the same broker and lanes", flush=True)
    w2_rows: list[BandwidthRow] = []
    w3_rows: list[LatencyRow] = []
    with RawBaseline(workers=2) as raw, RawBaseline(workers=2, relay=True) as relay, \
            bench_cluster(1, 2, broker=CLUSTER_CONFIG["broker"],
                          master=CLUSTER_CONFIG["master"]) as cluster:
        raws = {"raw": raw, "relay": relay}
        for key, r in raws.items():
            print(f"  {LABELS[key]:<11} {r.path}")
        print(flush=True)
        with cluster.master() as master:
            if only in (None, "w2"):
                w2_rows = w2(raws, cluster, master, big_calls, windows)
            if only in (None, "w3"):
                w3_rows = w3(raws, master, tiny_calls, warmup, cluster.frontend)
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
    ap.add_argument("--windows", default="2,8",
                    help="W2 pipelined rows: messages in flight, the same for ndpipe and raw (default 2,8)")
    ap.add_argument("--only", choices=("w2", "w3"), help="run only one of the two")
    args = ap.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",") if w.strip()]
    if not windows or min(windows) < 1:
        ap.error("--windows: a comma-separated list of positive integers")
    if args.quick:
        args.big_calls, args.tiny_calls, args.warmup = min(args.big_calls, 4), min(args.tiny_calls, 100), 10
    t0 = time.monotonic()
    run(args.big_calls, args.tiny_calls, args.warmup, windows, args.only)
    print(f"\ntotal wall time {time.monotonic() - t0:.1f} s; load average "
          f"{', '.join(f'{x:.2f}' for x in psutil.getloadavg())} (other work on the machine skews every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
