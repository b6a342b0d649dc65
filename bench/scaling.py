"""Scaling: 1, 2, 4, 8 compute processes on sleep-bound and CPU-bound tasks, next to raw pyzmq in the same run.

    python -m ndpipe.bench.scaling [--quick]      # or: python bench/scaling.py   (--help for options)

Layout: ONE worker daemon with ``processes=N`` and prefetch 0, so the broker sees one worker with N
slots and the daemon gives each compute process one task at a time. For each N, two workloads:

(a) sleep-bound: 400 × ``time.sleep(0.01)`` (``ndpipe.examples.handlers:sleep``). The work takes no
    CPU, so the ideal is N × 100 tasks/s whatever the number of cores.
(b) CPU-bound: 200 × ~10 ms of pure-Python integer arithmetic (``ndpipe.bench._handlers:cpu_work``),
    a fixed iteration count calibrated once at start. Fixed work rather than a clock-watching spin:
    with more processes than cores a spin still ends on time, having done less, and would fake a
    speed-up. It uses no numpy, so BLAS threads (pinned to 1 in ndpipe's compute processes) play no part.

ndpipe runs each batch as one task per call, ``Master.submit`` × n then wait for all (window ≥ tasks,
so every task is submitted at once), which is what the raw path does too. ``--mode map`` uses
``Master.map`` instead, with its default chunking (several calls per task when the installed ndpipe
batches). The raw baseline (``ndpipe.bench._raw.RawBaseline``) does the same work with nothing but
libzmq: a DEALER client (this process) → a C ``zmq.proxy`` ROUTER/DEALER device (its own process) →
N DEALER worker processes that call the same function (:func:`raw_call`): 2 hops each way, as
ndpipe's master → broker → lane. All tasks are sent at
once and the proxy's DEALER deals them round robin, an even split, which is the best schedule for
equal tasks. Each ndpipe row is divided by the raw run of the same N and workload made just before
it (``ratio``); speed-up and efficiency (speed-up ÷ N) are against N = 1 of the same system.

Where the speed-up stops, and why (printed after the table from the measured figures):

* CPU-bound work stops at the number of cores (2 on the reference VM): 2 cores give at most 2 CPU
  seconds per second, so beyond N = 2 the compute processes time-share them and each task takes
  N/2 times longer. ndpipe's broker, daemon and master also need CPU on the same cores (the
  "pipeline CPU" column: with one task in flight per process every message travels alone, the
  expensive case on this VM, see docs/PERFORMANCE.md), several times what the raw path needs.
* Sleep-bound work is not limited by cores. It stops where the pipeline itself saturates: each
  lane waits for a full round trip (result → broker → next TASK → lane) between two tasks (prefetch
  0), and the pipeline's CPU per task × tasks/s approaches what the cores
  can give.

"Pipeline CPU µs/task" is user+system CPU (psutil, before/after) of everything but the compute
processes: broker (or proxy), daemon, and this process (master or raw client). psutil counts in
10 ms ticks, so small figures are coarse. "Other load" is the machine's busy CPU (``psutil.cpu_times``)
minus ours during the run, in cores: on a shared 2-core machine a CPU-bound row is only meaningful when
it is near 0 (rerun, or use ``--repeat 3`` to keep the fastest of 3).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgpack
import psutil

from ndpipe.bench._common import SERVICES, bench_cluster, cpu_seconds, machine_line
from ndpipe.bench._raw import RawBaseline, resolve_handler

SLEEP_S = 0.01
CPU_TARGET_S = 0.01
ROLES_PIPELINE = ("broker", "workers", "client")  # every role except compute


# ---- the raw pyzmq baseline (ndpipe.bench._raw.RawBaseline running raw_call) -------------------
RAW_CALL = "ndpipe.bench.scaling:raw_call"


def raw_body(service: str, *args: Any) -> bytes:
    """The payload of one raw task: ``[handler spec, args]`` (msgpack), run by :func:`raw_call`."""
    packed: bytes = msgpack.packb([SERVICES[service], list(args)])
    return packed


_FUNCTIONS: dict[str, Callable[..., Any]] = {}  # handler spec → function, in each raw worker process


def raw_call(frames: list[Any]) -> list[bytes]:
    """The raw workers' handler: run ``fn(*args)`` for a :func:`raw_body` payload, answer the result (msgpack)."""
    spec, args = msgpack.unpackb(frames[-1].bytes)
    fn = _FUNCTIONS.get(spec)
    if fn is None:
        fn = _FUNCTIONS[spec] = resolve_handler(spec)
    return [msgpack.packb(fn(*args))]


