"""Scenarios 10–12: the master's link to the broker fails; each of its three resend paths must save
the job on its own.

* ``master_frozen`` — the master process is stopped (SIGSTOP) until the broker forgets it, its link
  up; on SIGCONT the broker's PONG carries a new session, the only sign that its queued tasks were
  dropped: the **session** resend.
* ``master_link_cut`` — the master's TCP link is reset and refused for 1 s, three times, through a
  :class:`LinkProxy`; the broker keeps the master (its liveness is longer) but drops the results it
  could not deliver: the **link-return** resend (socket monitor). Resent tasks the broker still
  holds must not run twice (its duplicate check).
* ``master_link_silent`` — the link goes silent without closing (frozen in the proxy); the master
  opens a **new socket** after liveness × interval and must resend on it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from ndpipe.chaos.checker import History, Report, read_starts
from ndpipe.chaos.handlers import SERVICES
from ndpipe.chaos.linkproxy import LinkProxy
from ndpipe.chaos.scenarios import FAST, SIZE, Params, finish, submit_in_background
from ndpipe.cluster import Cluster, wait_for
from ndpipe.config import MasterConfig
from ndpipe.errors import NdpipeError
from ndpipe.master import Master


def _answered_at_least(hist: History, n: int) -> bool:
    return len(hist.first_at) >= n


# ---- 10 -------------------------------------------------------------------------------------------------
def resumable_master(endpoint: str, tasks: int, seconds: float, log_dir: str, out: str, interval: float,
                     limit: float) -> None:
    """Body of the master process ``master_frozen`` stops: submit, wait (bounded), write every outcome."""
    # A long liveness of its own: on SIGCONT the master must not take the broker for silent (a new
    # socket resends too), so only the new session token in the next PONG can make it resend.
    cfg = MasterConfig(broker=endpoint, window=tasks + 16, heartbeat_interval=interval, liveness=50)
    with Master(endpoint, config=cfg) as m:
        futures = [m.call("work", (tid, SIZE, seconds, log_dir)) for tid in range(tasks)]
        print("submitted", flush=True)
        deadline = time.monotonic() + limit
        outcomes: list[Any] = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=max(0.01, deadline - time.monotonic()))[:2])
            except Exception as exc:  # lost answers show as the wait's TimeoutError
                outcomes.append(type(exc).__name__)
        with open(out, "w") as f:
            json.dump({"outcomes": outcomes, "counters": m.counters}, f)


def master_frozen(p: Params) -> Report:
    """SIGSTOP a master process with queued tasks until the broker forgets it, then SIGCONT."""
    hb = FAST if p.short else {"heartbeat_interval": 1.0, "liveness": 3}
    tasks, seconds = p.n(200, 40), 0.1
    report = Report("master_frozen", f"SIGSTOP of a master process with {tasks} tasks outstanding ({seconds * 1000:.0f}"
                    f" ms each on 1 daemon × 2 processes) until the broker forgets it (heartbeat "
                    f"{hb['heartbeat_interval']} s × {hb['liveness']}), then SIGCONT; its link stays up, and its own "
                    "liveness (50 intervals) keeps it from opening a new socket: only the new session can resend",
                    recovery={"frozen until forgotten s": []})
    with Cluster(SERVICES, broker=hb) as c:
        c.start_broker()
        c.start_worker(2)
        with c.master() as watcher:
            c.wait_slots(watcher, 2)
            out = c.root / "outcomes.json"
            code = "import sys; from ndpipe.chaos.links import resumable_master as r; a = sys.argv; " \
                   "r(a[1], int(a[2]), float(a[3]), a[4], a[5], float(a[6]), float(a[7]))"
            args = [c.frontend, str(tasks), str(seconds), c.log_dir, str(out), str(hb["heartbeat_interval"]),
                    "30" if p.short else "120"]
            log = open(c.root / "frozen-master.log", "wb")
            proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            log.close()
            c.procs.append(proc)
            t0 = time.monotonic()
            wait_for(lambda: watcher.status()["tasks"] >= tasks // 2, 60, "the master's tasks at the broker", 0.05)
            proc.send_signal(signal.SIGSTOP)
            t_stop = time.monotonic()
            forgotten = True
            try:
                wait_for(lambda: watcher.status()["masters"] == 1, 30, "the frozen master forgotten", 0.05)
                report.recovery["frozen until forgotten s"].append(time.monotonic() - t_stop)
            except TimeoutError:
                forgotten = False
            queued_at_forget = watcher.status()["tasks"]
            proc.send_signal(signal.SIGCONT)
            exited = proc.wait(180)
            hist = History()
            data = json.loads(out.read_text()) if out.exists() else {"outcomes": [], "counters": {}}
            for tid in range(tasks):
                hist.submitted(tid, SIZE)
            for tid, outcome in enumerate(data["outcomes"]):
                hist.deliver(tid, outcome if isinstance(outcome, list) else NdpipeError(outcome))
            finish(c, hist, report, 1, t0)
            report.checks["forgotten by the broker while frozen"] = forgotten
            report.checks["the broker had dropped its queued tasks"] = forgotten and queued_at_forget < tasks // 2
            # The first PONG resends nothing (its tasks went out once already): this one is the resume's.
            report.checks["the master resent after it resumed"] = data["counters"].get("resends", 0) >= 1
            report.checks["the master process finished cleanly"] = exited == 0
            report.notes.append(f"master counters: {data['counters']}")
    return report


# ---- 11, 12 ---------------------------------------------------------------------------------------------
LINK_HB = {"heartbeat_interval": 0.5, "liveness": 6}  # the broker keeps a master 3 s: longer than a cut


def _link_job(p: Params, name: str, injected: str, broker: dict[str, Any], master: dict[str, Any],
              fault: Callable[[LinkProxy, History, int, Report], list[float]]) -> Report:
    """Run a job through a proxy in front of the frontend; ``fault`` breaks the link and returns the
    (start, end) times of each fault, flattened."""
    tasks, seconds = p.n(4_000, 1_200), 0.01
    report = Report(name, f"{injected}; {tasks:,} tasks of {seconds * 1000:.0f} ms on 2 daemons × 2 processes",
                    recovery={"answers again after the fault s": []})
    with Cluster(SERVICES, broker=broker) as c:
        c.start_broker()
        c.start_worker(2)
        c.start_worker(2)
        proxy = LinkProxy(c.frontend)
        try:
            cfg = MasterConfig(**{**c.config["master"], **master, "broker": proxy.endpoint})
            with Master(proxy.endpoint, config=cfg) as m, c.master() as watcher:
                c.wait_slots(watcher, 4)
                m.status()  # the first PONG comes before the job
                hist, t0 = History(), time.monotonic()
                submit_in_background(m, hist, range(tasks), seconds, c.log_dir)
                windows = fault(proxy, hist, tasks, report)
                finish(c, hist, report, p.wait(120), t0)
                counters = m.counters
                broker = watcher.status()["counters"]
            starts = read_starts(c.log_dir)
            runs = Counter(tid for per_pid in starts.values() for tid, _ in per_pid)
            twice = sorted(tid for tid, n in runs.items() if n > 1)
            report.notes.append(f"master counters {counters}; broker dropped {broker['duplicates']} resent tasks it "
                                f"held; {len(twice)} tasks ran twice; {proxy.accepted} connections through the proxy")
            report.checks["the master resent after each fault"] = counters["resends"] >= len(windows) // 2
            report.checks["the broker dropped resent tasks it still held (its duplicate count > 0)"] = (
                broker["duplicates"] > 0)
            report.checks["late answers (dropped) only for tasks that ran twice"] = (
                counters["late_answers"] <= len(twice))
            _check_reruns(report, starts, twice, windows)
        finally:
            proxy.close()
    return report


def _check_reruns(report: Report, starts: dict[int, list[tuple[int, float]]], twice: list[int],
                  windows: list[float]) -> None:
    """A task may run twice only if its first run was under way when a fault hit: its answer was lost
    with the link. A resent task that the broker still held must not run again."""
    first = {tid: min(t for per_pid in starts.values() for t_id, t in per_pid if t_id == tid) for tid in twice}
    bad = [tid for tid in twice if not any(a - 1.0 <= first[tid] <= b for a, b in zip(windows[::2], windows[1::2],
                                                                                     strict=True))]
    report.checks["no task ran twice unless its answer was lost in a fault"] = not bad
    if bad:
        report.notes.append(f"{len(bad)} tasks ran twice though queued at the broker when the link returned, "
                            f"e.g. {bad[:5]}")


def _cut_three_times(proxy: LinkProxy, hist: History, tasks: int, report: Report) -> list[float]:
    windows: list[float] = []
    for k in range(3):
        wait_for(partial(_answered_at_least, hist, tasks * (k + 1) // 5), 120, f"progress before cut {k + 1}")
        t_cut = time.monotonic()
        proxy.cut()
        time.sleep(1.0)  # the outage itself: results finished now cannot reach the master
        proxy.restore()
        t_back = time.monotonic()
        windows += [t_cut, t_back + 0.5]  # +0.5 s: the link returns and the resend travels
        first = wait_for(partial(hist.answered_after, t_back), 30, "an answer after the link returned")
        report.recovery["answers again after the fault s"].append(first - t_back)
    return windows


def _freeze_once(proxy: LinkProxy, hist: History, tasks: int, report: Report) -> list[float]:
    wait_for(partial(_answered_at_least, hist, tasks // 4), 120, "progress before the freeze")
    t_freeze = time.monotonic()
    proxy.freeze()
    first = wait_for(partial(hist.answered_after, t_freeze + 0.1), 30, "an answer on the new socket")
    report.recovery["answers again after the fault s"].append(first - t_freeze)
    report.checks["a new connection replaced the silent one"] = proxy.accepted >= 2
    return [t_freeze, first + 0.5]


def master_link_cut(p: Params) -> Report:
    """Reset the master's TCP link and refuse it for 1 s, three times during one job."""
    return _link_job(p, "master_link_cut", "the master's link (tcp through a proxy) reset and refused for 1 s, "
                     "3 times mid-job; broker keeps masters 3 s (0.5 s × 6)", LINK_HB,
                     {"heartbeat_interval": 0.5, "liveness": 6}, _cut_three_times)


def master_link_silent(p: Params) -> Report:
    """Freeze the master's link (no bytes either way, nothing closed) once during a job."""
    return _link_job(p, "master_link_silent", "the master's link (tcp through a proxy) frozen for good mid-job; "
                     "the master gives up on it after 0.2 s × 3, the broker keeps masters 5 s (0.2 s × 25)",
                     {"heartbeat_interval": 0.2, "liveness": 25}, {"heartbeat_interval": 0.2, "liveness": 3},
                     _freeze_once)


SCENARIOS: dict[str, Callable[[Params], Report]] = {
    "master_frozen": master_frozen,
    "master_link_cut": master_link_cut,
    "master_link_silent": master_link_silent,
}
