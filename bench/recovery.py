"""Recovery time after ``kill -9``, with ndpipe's DEFAULT heartbeat settings (1 s × liveness 3).

    python -m ndpipe.bench.recovery      # or: python bench/recovery.py   (--help for options)

(a) compute process: one worker daemon × 2 compute processes; a task sleeping 2 s starts on one
    of them, which is killed with SIGKILL. The daemon sees the death (process sentinel) and reports
    CRASHED; the broker requeues the task and it restarts on the other compute process.
(b) worker daemon: two worker daemons × 1 compute process; the daemon running the task is killed
    with SIGKILL (its compute process dies with it, PR_SET_PDEATHSIG). Nobody reports anything: the
    broker requeues the task when the daemon's heartbeats have been missing for liveness × interval,
    and it restarts on the other daemon. Expect about 3 s.

Restart time = start time the successful run reports − the time just before ``os.kill``. Both are
``time.monotonic()`` (CLOCK_MONOTONIC: one clock for the whole host, so readings from different
processes compare). The task's first run writes a marker file named after its pid, which is how
this script knows, while the task runs, which process to kill. Each case is repeated (default 3)
and reported as median and max.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from typing import Any

import psutil

from ndpipe.bench._common import bench_cluster, machine_line
from ndpipe.cluster import Cluster

SLEEP = 2.0  # seconds the task runs; the kill comes right after it starts


def wait_marker(marker_dir: str, timeout: float = 30.0) -> tuple[int, float]:
    """The (pid, start) the running task wrote to ``marker_dir``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [n for n in os.listdir(marker_dir) if n.isdigit()]
        if names:
            with open(os.path.join(marker_dir, names[0])) as f:
                return int(names[0]), float(f.read())
        time.sleep(0.005)
    raise TimeoutError(f"the task did not start within {timeout} s")


def new_marker_dir(cluster: Cluster, label: str) -> str:
    path = os.path.join(cluster.root, label)
    os.makedirs(path)
    return path


def wait_pool_whole(cluster: Cluster, master: Any, processes: int, timeout: float = 60.0) -> None:
    """Block until ``processes`` distinct compute processes take tasks at once (the killed one replaced)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        futures = [master.submit("stamped_sleep", 0.3) for _ in range(processes)]
        results = [f.result(timeout=timeout) for f in futures]
        starts = [r["start"] for r in results]
        if len({r["pid"] for r in results}) == processes and max(starts) - min(starts) < 0.2:
            return
    raise TimeoutError(f"{processes} compute processes not ready within {timeout} s")


def kill_compute(cluster: Cluster, master: Any, rep: int) -> dict[str, Any]:
    marker_dir = new_marker_dir(cluster, f"a{rep}")
    future = master.submit("stamped_sleep", SLEEP, marker_dir)
    victim, first_start = wait_marker(marker_dir)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    result = future.result(timeout=60)
    if result["pid"] == victim:
        raise AssertionError("the task's result came from the killed process")
    return {"restart": result["start"] - killed_at, "victim": victim, "rerun_pid": result["pid"],
            "kill_after_start": killed_at - first_start}


def kill_daemon(cluster: Cluster, master: Any, rep: int) -> dict[str, Any]:
    marker_dir = new_marker_dir(cluster, f"b{rep}")
    future = master.submit("stamped_sleep", SLEEP, marker_dir)
    compute_pid, first_start = wait_marker(marker_dir)
    compute = psutil.Process(compute_pid)
    daemon_pid = compute.ppid()
    daemon = next(p for p in cluster.workers if p.pid == daemon_pid)
    killed_at = time.monotonic()
    os.kill(daemon_pid, signal.SIGKILL)
    orphan = False
    try:
        compute.wait(2.0)  # it should die with its daemon (PR_SET_PDEATHSIG)
    except psutil.TimeoutExpired:
        orphan = True
        compute.kill()
    except psutil.Error:
        pass
    result = future.result(timeout=60)
    daemon.wait(10)  # reap it
    cluster.workers.remove(daemon)
    if result["ppid"] == daemon_pid:
        raise AssertionError("the task's result came from the killed daemon")
    return {"restart": result["start"] - killed_at, "victim": daemon_pid, "rerun_pid": result["pid"],
            "kill_after_start": killed_at - first_start, "orphan_compute": orphan}


def summary(name: str, runs: list[dict[str, Any]]) -> str:
    times = [r["restart"] for r in runs]
    each = ", ".join(f"{t:.3f}" for t in times)
    return f"{name:<44} {statistics.median(times):9.3f} {max(times):9.3f}   [{each}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default="compute,daemon", help="compute,daemon")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    t0 = time.monotonic()
    print(machine_line())
    compute_runs: list[dict[str, Any]] = []
    daemon_runs: list[dict[str, Any]] = []
    if "compute" in cases:
        with bench_cluster(1, 2) as cluster, cluster.master() as master:
            st = master.status()
            print(f"heartbeat interval {st['heartbeat_interval']} s × liveness {st['liveness']} (defaults)\n")
            for rep in range(args.repeat):
                wait_pool_whole(cluster, master, 2)
                run = kill_compute(cluster, master, rep)
                compute_runs.append(run)
                print(f"  (a) rep {rep + 1}: killed compute pid {run['victim']} "
                      f"{run['kill_after_start'] * 1000:.0f} ms into the task; restarted on pid {run['rerun_pid']} "
                      f"{run['restart'] * 1000:.1f} ms after the kill", flush=True)
    if "daemon" in cases:
        with bench_cluster(2, 1) as cluster, cluster.master() as master:
            for rep in range(args.repeat):
                if rep:
                    cluster.start_worker(wait=True)  # back to two daemons
                run = kill_daemon(cluster, master, rep)
                daemon_runs.append(run)
                orphan = "; ITS COMPUTE PROCESS OUTLIVED IT" if run["orphan_compute"] else ""
                print(f"  (b) rep {rep + 1}: killed worker daemon pid {run['victim']} "
                      f"{run['kill_after_start'] * 1000:.0f} ms into the task; restarted on compute pid "
                      f"{run['rerun_pid']} {run['restart']:.3f} s after the kill{orphan}", flush=True)
    print()
    head = f"{'kill -9 of …  (restart time, seconds)':<44} {'median':>9} {'max':>9}   [each run]"
    print(head)
    print("-" * len(head))
    if compute_runs:
        print(summary("(a) a compute process (1 daemon × 2 procs)", compute_runs))
    if daemon_runs:
        print(summary("(b) a worker daemon (2 daemons × 1 proc)", daemon_runs))
    print(f"\ntotal wall time {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