# ---- measurement --------------------------------------------------------------------------------
def role_cpu(pids: Mapping[str, Any]) -> dict[str, float]:
    """user+system CPU seconds so far of each role's processes; ``client`` is this process."""
    out: dict[str, float] = {}
    for role, ps in pids.items():
        ids = [ps] if isinstance(ps, int) or ps is None else list(ps)
        out[role] = sum(cpu_seconds(p) for p in ids)
    out["client"] = cpu_seconds(os.getpid())
    return out


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all cores, steal included: lost to us too)."""
    t = psutil.cpu_times()
    idle = sum(float(getattr(t, name, 0.0)) for name in ("idle", "iowait", "guest", "guest_nice"))
    return float(sum(t)) - idle


def timed(pids: Mapping[str, Any], fn: Callable[[], float]) -> tuple[float, dict[str, float]]:
    """Run ``fn`` (which returns its elapsed seconds); return that and the CPU seconds per role.

    The extra role ``other`` is what the rest of the machine used meanwhile (busy CPU minus ours).
    """
    before, busy0 = role_cpu(pids), busy_seconds()
    elapsed = fn()
    after, busy1 = role_cpu(pids), busy_seconds()
    cpu = {k: after[k] - before.get(k, 0.0) for k in after}
    cpu["other"] = max(0.0, busy1 - busy0 - sum(cpu.values()))
    return elapsed, cpu


def calibrate_cpu_work(target: float = CPU_TARGET_S) -> tuple[int, float]:
    """Iterations of ``cpu_work`` that take ``target`` seconds in this process (best of 5)."""
    from ndpipe.bench._handlers import cpu_work

    n = 20_000
    while True:
        best = min(_time(cpu_work, n) for _ in range(3))
        if best >= 0.02:
            break
        n *= 2
    iters = max(1, int(n * target / best))
    return iters, min(_time(cpu_work, iters) for _ in range(5))


def _time(fn: Callable[[int], Any], arg: int) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


@dataclass
class Workload:
    name: str  # "sleep" or "cpu"
    service: str
    arg: float | int
    tasks: int
    task_s: float  # seconds one task takes alone


@dataclass
class Result:
    workload: str
    procs: int
    system: str  # "ndpipe" or "raw"
    tasks: int
    wall: float
    cpu: dict[str, float]  # CPU seconds per role over the run

    @property
    def rate(self) -> float:
        return self.tasks / self.wall

    @property
    def pipeline_us(self) -> float:
        return sum(self.cpu.get(r, 0.0) for r in ROLES_PIPELINE) / self.tasks * 1e6

    @property
    def compute_cores(self) -> float:
        """Cores' worth of CPU the compute (or raw worker) processes got during this run."""
        return self.cpu.get("compute", 0.0) / self.wall

    @property
    def other_cores(self) -> float:
        """Cores' worth of CPU that other work on the machine took during this run."""
        return self.cpu.get("other", 0.0) / self.wall


def ndpipe_submit(master: Any, wl: Workload) -> float:
    """One ndpipe task per call, like the raw path: ``Master.submit`` × n, then wait for all."""
    t0 = time.perf_counter()
    futures = [master.submit(wl.service, wl.arg) for _ in range(wl.tasks)]
    results = [f.result(timeout=600) for f in futures]
    elapsed = time.perf_counter() - t0
    if len(results) != wl.tasks:
        raise AssertionError(f"submit returned {len(results)} of {wl.tasks} results")
    return elapsed


def ndpipe_map(master: Any, wl: Workload) -> float:
    """``Master.map`` with its default chunking (which may put several calls in one task)."""
    t0 = time.perf_counter()
    results = list(master.map(wl.service, [wl.arg] * wl.tasks))
    elapsed = time.perf_counter() - t0
    if len(results) != wl.tasks:
        raise AssertionError(f"map returned {len(results)} of {wl.tasks} results")
    return elapsed


MODES: dict[str, Callable[[Any, Workload], float]] = {"submit": ndpipe_submit, "map": ndpipe_map}


def best(runs: list[Result]) -> Result:
    return min(runs, key=lambda r: r.wall)


