"""``python -m ndpipe.bench NAME [options]``: run one benchmark, or ``all`` of them in turn.

Every benchmark starts its own broker and workers; all but recovery measure ndpipe and raw-pyzmq
baselines in the same run and print the ratios (docs/PERFORMANCE.md explains each table). ndpipe
makes 2 hops each way (master → broker → lane), as the raw baseline does (client → C zmq.proxy →
echo process); w1 and w2w3 also measure a 3-hop baseline with a C relay, where ndpipe had its
worker daemon before lanes.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "w1": "W1: 20,000 tiny tasks pipelined, per message and through map (against raw batches)",
    "w2w3": "W2: 8 MiB round trips (GB/s); W3: tiny calls one at a time (latency)",
    "sweep": "payload sweep 64 B .. 64 MiB: tasks/s and GB/s",
    "scaling": "1, 2, 4, 8 compute processes on sleep- and CPU-bound tasks",
    "broker_cost": "broker CPU per task, memory per queued task, CPU with 1,000 idle workers",
    "recovery": "kill -9 of a compute process / worker daemon: time until the task restarts",
    "dispatch": "broker CPU per dispatched task with 10 .. 4,000 workers: the O(log n) index against a scan",
    "refs": "arrays sent once (Master.put): bytes through the broker and time, against the array in every task",
    "stages": "a 4-stage pipeline routed by the broker against four round trips (ndpipe and raw)",
    "iterate": "iterations: per-round overhead, PageRank against one process and Ray",
    "curve": "CurveZMQ on against off: W1, W2, W3 in the same run (and raw pyzmq's own CURVE cost)",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in (*BENCHES, "all"):
        print(__doc__)
        for name, what in BENCHES.items():
            print(f"  {name:<12} {what}")
        print("  all          every one of them, in this order (pass --quick for a smoke run)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    names = list(BENCHES) if args[0] == "all" else [args[0]]
    status = 0
    for name in names:
        print(f"\n===== {name} =====", flush=True)
        rest = args[1:]
        if name == "recovery" and "--quick" in rest:  # it has no --quick: one repetition instead
            rest = [a for a in rest if a != "--quick"] + ["--repeat", "1"]
        module = importlib.import_module(f"ndpipe.bench.{name}")
        status = max(status, int(module.main(rest) or 0))
    return status


if __name__ == "__main__":
    sys.exit(main())
