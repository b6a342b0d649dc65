"""Broker CPU per dispatched task as registered workers grow: the O(log n) index against a scan.

The broker's bookkeeping alone (``BrokerState``, no sockets), so the figure is the dispatch
decision itself. N worker daemons × 4 lanes × 1 credit register for one service and all but one
lane is kept busy, so every dispatch must find the one lane with credit; each task is submitted,
dispatched and answered at once. The baseline is the rule the index replaced, a scan of every lane
of the service, run in the same process right before, and the ratio is printed.

    python -m ndpipe.bench dispatch            # 10, 100, 1,000 daemons (40 .. 4,000 lanes)
    python -m ndpipe.bench dispatch --quick    # smoke: 10 and 1,000 daemons, fewer tasks
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

from ndpipe.bench._common import machine_line
from ndpipe.broker.state import INFLIGHT, BrokerState, LaneRecord, Task

LANES = 4


class ScanState(BrokerState):
    """The baseline: the linear scan for the least-loaded worker that dispatch used before the index."""

    def dispatch(self, now: float) -> Iterator[tuple[Task, LaneRecord]]:
        while self._dirty:
            service = self._dirty.pop()
            queue, peers = self.queues.get(service), self.by_service.get(service)
            if not queue or not peers:
                continue
            while len(queue):
                best, best_key = None, (2.0, 0.0)
                for rec in peers:
                    if rec.free > 0:
                        key = (len(rec.inflight) / rec.slots, rec.last_dispatch)
                        if key < best_key:
                            best, best_key = rec, key
                if best is None:
                    break
                task = queue.pop()
                if task is None:
                    break
                task.state, task.worker = INFLIGHT, best.wid
                task.attempt += 1
                best.inflight.add(task.tid)
                best.last_dispatch = now
                yield task, best


def measure(cls: type[BrokerState], workers: int, tasks: int) -> float:
    """Microseconds per submit + dispatch + answer."""
    s = cls(heartbeat_interval=1.0, liveness=3, max_attempts=3, max_queued=10_000_000)
    s.master_seen(b"m", 0.0)
    for w in range(workers):
        host = s.worker_ready(b"w%d" % w, ["svc"], 1, 0.0, lanes=LANES, name=f"w{w}")
        for i in range(LANES):
            s.lane_ready(b"w%d/%d" % (w, i), host.key, i, 0.0, pid=i)
    for i in range(workers * LANES - 1):  # every lane busy but one
        s.submit(b"m", b"busy%d" % i, "svc", [b"p"], 0.0, 0, 0, 0)
    sent = len(list(s.dispatch(0.0)))
    assert sent == workers * LANES - 1
    t0 = time.perf_counter()
    for i in range(tasks):
        s.submit(b"m", b"t%d" % i, "svc", [b"p"], 1.0, 0, 0, 0)
        for task, rec in s.dispatch(1.0 + i * 1e-6):
            s.complete(rec.wid, task.tid)
    return (time.perf_counter() - t0) / tasks * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 and 1,000 workers, 2,000 tasks each")
    ap.add_argument("--tasks", type=int, default=20_000)
    args = ap.parse_args(argv)
    sizes, tasks = ((10, 1_000), 2_000) if args.quick else ((10, 100, 1_000), args.tasks)
    print(machine_line())
    print(f"dispatch: one service, N worker daemons × {LANES} lanes × 1 credit, all busy but one; {tasks:,} tasks "
          "each submitted, dispatched and answered (BrokerState only, no sockets)")
    print(f"{'daemons':>8} {'lanes':>6} {'scan µs/task':>13} {'index µs/task':>14} {'index ÷ scan':>13}")
    for n in sizes:
        scan = measure(ScanState, n, tasks)
        index = measure(BrokerState, n, tasks)
        print(f"{n:>8,} {n * LANES:>6,} {scan:>13.1f} {index:>14.1f} {index / scan:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
