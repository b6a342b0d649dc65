"""Scenarios 1–4 and 9: processes killed, frozen, hung, the broker crashing, memory exhausted.

Each scenario starts its own cluster (``ChaosCluster``), runs a job through a real ``Master`` while
injecting its fault from this process, and returns the checker's :class:`Report`. ``short`` is the
CI-sized variant (seconds); the defaults are the figures docs/RELIABILITY.md records. Every loop is
bounded in count and in time.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from ndpipe.chaos.checker import History, Report, read_starts, restarts_after
from ndpipe.chaos.harness import SERVICES, ChaosCluster, wait_for
from ndpipe.master import Master

FAST = {"heartbeat_interval": 0.2, "liveness": 3}  # short runs: a dead worker is found in 0.6 s
SIZE = 64  # elements of each task's input array


@dataclass
class Params:
    tasks: int | None = None  # None: the scenario's default (short or long)
    seed: int = 1
    short: bool = False

    def n(self, long: int, short: int) -> int:
        return self.tasks or (short if self.short else long)


def submit_in_background(m: Master, hist: History, tids: Iterable[int], seconds: float, log_dir: str,
                         service: str = "work", timeout: float | None = None) -> threading.Thread:
    """Submit ``work(tid)`` for every id from a thread (``submit`` blocks on a full window)."""
    def run() -> None:
        for tid in tids:
            try:
                hist.track(tid, SIZE, m.call(service, (tid, SIZE, seconds, log_dir), timeout=timeout))
            except Exception as exc:  # a refused submit is an answer too: the caller saw it
                hist.submitted(tid, SIZE)
                hist.deliver(tid, exc)
    thread = threading.Thread(target=run, name="chaos-submit", daemon=True)
    thread.start()
    return thread


def finish(c: ChaosCluster, hist: History, report: Report, timeout: float, t0: float) -> Report:
    if not hist.wait(timeout):
        report.notes.append(f"job incomplete after {timeout:.0f} s (lost tasks below)")
    hist.check(report)
    report.seconds = time.monotonic() - t0
    if not report.passed:
        report.notes.append("logs:\n" + c.logs(1500))
    return report


# ---- 1 --------------------------------------------------------------------------------------------------
def workers_killed(p: Params) -> Report:
    """kill -9 a random compute process every 0.5–1 s while tasks run on 4 of them."""
    rng = random.Random(p.seed)
    tasks, kills = p.n(20_000, 1_500), (5 if p.short else 30)
    gap = (0.2, 0.4) if p.short else (0.5, 1.0)
    seconds = max(0.001, kills * statistics.mean(gap) * 4 / tasks * 1.3)  # the job outlasts the kills
    report = Report("workers_killed", f"kill -9 of a random compute process every {gap[0]}–{gap[1]} s, "
                    f"{kills} kills; {tasks:,} tasks of {seconds * 1000:.1f} ms on 2 daemons × 2 processes",
                    recovery={"requeue s": []})
    report.notes.append("requeue s: from the kill to the restart elsewhere of the task it was running, for each "
                        "kill that hit a running task (a kill between two tasks has nothing to requeue)")
    with ChaosCluster(broker={"max_attempts": 10}) as c:
        c.start_broker()
        workers = [c.start_worker(2), c.start_worker(2)]
        with c.master() as m:
            c.wait_slots(m, 4)
            hist, t0 = History(), time.monotonic()
            submitter = submit_in_background(m, hist, range(tasks), seconds, c.log_dir)
            victims: list[tuple[int, float]] = []
            deadline = t0 + 30 + 3 * kills
            while len(victims) < kills and time.monotonic() < deadline:
                time.sleep(rng.uniform(*gap))
                pids = [pid for w in workers for pid in c.compute_pids(w)]
                working = [pid for pid in pids if os.path.exists(os.path.join(c.log_dir, f"{pid}.starts"))]
                pids = working or pids  # rather a process that has started tasks than a fresh replacement
                if not pids:
                    continue
                pid = rng.choice(sorted(pids))
                t_kill = time.monotonic()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                victims.append((pid, t_kill))
            submitter.join(120)
            finish(c, hist, report, 300, t0)
            starts = read_starts(c.log_dir)
            for pid, t_kill in victims:
                report.recovery["requeue s"] += restarts_after(starts, {pid}, t_kill)[1]
            report.checks[f"{kills} kills made"] = len(victims) >= kills
    return report


# ---- 2 --------------------------------------------------------------------------------------------------
def _worker_count(m: Master) -> int:
    return len(m.status(timeout=10)["workers"])


def worker_frozen(p: Params) -> Report:
    """SIGSTOP a whole worker (daemon and compute processes) for 10 s, then SIGCONT."""
    hb = FAST if p.short else {"heartbeat_interval": 1.0, "liveness": 3}
    freeze = 2.0 if p.short else 10.0
    tasks = p.n(2_000, 400)
    seconds = (freeze + 2.0) * 4 / tasks * 1.5
    bound = hb["liveness"] * hb["heartbeat_interval"] + 0.5
    report = Report("worker_frozen", f"SIGSTOP of one worker daemon and its 2 compute processes for {freeze:g} s "
                    f"mid-job, then SIGCONT; {tasks:,} tasks of {seconds * 1000:.0f} ms on 2 daemons × 2 "
                    f"processes; heartbeat {hb['heartbeat_interval']} s × {hb['liveness']}",
                    recovery={"detect s": [], "requeue s": []})
    with ChaosCluster(broker=hb) as c:
        c.start_broker()
        workers = [c.start_worker(2), c.start_worker(2)]
        with c.master() as m, c.master() as watcher:
            c.wait_slots(m, 4)
            hist, t0 = History(), time.monotonic()
            submit_in_background(m, hist, range(tasks), seconds, c.log_dir)
            wait_for(lambda: len(hist.first_at) >= tasks // 8, 60, "the job under way")
            victim = workers[0]
            frozen = set(c.compute_pids(victim))
            t_stop = time.monotonic()
            c.signal_worker(victim, signal.SIGSTOP)
            wait_for(lambda: _worker_count(watcher) == 1, bound + 5, "the frozen worker declared dead", 0.05)
            report.recovery["detect s"].append(time.monotonic() - t_stop)
            time.sleep(max(0.0, t_stop + freeze - time.monotonic()))
            c.signal_worker(victim, signal.SIGCONT)
            rejoined = True
            try:
                wait_for(lambda: _worker_count(watcher) == 2, 30, "the worker rejoining", 0.05)
            except TimeoutError:
                rejoined = False
            finish(c, hist, report, 300, t0)
            report.recovery["requeue s"] = restarts_after(read_starts(c.log_dir), frozen, t_stop)[1]
            report.checks[f"declared dead within liveness × interval + 0.5 s = {bound:g} s"] = (
                max(report.recovery["detect s"]) <= bound)
            report.checks["rejoined after SIGCONT"] = rejoined
    return report


# ---- 3 --------------------------------------------------------------------------------------------------
def task_hangs(p: Params) -> Report:
    """Handlers that never return: per-call deadlines and a service default from YAML must fire."""
    hangs = 2 if p.short else 6
    tasks = p.n(2_000, 200)
    services = {**SERVICES, "hang_limited": {"handler": "ndpipe.chaos.handlers:hang", "timeout": 1.0}}
    report = Report("task_hangs", f"{hangs} calls that loop forever among {tasks:,} normal ones: half with a "
                    "per-call timeout of 1 s, half on a service whose YAML timeout is 1 s",
                    expected_errors={"TaskTimeout": hangs}, recovery={"timeout fired after s": []})
    with ChaosCluster(broker=FAST, services=services) as c:
        c.start_broker()
        worker = c.start_worker(2)
        with c.master() as m:
            c.wait_slots(m, 2)
            before = set(c.compute_pids(worker))
            hist, t0 = History(), time.monotonic()
            hang_ids = range(tasks, tasks + hangs)
            issued: dict[int, float] = {}
            for i, tid in enumerate(hang_ids):
                issued[tid] = time.monotonic()
                if i % 2:
                    hist.track(tid, SIZE, m.call("hang_limited", (tid, c.log_dir)))
                else:
                    hist.track(tid, SIZE, m.call("hang", (tid, c.log_dir), timeout=1.0))
            submit_in_background(m, hist, range(tasks), 0.002, c.log_dir).join(120)
            finish(c, hist, report, 120, t0)
            starts = read_starts(c.log_dir)
            began = {tid: t for runs in starts.values() for tid, t in runs if tid in issued}
            for tid in hang_ids:
                if tid in began and tid in hist.first_at:
                    report.recovery["timeout fired after s"].append(hist.first_at[tid] - began[tid])
            after = wait_for(lambda: len(c.compute_pids(worker)) == 2 and set(c.compute_pids(worker)), 30,
                             "2 compute processes again")
            report.checks["hung processes killed and replaced"] = len(before - after) >= 1
            more = [m.call("work", (10**6 + k, SIZE, 0.0, "")) for k in range(20)]
            report.checks["pool serves again"] = all(f.result(timeout=30)[0] == 10**6 + k for k, f in enumerate(more))
    return report


def _answered_at_least(hist: History, n: int) -> bool:
    return len(hist.first_at) >= n


# ---- 4 --------------------------------------------------------------------------------------------------
def broker_crashes(p: Params) -> Report:
    """kill -9 the broker three times during one job, restarting it each time."""
    crashes = 3
    tasks = p.n(3_000, 600)
    seconds = (6.0 if p.short else 12.0) * 4 / tasks
    report = Report("broker_crashes", f"kill -9 of the broker {crashes} times mid-job, restarted 0.3 s later each "
                    f"time; {tasks:,} tasks of {seconds * 1000:.0f} ms on 2 daemons × 2 processes; "
                    "default heartbeats (1 s × 3)", recovery={"serving again after restart s": []})
    with ChaosCluster() as c:
        c.start_broker()
        c.start_worker(2)
        c.start_worker(2)
        with c.master() as m:
            c.wait_slots(m, 4)
            hist, t0 = History(), time.monotonic()
            submit_in_background(m, hist, range(tasks), seconds, c.log_dir)
            for k in range(crashes):
                wait_for(partial(_answered_at_least, hist, tasks * (k + 1) // (crashes + 2)), 120,
                         f"progress before crash {k + 1}")
                c.kill_broker()
                time.sleep(0.3)
                c.start_broker()
                t_restart = time.monotonic()
                first: float = wait_for(partial(hist.answered_after, t_restart), 30, "an answer after the restart")
                report.recovery["serving again after restart s"].append(first - t_restart)
            finish(c, hist, report, 300, t0)
            report.checks["serving again within 3 s of each restart"] = (
                max(report.recovery["serving again after restart s"], default=99) <= 3.0)
    return report


# ---- 9 --------------------------------------------------------------------------------------------------
def worker_oom(p: Params) -> Report:
    """A handler that allocates until its compute process hits worker.memory_limit (RLIMIT_AS)."""
    tasks = p.n(500, 100)
    limit = 512 << 20
    report = Report("worker_oom", f"one call allocating until its compute process exceeds worker.memory_limit = "
                    f"{limit >> 20} MiB (RLIMIT_AS), among {tasks:,} normal calls; max_attempts 2",
                    expected_errors={"TaskCrashed": 1})
    with ChaosCluster(broker={**FAST, "max_attempts": 2}, worker={"memory_limit": limit}) as c:
        c.start_broker()
        c.start_worker(2)
        with c.master() as m:
            c.wait_slots(m, 2)
            hist, t0 = History(), time.monotonic()
            hog = m.call("hog", (tasks, c.log_dir))
            hist.track(tasks, SIZE, hog)
            submit_in_background(m, hist, range(tasks), 0.002, c.log_dir).join(120)
            finish(c, hist, report, 120, t0)
            exc = hog.exception(timeout=60)
            message = str(exc)
            report.notes.append(f"the caller got: {type(exc).__name__}: {message.splitlines()[0][:200]}")
            report.checks["error names the memory limit"] = "memory" in message
            more = [m.call("work", (10**6 + k, SIZE, 0.0, "")) for k in range(20)]
            report.checks["pool serves again"] = all(f.result(timeout=30)[0] == 10**6 + k for k, f in enumerate(more))
    return report


SCENARIOS: dict[str, Callable[[Params], Report]] = {
    "workers_killed": workers_killed,
    "worker_frozen": worker_frozen,
    "task_hangs": task_hangs,
    "broker_crashes": broker_crashes,
    "worker_oom": worker_oom,
}
