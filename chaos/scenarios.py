"""Scenarios 1–4 and 9: processes killed, frozen, hung, the broker crashing, memory exhausted.

Each scenario starts its own cluster (``Cluster``), runs a job through a real ``Master`` while
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
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from functools import partial
from typing import Any

from ndpipe.chaos.checker import History, Report, read_starts, restarts_after, runs_per_task, started
from ndpipe.chaos.handlers import SERVICES
from ndpipe.cluster import Cluster, process_gone, wait_for
from ndpipe.master import Master

FAST = {"heartbeat_interval": 0.2, "liveness": 3}  # short runs: a dead worker is found in 0.6 s
SIZE = 64  # elements of each task's input array


def slack(p: Params) -> float:
    """Seconds added to every recovery bound of a CI-sized run: CI shares 2 cores with the whole suite.
    Full-size runs keep the tight bounds docs/RELIABILITY.md states."""
    return 1.5 if p.short else 0.0


@dataclass
class Params:
    tasks: int | None = None  # None: the scenario's default (short or long)
    seed: int = 1
    short: bool = False

    def n(self, long: int, short: int) -> int:
        return self.tasks or (short if self.short else long)

    def wait(self, long: float) -> float:
        """Seconds to wait for a job's last answer: a CI-sized job takes seconds, so a lost answer
        should fail it in 60 s, not keep the suite (or a mutation run) waiting for the full-size bound."""
        return min(long, 60.0) if self.short and not self.tasks else long


def submit_in_background(m: Master, hist: History, tids: Iterable[int], seconds: float, log_dir: str,
                         service: str = "work", timeout: float | None = None) -> threading.Thread:
    """Submit ``work(tid)`` for every id from a thread (``submit`` blocks on a full window)."""
    return track_in_background(hist, tids, lambda tid: m.call(service, (tid, SIZE, seconds, log_dir),
                                                              timeout=timeout))


def track_in_background(hist: History, tids: Iterable[int], start: Callable[[int], Future[Any]]) -> threading.Thread:
    """``start(tid)`` for every id from a thread, each future tracked in ``hist``."""
    def run() -> None:
        for tid in tids:
            try:
                hist.track(tid, SIZE, start(tid))
            except Exception as exc:  # a refused submit is an answer too: the caller saw it
                hist.submitted(tid, SIZE)
                hist.deliver(tid, exc)
    thread = threading.Thread(target=run, name="chaos-submit", daemon=True)
    thread.start()
    return thread


def finish(c: Cluster, hist: History, report: Report, timeout: float, t0: float) -> Report:
    if not hist.wait(timeout):
        report.notes.append(f"job incomplete after {timeout:.0f} s (lost tasks below)")
    hist.check(report)
    report.seconds = time.monotonic() - t0
    report.logs = c.logs(1500)
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
                    recovery={"requeue s": []}, bounds={"requeue s": 1.0 + slack(p)}, planned=tasks)
    report.notes.append("requeue s: from the kill to the restart elsewhere of the task it was running, for each "
                        "kill that hit a running task (a kill between two tasks has nothing to requeue)")
    with Cluster(SERVICES, broker={"max_attempts": 10}) as c:
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
                pids = [pid for w in workers for pid in c.lane_pids(w)]
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
            submitter.join(p.wait(120))
            finish(c, hist, report, p.wait(300), t0)
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
                    recovery={"detect s": [], "requeue s": []},
                    bounds={"detect s": bound + slack(p), "requeue s": bound + slack(p)}, planned=tasks)
    with Cluster(SERVICES, broker=hb) as c:
        c.start_broker()
        workers = [c.start_worker(2), c.start_worker(2)]
        with c.master() as m, c.master() as watcher:
            c.wait_slots(m, 4)
            hist, t0 = History(), time.monotonic()
            submit_in_background(m, hist, range(tasks), seconds, c.log_dir)
            wait_for(lambda: len(hist.first_at) >= tasks // 8, 60, "the job under way")
            victim = workers[0]
            frozen = set(c.lane_pids(victim))
            t_stop = time.monotonic()
            c.signal_worker(victim, signal.SIGSTOP)
            wait_for(lambda: _worker_count(watcher) == 1, bound + 5, "the frozen worker declared dead", 0.05)
            report.recovery["detect s"].append(time.monotonic() - t_stop)
            time.sleep(max(0.0, t_stop + freeze - time.monotonic()))
            t_cont = time.monotonic()
            c.signal_worker(victim, signal.SIGCONT)
            rejoined = True
            try:
                wait_for(lambda: _worker_count(watcher) == 2, 30, "the worker rejoining", 0.05)
            except TimeoutError:
                rejoined = False
            finish(c, hist, report, p.wait(300), t0)
            # Its own late answers after SIGCONT would complete the job even if the broker had forgotten to
            # requeue its tasks: every task must have been answered from elsewhere (the answer names the
            # pid) before SIGCONT, and the requeue is measured only on restarts while it was stopped.
            held, delays = restarts_after(read_starts(c.log_dir), frozen, t_stop, t_until=t_cont)
            report.recovery["requeue s"] = delays
            late = [tid for tid, got in hist.answers.items() if isinstance(got[0], list) and got[0][2] in frozen
                    and got[0][3] < t_stop and hist.first_at[tid] > t_cont]  # [tid, value, pid, start]
            report.checks["no task it was running left to its own answers after SIGCONT"] = not late
            report.notes.append(f"it was running {len(held)} tasks; {len(delays)} restarted elsewhere before SIGCONT; "
                                f"{len(late)} answered by it after SIGCONT")
            report.checks["rejoined after SIGCONT"] = rejoined
    return report


# ---- 3 --------------------------------------------------------------------------------------------------
def task_hangs(p: Params) -> Report:
    """Handlers that never return: per-call deadlines and a service default from YAML must fire, every
    hung process must be killed and replaced, and a hung task the broker times out while it still waits
    in a worker (queued behind a slow task) must be stopped by W_CANCEL at once, not run for its timeout."""
    hangs, queued = (2, 1) if p.short else (6, 3)
    tasks = p.n(2_000, 200)
    services = {**SERVICES, "hang_limited": {"handler": "ndpipe.chaos.handlers:hang", "timeout": 1.0}}
    report = Report("task_hangs", f"{hangs} calls that loop forever among {tasks:,} normal ones: half with a "
                    "per-call timeout of 1 s, half on a service whose YAML timeout is 1 s; and "
                    f"{queued} with a per-call timeout of {QUEUED_HANG_TIMEOUT:g} s queued in a 1-process worker "
                    f"behind a {QUEUED_HANG_TIMEOUT + 1:g} s task",
                    expected_errors={"TaskTimeout": hangs + queued},
                    recovery={"timeout fired after s": [], "cancelled hang ran s": []},
                    bounds={"timeout fired after s": 1.5 + slack(p), "cancelled hang ran s": 0.75},
                    planned=tasks + hangs + 3 * queued)
    report.notes.append(f"cancelled hang ran s: how long a hung task that timed out while queued ran once it "
                        f"started (W_CANCEL kills it at once; a worker waiting for its own deadline lets it spin "
                        f"~{QUEUED_HANG_TIMEOUT:g} s)")
    with Cluster(services, broker=FAST) as c:
        c.start_broker()
        worker = c.start_worker(2)
        c.start_worker(1, overrides={"prefetch": 1, "services": {
            "blockq": "ndpipe.chaos.handlers:work", "hangq": "ndpipe.chaos.handlers:hang"}})
        with c.master() as m:
            c.wait_slots(m, 2)
            c.wait_slots(m, 2, service="hangq")
            hist, t0 = History(), time.monotonic()
            hang_ids = range(tasks, tasks + hangs)
            # In waves of one per process: a per-call deadline counts from the submit, so a hang queued
            # behind two others would time out before it ever ran (and prove nothing about the kill).
            for wave in range(0, hangs, 2):
                wait_for(lambda: len(c.lane_pids(worker)) == 2, 30, "2 compute processes before a wave")
                futures = []
                for i, tid in enumerate(hang_ids[wave:wave + 2], start=wave):
                    if i % 2:
                        futures.append(m.call("hang_limited", (tid, c.log_dir)))
                    else:
                        futures.append(m.call("hang", (tid, c.log_dir), timeout=1.0))
                    hist.track(tid, SIZE, futures[-1])
                futures_wait(futures, timeout=p.wait(60))  # a wave left hanging shows as lost tasks below
            for k in range(queued):
                base = tasks + hangs + 3 * k
                report.recovery["cancelled hang ran s"].append(_queued_hang(c, m, hist, base, base + 1, base + 2))
            submit_in_background(m, hist, range(tasks), 0.002, c.log_dir).join(p.wait(120))
            finish(c, hist, report, p.wait(120), t0)
            starts = read_starts(c.log_dir)
            began = {tid: t for runs in starts.values() for tid, t in runs if tid in hang_ids}
            for tid in hang_ids:
                if tid in began and tid in hist.first_at:
                    report.recovery["timeout fired after s"].append(hist.first_at[tid] - began[tid])
            hung = {pid for pid, runs in starts.items() if any(tid in hang_ids for tid, _ in runs)}
            ran = sum(tid in began for tid in hang_ids)
            report.notes.append(f"{ran} of {hangs} hung calls started (one may time out waiting for a process "
                                f"that is being replaced); each ran in its own process, {len(hung)} processes")
            wait_for(lambda: len(c.lane_pids(worker)) == 2, 30, "2 compute processes again")
            # A hung call holds its process until it is killed, so each one that ran had a process of its own.
            report.checks["every hung process killed, the pool full again"] = (
                ran >= hangs // 2 and len(hung) == ran and all(process_gone(pid) for pid in hung)
                and len(c.lane_pids(worker)) == 2)
            more = [m.call("work", (10**6 + k, SIZE, 0.0, "")) for k in range(20)]
            report.checks["pool serves again"] = all(f.result(timeout=30)[0] == 10**6 + k for k, f in enumerate(more))
    return report


QUEUED_HANG_TIMEOUT = 2.0


def _queued_hang(c: Cluster, m: Master, hist: History, blocker: int, hang: int, probe: int) -> float:
    """A slow task, then a hung one with a shorter timeout queued behind it in the same lane: the
    broker times the hung one out (and sends W_CANCEL) before it starts. How long did it run?"""
    slow = m.call("blockq", (blocker, SIZE, QUEUED_HANG_TIMEOUT + 1, c.log_dir))
    hist.track(blocker, SIZE, slow)
    wait_for(partial(started, c.log_dir, blocker), 30, f"slow task {blocker} started")
    hist.track(hang, SIZE, m.call("hangq", (hang, c.log_dir), timeout=QUEUED_HANG_TIMEOUT))
    # The lane drops the hung task if W_CANCEL reached it first (it never runs); if it started, its
    # daemon kills the lane. A probe queued behind it tells which: once the probe has answered, the
    # hung task either ran or never will.
    slow.result(timeout=30)
    check = m.call("blockq", (probe, SIZE, 0.0, c.log_dir))
    hist.track(probe, SIZE, check)
    check.result(timeout=30)
    run = started(c.log_dir, hang)
    if run is None:
        return 0.0
    pid, t_start = run
    wait_for(lambda: process_gone(pid), 30, f"the process running hung task {hang} killed", every=0.01)
    return time.monotonic() - t_start


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
                    "default heartbeats (1 s × 3)", recovery={"serving again after restart s": []},
                    bounds={"serving again after restart s": 3.0 + slack(p)}, planned=tasks)
    crashes_at: list[tuple[float, float]] = []  # (killed, restarted)
    with Cluster(SERVICES) as c:
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
                t_kill = time.monotonic()
                c.kill_broker()
                time.sleep(0.3)
                t_restart = time.monotonic()
                c.start_broker()
                crashes_at.append((t_kill, t_restart))
                first: float = wait_for(partial(hist.answered_after, t_restart), 30, "an answer after the restart")
                report.recovery["serving again after restart s"].append(first - t_restart)
            finish(c, hist, report, p.wait(300), t0)
            check_reruns(report, hist, read_starts(c.log_dir), crashes_at, slots=4, late=m.counters["late_answers"])
    return report


def check_reruns(report: Report, hist: History, starts: dict[int, list[tuple[int, float]]],
                 faults: list[tuple[float, float]], slots: int, late: int) -> None:
    """Work done twice is bounded by what the dead broker had handed out: a task may run again only if its
    first run started before the new broker existed (``faults`` holds (killed, restarted) times) and its
    first answer came after the kill. A task in flight to a worker at the kill starts just after it, so the
    kill time alone is no bound. Each crash can catch at most ``slots`` tasks handed out. A broker that
    queued resent tasks twice fails this: the second copy is handed out by the new broker."""
    twice = {tid: ts for tid, ts in runs_per_task(starts).items() if len(ts) > 1}
    bad = [tid for tid, ts in twice.items()
           if not any(ts[0] < back and hist.first_at.get(tid, float("inf")) > died for died, back in faults)]
    report.notes.append(f"{len(twice)} tasks ran twice ({slots} slots, {len(faults)} crashes); the master dropped "
                        f"{late} late answers")
    # Running at the crash (≤ slots), or finished with the answer lost inside the dying broker (a few).
    report.checks[f"only tasks under way at a crash ran twice (≤ 2 × {slots} per crash)"] = (
        not bad and len(twice) <= 2 * slots * len(faults))
    if bad:
        report.notes.append(f"{len(bad)} tasks ran twice though first handed out after a restart, e.g. {bad[:5]}")
    report.checks["every late answer is of a task that ran twice"] = late <= len(twice)


# ---- 9 --------------------------------------------------------------------------------------------------
def worker_oom(p: Params) -> Report:
    """A handler that allocates until its compute process hits worker.memory_limit (RLIMIT_AS)."""
    tasks = p.n(500, 100)
    limit = 512 << 20
    report = Report("worker_oom", f"one call allocating until its compute process exceeds worker.memory_limit = "
                    f"{limit >> 20} MiB (RLIMIT_AS), among {tasks:,} normal calls; max_attempts 2",
                    expected_errors={"TaskCrashed": 1}, planned=tasks + 1)
    with Cluster(SERVICES, broker={**FAST, "max_attempts": 2}, worker={"memory_limit": limit}) as c:
        c.start_broker()
        c.start_worker(2)
        with c.master() as m:
            c.wait_slots(m, 2)
            hist, t0 = History(), time.monotonic()
            hog = m.call("hog", (tasks, c.log_dir))
            hist.track(tasks, SIZE, hog)
            submit_in_background(m, hist, range(tasks), 0.002, c.log_dir).join(p.wait(120))
            finish(c, hist, report, p.wait(120), t0)
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
