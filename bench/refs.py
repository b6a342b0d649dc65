"""Arrays sent once (``Master.put``): bytes through the broker and time, against sending the array
with every task (ndpipe, and raw pyzmq through a C zmq.proxy), in the same run.

    python -m ndpipe.bench refs          # or: python bench/refs.py   (--help for options)

N tasks (default 200) each need the same array (default 64 MiB of float64) and return one element
of it (``bench._handlers:pick``): the work is the data movement. ndpipe runs 2 worker daemons × 2
lanes; the raw baseline 4 echo processes behind the proxy, each request carrying the array.

* **ndpipe put**: ``ref = m.put(array)``, then N tasks passing ``ref``. Each host fetches the bytes
  once (the broker's ``fetched_bytes`` counter says how many crossed it) and its lanes share them.
  The time includes ``put`` (hashing the array) and both fetches.
* **ndpipe inline**: the same N tasks with the array itself as the argument.
* **raw inline**: N requests of [array bytes, index] through the proxy, same window.

Bytes through the broker count what masters sent in (payloads, and DATA for fetches); replies are
a few octets. Every answer is checked after the clock stops.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from ndpipe.bench._common import SERVICES, bench_cluster, machine_line
from ndpipe.bench._raw import RawBaseline
from ndpipe.bench._ray import put_row
from ndpipe.codec import encode_call

WINDOW = 8


def ndpipe_rows(arr: np.ndarray[Any, Any], tasks: int) -> list[tuple[str, float, int]]:
    flat = arr.reshape(-1)
    services = {**SERVICES, "pick": "ndpipe.bench._handlers:pick"}
    rows = []
    with bench_cluster(2, 2, services=services) as cluster, cluster.master(window=WINDOW) as m:
        m.call("pick", (np.arange(4.0), 0)).result(60)  # warm-up: connections, imports
        before = m.status()["counters"]["fetched_bytes"]
        t0 = time.perf_counter()
        ref = m.put(arr)
        got = [f.result(300) for f in [m.submit("pick", ref, i) for i in range(tasks)]]
        wall = time.perf_counter() - t0
        fetched = m.status()["counters"]["fetched_bytes"] - before
        assert got == [float(flat[i % flat.size]) for i in range(tasks)], "wrong answers (put)"
        small = sum(len(bytes(f)) for f in encode_call([ref, 0], {})) * tasks
        rows.append(("ndpipe put (2 hosts × 2 lanes)", wall, fetched + small))
        t0 = time.perf_counter()
        got = [f.result(300) for f in [m.submit("pick", arr, i) for i in range(tasks)]]
        wall = time.perf_counter() - t0
        assert got == [float(flat[i % flat.size]) for i in range(tasks)], "wrong answers (inline)"
        rows.append(("ndpipe inline", wall, sum(memoryview(f).nbytes for f in encode_call([arr, 0], {})) * tasks))
    return rows


def raw_row(arr: np.ndarray[Any, Any], tasks: int) -> tuple[str, float, int]:
    with RawBaseline(workers=4, handler="ndpipe.bench._handlers:raw_pick") as raw:
        payload: list[Any] = [arr, (0).to_bytes(8, "big")]
        raw.run(2, WINDOW, payload)  # warm-up
        wall = raw.run(tasks, WINDOW, payload)
    return ("raw inline (C zmq.proxy, 4 processes)", wall, (arr.nbytes + 8) * tasks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--mib", type=int, default=64, help="array size in MiB (default 64)")
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="16 MiB, 40 tasks: a smoke run")
    args = ap.parse_args(argv)
    mib, tasks = (16, 40) if args.quick else (args.mib, args.tasks)
    print(machine_line())
    arr = np.random.default_rng(0).standard_normal(mib * 2**20 // 8)
    print(f"refs: {tasks} tasks sharing one {mib} MiB float64 array, window {WINDOW}\n")
    rows = [*ndpipe_rows(arr, tasks), raw_row(arr, tasks)]
    ray_row = put_row(arr, tasks)
    rows += [ray_row] if ray_row else []
    put_wall = rows[0][1]
    head = (f"{'configuration':<40} {'seconds':>8} {'tasks/s':>9} {'MiB via broker':>15} {'× array':>8} "
            f"{'time ÷ put':>10}")
    print(head)
    print("-" * len(head))
    for name, wall, moved in rows:
        via = f"{moved / 2**20:15.1f} {moved / arr.nbytes:8.2f}" if moved >= 0 else f"{'—':>15} {'—':>8}"
        print(f"{name:<40} {wall:8.3f} {tasks / wall:9.1f} {via} {wall / put_wall:10.2f}")
    print("\n(× array: bytes through the broker ÷ the array's size; goal for put ≈ 2, one fetch per host. "
          "time ÷ put: how many times longer than with put)" + ("" if ray_row else
          "; Ray row skipped: Ray is not installed (pip install ray)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