def run_n(procs: int, workloads: list[Workload], repeat_: int = 1, mode: str = "submit") -> list[Result]:
    """One cluster (1 daemon × ``procs``) and one raw pool (``procs`` workers) for every workload;
    with ``repeat_`` > 1 the fastest of that many raw/ndpipe pairs is kept."""
    out: list[Result] = []
    window = max(1000, max(w.tasks for w in workloads))
    services = {w.service: SERVICES[w.service] for w in workloads}
    with RawBaseline(procs, handler=RAW_CALL) as raw, \
            bench_cluster(1, procs, services=services) as cluster, \
            cluster.master(window=window) as master:
        for wl in workloads:  # warm-up: imports, caches, connections; every process takes a task
            raw.run(4 * procs, 4 * procs, raw_body(wl.service, 0 if wl.name == "cpu" else 0.0))
            for f in [master.submit(wl.service, 0 if wl.name == "cpu" else 0.0) for _ in range(4 * procs)]:
                f.result(timeout=60)
        for wl in workloads:
            body = raw_body(wl.service, wl.arg)
            raws: list[Result] = []
            nds: list[Result] = []
            for _ in range(repeat_):
                wall, cpu = timed(raw.pids(), partial(raw.run, wl.tasks, wl.tasks, body))
                raws.append(Result(wl.name, procs, "raw", wl.tasks, wall, cpu))
                wall, cpu = timed(cluster.pids(), partial(MODES[mode], master, wl))
                nds.append(Result(wl.name, procs, "ndpipe", wl.tasks, wall, cpu))
            base, row = best(raws), best(nds)
            out += [base, row]
            print(f"  N={procs} {wl.name:<5}: ndpipe {row.rate:7.1f} tasks/s, raw {base.rate:7.1f} → ratio "
                  f"{row.rate / base.rate:.3f}; pipeline CPU {row.pipeline_us:,.0f} µs/task (raw "
                  f"{base.pipeline_us:,.0f}); other load {row.other_cores:.2f} / {base.other_cores:.2f} cores",
                  flush=True)
        c = master.status()["counters"]
        if c["failed"] or c["requeued"]:
            print(f"  note: broker counters {c}")
    return out


PLATEAU = 0.9  # the speed-up "stops" at the smallest N that reaches this fraction of the best one


def stop_point(ns: list[int], speedups: list[float]) -> int | None:
    """The smallest N whose speed-up is within 10 % of the best measured, or None when that is the
    largest N (still scaling, as far as measured). Robust to one slow outlier, unlike step-to-step gains."""
    peak = max(speedups)
    stop = next(n for n, s in zip(ns, speedups, strict=True) if s >= PLATEAU * peak)
    return None if stop == ns[-1] else stop


NOISY = 0.25  # cores of other work during a run above which its figure is flagged


def print_tables(results: list[Result], workloads: list[Workload], ns: list[int], cores: int) -> None:
    head = (f"{'workload':<8} {'N':>2} | {'ndpipe s':>8} {'tasks/s':>7} {'speed-up':>8} {'effic.':>6} | "
            f"{'raw s':>5} {'tasks/s':>7} {'speed-up':>8} {'effic.':>6} | {'ratio':>5} | "
            f"{'pipe µs/task':>12} {'raw':>4} | {'compute cores':>13} {'raw':>4} | {'other cores':>11} {'raw':>4}")
    print(head)
    print("-" * len(head))
    by = {(r.workload, r.procs, r.system): r for r in results}
    for wl in workloads:
        for n in ns:
            nd, raw = by[(wl.name, n, "ndpipe")], by[(wl.name, n, "raw")]
            nd1, raw1 = by[(wl.name, ns[0], "ndpipe")], by[(wl.name, ns[0], "raw")]
            s_nd = nd.rate / nd1.rate * ns[0]
            s_raw = raw.rate / raw1.rate * ns[0]
            flag = " !" if max(nd.other_cores, raw.other_cores) > NOISY else ""
            print(f"{wl.name:<8} {n:>2} | {nd.wall:8.2f} {nd.rate:7.1f} {s_nd:7.2f}× {s_nd / n:6.0%} | "
                  f"{raw.wall:5.2f} {raw.rate:7.1f} {s_raw:7.2f}× {s_raw / n:6.0%} | {nd.rate / raw.rate:5.3f} | "
                  f"{nd.pipeline_us:12,.0f} {raw.pipeline_us:4,.0f} | {nd.compute_cores:13.2f} "
                  f"{raw.compute_cores:4.2f} | {nd.other_cores:11.2f} {raw.other_cores:4.2f}{flag}")
        print()
    print("pipe µs/task: CPU of the broker (proxy), daemon and this process per task; compute cores: CPU the compute\n"
          "processes got ÷ wall; other cores: the rest of the machine's busy CPU ÷ wall.\n")
    noisy = [r for r in results if r.other_cores > NOISY]
    if noisy:
        print(f"! other work on the machine took more than {NOISY} cores during {len(noisy)} of {len(results)} runs "
              f"(up to {max(r.other_cores for r in noisy):.2f}): those rows understate what this machine can do; "
              "rerun when it is quiet, or with --repeat 3.\n")
    print(f"Where the speed-up stops (the smallest N within {1 - PLATEAU:.0%} of the best speed-up):")
    for wl in workloads:
        for system in ("ndpipe", "raw"):
            rates = [by[(wl.name, n, system)].rate for n in ns]
            speedups = [r / rates[0] * ns[0] for r in rates]
            stop = stop_point(ns, speedups)
            peak = max(speedups)
            where = f"stops at N = {stop}" if stop is not None else f"still scaling at N = {ns[-1]}"
            print(f"  {wl.name:<5} {system:<6}: {where} (best speed-up {peak:.2f}×, "
                  f"{max(rates):.0f} tasks/s)")
        print(f"        why: {explain(wl, by, ns, cores)}")


def explain(wl: Workload, by: Mapping[tuple[str, int, str], Result], ns: list[int], cores: int) -> str:
    top = by[(wl.name, ns[-1], "ndpipe")]
    if wl.name == "cpu":
        used = max(by[(wl.name, n, s)].compute_cores for n in ns for s in ("ndpipe", "raw"))
        return (f"each task needs ~{wl.task_s * 1e3:.0f} ms of CPU and the machine has {cores} cores, so at most "
                f"{cores / wl.task_s:.0f} tasks/s; past N = {cores} the processes time-share the cores (the compute "
                f"processes never got more than {used:.2f} cores in all). ndpipe's own processes also take "
                f"{top.pipeline_us / 1e3:.2f} ms CPU per task on the same cores.")
    load = top.pipeline_us * 1e-6 * top.rate
    return (f"sleep takes no CPU, so cores do not cap it (ideal {ns[-1] / wl.task_s:.0f} tasks/s at N = "
            f"{ns[-1]}); the limit is the pipeline: a compute process idles for a whole result→broker→TASK "
            f"round trip between tasks, and at N = {ns[-1]} ndpipe's broker+daemon+master use "
            f"{load:.2f} of the {cores} cores.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="N = 1, 2, 4 and a quarter of the tasks (~20 s)")
    ap.add_argument("--procs", help="compute processes to try, e.g. 1,2,4,8 (default; --quick: 1,2,4)")
    ap.add_argument("--sleep-tasks", type=int, help="sleep-bound tasks (default 400; --quick 100)")
    ap.add_argument("--cpu-tasks", type=int, help="CPU-bound tasks (default 200; --quick 50)")
    ap.add_argument("--workloads", default="sleep,cpu", help="sleep,cpu (default both)")
    ap.add_argument("--mode", choices=sorted(MODES), default="submit",
                    help="submit: one task per call, as the raw path (default); map: Master.map with its "
                         "default chunking")
    ap.add_argument("--repeat", type=int, default=1, help="keep the fastest of this many runs per cell (default 1)")
    args = ap.parse_args(argv)
    ns = sorted({int(x) for x in (args.procs or ("1,2,4" if args.quick else "1,2,4,8")).split(",")})
    sleep_tasks = args.sleep_tasks or (100 if args.quick else 400)
    cpu_tasks = args.cpu_tasks or (50 if args.quick else 200)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    t0 = time.monotonic()
    print(machine_line())
    workloads: list[Workload] = []
    kinds = args.workloads.split(",")
    if "sleep" in kinds:
        workloads.append(Workload("sleep", "sleep", SLEEP_S, sleep_tasks, SLEEP_S))
    if "cpu" in kinds:
        iters, took = calibrate_cpu_work()
        workloads.append(Workload("cpu", "cpu_work", iters, cpu_tasks, took))
        print(f"cpu_work calibrated: {iters:,} iterations = {took * 1e3:.1f} ms in this process (best of 5)")
    print(f"Scaling: layout 1 worker daemon × N compute processes, prefetch 0, ndpipe via Master.{args.mode}; "
          f"N = {', '.join(map(str, ns))}; "
          + "; ".join(f"{w.name}: {w.tasks} tasks" for w in workloads)
          + f". Raw: zmq.proxy + N worker processes. {cores} usable cores.\n", flush=True)
    results: list[Result] = []
    for n in ns:
        results += run_n(n, workloads, max(1, args.repeat), args.mode)
    print()
    print_tables(results, workloads, ns, cores)
    print(f"\ntotal wall time {time.monotonic() - t0:.1f} s; load average "
          f"{', '.join(f'{x:.2f}' for x in psutil.getloadavg())} (other work on the machine skews every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
