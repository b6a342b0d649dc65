"""Scenario 5: a network partition between the broker's host and one of two worker hosts.

Three "hosts" are network namespaces created here (``ndpc-<pid>-b``, ``-w1``, ``-w2``), the broker's
joined to each worker host by its own veth pair (10.231.K.0/24, broker side .1, worker side .2).
The broker binds ``tcp://0.0.0.0``; each worker daemon connects over its link. The job runs in a
child process inside the broker's namespace (:func:`run_job`, a Master over 127.0.0.1 plus a second
Master polling STATUS), because a namespace belongs to a whole process: the parent cannot join one
for a thread. The parent cuts worker host 1's link twice (``ip link set … down`` on the broker side),
brings it back, and reads what the child recorded: STATUS changes (``timeline``), every answer the
caller saw (the checker's counts) and each task's first-answer time; and the handlers' start logs,
a shared path every namespace sees, to tell where held tasks restarted.

Measured per cut: **detect** (link down → STATUS no longer lists host 1's daemon), **requeue**
(link down → each task host 1 held starting again on host 2), **rejoin** (link up → STATUS lists
host 1 again, 2 workers) and **working again** (link up → host 1's compute processes start tasks).
Only loopback and the namespaces made here are touched; every namespace and veth is deleted in a
``finally``, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ndpipe.chaos.checker import History, Report, read_starts, restarts_after
from ndpipe.chaos.handlers import SERVICES
from ndpipe.chaos.scenarios import FAST, SIZE, Params, slack
from ndpipe.cluster import Cluster, wait_for
from ndpipe.config import MasterConfig
from ndpipe.master import Master

FRONTEND_PORT, BACKEND_PORT = 5555, 5556  # free by construction: the broker's namespace is new
SUBNET = "10.231"  # worker host K is 10.231.K.2, the broker's end of its link 10.231.K.1
IP_TIMEOUT = 10.0
IN_TRANSIT = 0.1  # s: an answer sent just before the cut reaches the caller within this (loopback from the broker)


# ---- namespaces ------------------------------------------------------------------------------------------
def _ip(*args: str, timeout: float = IP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``ip ARGS`` without raising: the caller looks at returncode and stderr."""
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(["ip", *args], 255, "", str(exc))


def available() -> str | None:
    """None if this scenario can run here, else why not (tests skip with it outside CI)."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"ndpc-{os.getpid()}-probe"
    made = _ip("netns", "add", probe)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    try:
        steps = [("create a veth pair", ("-n", probe, "link", "add", "ndpcp0", "type", "veth", "peer", "name",
                                         "ndpcp1")),
                 ("run a command in a namespace", ("netns", "exec", probe, "ip", "link", "set", "lo", "up"))]
        for what, args in steps:
            r = _ip(*args)
            if r.returncode:
                return f"cannot {what}: {r.stderr.strip() or r.returncode}"
    finally:
        _ip("netns", "del", probe)  # the probe veth pair lives in it and goes with it
    return None


class Hosts:
    """The broker's namespace and one namespace per worker host, each joined to the broker's by a veth
    pair created inside the namespaces (never in the root one). :meth:`delete` removes all of them."""

    def __init__(self, workers: int = 2) -> None:
        tag = os.getpid()
        self.broker = f"ndpc-{tag}-b"
        self.workers = [f"ndpc-{tag}-w{k}" for k in range(1, workers + 1)]
        self.links = [(f"ndpc{tag}b{k}", f"ndpc{tag}w{k}") for k in range(1, workers + 1)]  # ≤ 15 chars
        self.made: list[str] = []  # namespaces actually created, in order

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def backend(self, k: int) -> str:
        """The broker's backend as worker host ``k`` (1-based) reaches it."""
        return f"tcp://{SUBNET}.{k}.1:{BACKEND_PORT}"

    def create(self) -> None:
        for ns in [self.broker, *self.workers]:
            self._must("netns", "add", ns)
            self.made.append(ns)
            self._must("-n", ns, "link", "set", "lo", "up")
        for k, (ns, (b_end, w_end)) in enumerate(zip(self.workers, self.links, strict=True), 1):
            self._must("-n", self.broker, "link", "add", b_end, "type", "veth", "peer", "name", w_end, "netns", ns)
            self._must("-n", self.broker, "addr", "add", f"{SUBNET}.{k}.1/24", "dev", b_end)
            self._must("-n", ns, "addr", "add", f"{SUBNET}.{k}.2/24", "dev", w_end)
            self._must("-n", self.broker, "link", "set", b_end, "up")
            self._must("-n", ns, "link", "set", w_end, "up")

    def set_link(self, k: int, up: bool) -> None:
        """Worker host ``k``'s link, switched at the broker's end."""
        self._must("-n", self.broker, "link", "set", self.links[k - 1][0], "up" if up else "down")

    def delete(self) -> list[str]:
        """Delete every veth and namespace made here; what could not be deleted (empty when clean)."""
        for (b_end, _), ns in zip(self.links, self.workers, strict=True):
            if self.broker in self.made:
                _ip("-n", self.broker, "link", "del", b_end)  # takes its peer with it
            if ns in self.made:
                _ip("netns", "del", ns)
        if self.broker in self.made:
            _ip("netns", "del", self.broker)
        left = set(_ip("netns", "list").stdout.split()) & set(self.made)
        for end in (e for pair in self.links for e in pair):
            if _ip("link", "show", end).returncode == 0:  # never made in the root namespace; just in case
                _ip("link", "del", end)
                left.add(end)
        self.made = [ns for ns in self.made if ns in left]
        return sorted(left)

    @staticmethod
    def _must(*args: str) -> None:
        r = _ip(*args)
        if r.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")


# ---- the job, run inside the broker's namespace -------------------------------------------------------------
def run_job(spec_path: str) -> None:
    """Child process: submit ``work`` until the stop file appears (or the cap, or the deadline), record
    every change in STATUS's worker list, wait for the answers, write the checker's counts as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    end = time.monotonic() + spec["max_seconds"]
    cfg = MasterConfig(broker=spec["frontend"])
    hist, stop = History(), threading.Event()
    out: dict[str, Any] = {"notes": []}
    with Master(spec["frontend"], config=cfg) as m, Master(spec["frontend"], config=cfg) as watcher:
        wait_for(lambda: _slots(watcher) >= spec["slots"], 60, f"{spec['slots']} registered slots", 0.05)
        threads = [threading.Thread(target=_watch, args=(watcher, spec, stop, end), daemon=True),
                   threading.Thread(target=_feed, args=(m, hist, spec, stop, end, out), daemon=True)]
        for t in threads:
            t.start()
        while not stop.is_set() and time.monotonic() < end and not os.path.exists(spec["stop"]):
            time.sleep(0.05)
        stop.set()
        threads[1].join(60)
        out["complete"] = hist.wait(spec["drain"])
        threads[0].join(10)
        report = hist.check(Report("partition", ""))
    out.update(submitted=report.submitted, ok=report.ok, lost=report.lost, duplicated=report.duplicated,
               unexpected=report.unexpected, wrong=report.wrong, errors=dict(report.errors),
               first_at=sorted(hist.first_at.items()))
    tmp = spec["out"] + ".tmp"
    Path(tmp).write_text(json.dumps(out))
    os.replace(tmp, spec["out"])


def _slots(m: Master) -> int:
    try:
        return int(m.status(timeout=2)["services"].get("work", {}).get("slots", 0))
    except Exception:
        return 0


def _feed(m: Master, hist: History, spec: dict[str, Any], stop: threading.Event, end: float,
          out: dict[str, Any]) -> None:
    """Submit until stopped; ``call`` blocks while the window is full, so this is paced by the workers."""
    args = (SIZE, spec["seconds"], spec["log_dir"])
    for tid in range(spec["cap"]):
        if stop.is_set() or time.monotonic() > end:
            return
        try:
            hist.track(tid, SIZE, m.call("work", (tid, *args)))
        except Exception as exc:  # a refused submit is an answer too: the caller saw it
            hist.submitted(tid, SIZE)
            hist.deliver(tid, exc)
    out["notes"].append(f"all {spec['cap']:,} tasks submitted before the schedule ended: raise --tasks")


def _watch(watcher: Master, spec: dict[str, Any], stop: threading.Event, end: float) -> None:
    """Append ``time pid pid …`` (the daemons STATUS lists) to the timeline at every change."""
    last: list[int] | None = None
    with open(spec["timeline"], "a", buffering=1) as f:
        while not stop.is_set() and time.monotonic() < end:
            try:
                workers = watcher.status(timeout=max(0.5, spec["poll"] * 10))["workers"]
            except Exception:
                continue
            pids = sorted(int(w.get("info", {}).get("pid", 0)) for w in workers)
            if pids != last:
                f.write(" ".join([f"{time.monotonic():.6f}", *map(str, pids)]) + "\n")
                last = pids
            stop.wait(spec["poll"])


# ---- the parent: schedule, faults, scoring ---------------------------------------------------------------
@dataclass
class Plan:
    hb: dict[str, float]
    outages: tuple[float, ...]
    seconds: float  # per task
    cap: int  # most tasks submitted (the job runs until the schedule ends)
    warm: int  # task starts before the first cut
    gap: float  # host 1 working again → next cut (and → stop after the last)
    rejoin_timeout: float
    slack: float  # added to the detection bound in CI-sized runs (scenarios.slack)

    @classmethod
    def of(cls, p: Params) -> Plan:
        hb = dict(FAST) if p.short else {"heartbeat_interval": 1.0, "liveness": 3}
        return cls(hb, (2.0, 4.0) if p.short else (5.0, 30.0), 0.005,
                   p.n(300_000, 60_000), 100 if p.short else 400, 1.0 if p.short else 3.0, 15.0 if p.short else 40.0,
                   slack(p))

    @property
    def bound(self) -> float:
        """Detection bound: a cut link is found by silence, L × I (+ the ¼ I check period + STATUS polling),
        plus the CI slack of a short run."""
        return self.hb["liveness"] * self.hb["heartbeat_interval"] + 0.5 + self.slack

    @property
    def max_seconds(self) -> float:
        return 60 + sum(self.outages) + len(self.outages) * (2 * self.rejoin_timeout + 2 * self.gap)


@dataclass
class Cut:
    seconds: float
    victims: set[int]  # host 1's compute processes at the cut
    down: float = 0.0
    up: float = 0.0
    rejoined: float | None = None  # when STATUS listed host 1 again (2 workers)
    working: float | None = None  # host 1's first task start after link-up


def _timeline(path: Path) -> list[tuple[float, list[int]]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 1:
            rows.append((float(parts[0]), [int(x) for x in parts[1:]]))
    return rows


def _first(rows: list[tuple[float, list[int]]], after: float, ok: Callable[[list[int]], bool]) -> float | None:
    return next((t for t, pids in rows if t > after and ok(pids)), None)


def _first_start(log_dir: str, pids: set[int], after: float) -> float | None:
    """Earliest start logged by one of ``pids`` after ``after`` (reads only their own logs)."""
    best: float | None = None
    for pid in pids:
        try:
            with open(os.path.join(log_dir, f"{pid}.starts")) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and float(parts[1]) > after and (best is None or float(parts[1]) < best):
                        best = float(parts[1])
        except FileNotFoundError:
            pass
    return best


def _stop_proc(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def partition(p: Params) -> Report:
    """Cut worker host 1's link for 5 s, restore it, later cut it for 30 s (short: 2 s and 4 s with FAST
    heartbeats) while the job runs on 2 hosts × 2 processes."""
    reason = available()
    if reason:
        raise RuntimeError(f"partition cannot run here: {reason}")
    plan = Plan.of(p)
    hb = plan.hb
    downs = " s, later ".join(f"{s:g}" for s in plan.outages)
    injected = (f"worker host 1's link (veth, broker side) down {downs} s mid-job, up again after each; tasks of "
                f"{plan.seconds * 1000:g} ms submitted until the schedule ends (cap {plan.cap:,}) on 2 hosts "
                f"(netns) × 2 processes; heartbeat {hb['heartbeat_interval']:g} s × {hb['liveness']:g}")
    report = Report("partition", injected,
                    recovery={"detect s": [], "requeue s": [], "rejoin s": [], "working again s": []},
                    bounds={"detect s": plan.bound, "requeue s": plan.bound})
    t0 = time.monotonic()
    hosts = Hosts()
    try:
        hosts.create()
        with Cluster(SERVICES, broker=hb, frontend=f"tcp://0.0.0.0:{FRONTEND_PORT}",
                          backend=f"tcp://0.0.0.0:{BACKEND_PORT}", security={"insecure": True}) as c:
            _run(c, hosts, plan, report)
            report.seconds = time.monotonic() - t0
    finally:
        left = hosts.delete()
        report.checks["every namespace and veth deleted"] = not left
        if left:
            report.notes.append(f"could not delete: {', '.join(left)}")
    return report


def _run(c: Cluster, hosts: Hosts, plan: Plan, report: Report) -> None:
    c.start_broker(prefix=hosts.prefix(hosts.broker))
    workers = [c.start_worker(2, prefix=hosts.prefix(ns), overrides={"broker": hosts.backend(k)})
               for k, ns in enumerate(hosts.workers, 1)]
    spec: dict[str, Any] = {
            "frontend": f"tcp://127.0.0.1:{FRONTEND_PORT}", "slots": 4, "seconds": plan.seconds, "cap": plan.cap,
            "log_dir": c.log_dir, "poll": 0.05, "drain": 120.0, "max_seconds": plan.max_seconds,
            "stop": str(c.root / "stop"), "timeline": str(c.root / "timeline"), "out": str(c.root / "job.json")}
    (c.root / "job-spec.json").write_text(json.dumps(spec))
    code = f"from ndpipe.chaos.partition import run_job; run_job({str(c.root / 'job-spec.json')!r})"
    job: subprocess.Popen[bytes] | None = None
    cuts: list[Cut] = []
    try:
        with open(c.root / "job.log", "wb") as log:
            job = subprocess.Popen([*hosts.prefix(hosts.broker), sys.executable, "-c", code], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        _schedule(c, hosts, plan, workers[0], job, cuts)
        Path(spec["stop"]).touch()
        job.wait(spec["drain"] + 30)
    except (TimeoutError, subprocess.TimeoutExpired) as exc:
        report.notes.append(f"schedule aborted: {exc}")
    finally:
        _stop_proc(job)
    _score(c, plan, report, cuts, workers[0].pid, Path(spec["out"]), Path(spec["timeline"]))


def _schedule(c: Cluster, hosts: Hosts, plan: Plan, victim: subprocess.Popen[bytes],
              job: subprocess.Popen[bytes], cuts: list[Cut]) -> None:
    """Wait for the job to be under way, then cut and restore host 1's link once per outage."""
    def live(predicate: Callable[[], Any]) -> Callable[[], Any]:
        def check() -> Any:
            if job.poll() is not None:
                raise TimeoutError(f"the job process ended early (exit {job.returncode})")
            return predicate()
        return check

    wait_for(live(lambda: sum(len(r) for r in read_starts(c.log_dir).values()) >= plan.warm), 90,
             f"{plan.warm} task starts", 0.1)
    for seconds in plan.outages:
        cut = Cut(seconds, set(c.lane_pids(victim)))
        cuts.append(cut)
        _cut(c, hosts, plan, victim, cut, live)
        time.sleep(plan.gap)


def _cut(c: Cluster, hosts: Hosts, plan: Plan, victim: subprocess.Popen[bytes], cut: Cut,
         live: Callable[[Callable[[], Any]], Callable[[], Any]]) -> None:
    """One outage of host 1 while it works; then wait for it to rejoin and to start tasks again."""
    wait_for(live(lambda: _first_start(c.log_dir, cut.victims, time.monotonic() - 0.2)), 30,
             "worker host 1 running tasks", 0.05)
    try:
        hosts.set_link(1, up=False)
        cut.down = time.monotonic()  # when `ip` returned (it takes ms to start): the link is down by now
        time.sleep(cut.seconds)
    finally:
        hosts.set_link(1, up=True)
        cut.up = time.monotonic()
    timeline = c.root / "timeline"
    cut.rejoined = _wait_or_none(live(lambda: _first(_timeline(timeline), cut.up,
                                                     lambda ps: victim.pid in ps and len(ps) == 2)),
                                 plan.rejoin_timeout, 0.05)
    if cut.rejoined is not None:
        # Host 1's lanes as they are at each look: the ones that saw the rejoin may still be exiting
        # (the broker forgot them) and their replacements not yet spawned when the rejoin is seen.
        cut.working = _wait_or_none(live(lambda: _first_start(c.log_dir, cut.victims | set(c.lane_pids(victim)),
                                                              cut.up)), 30, 0.1)


def _wait_or_none(predicate: Callable[[], Any], timeout: float, every: float) -> float | None:
    try:
        value = wait_for(predicate, timeout, "", every)
    except TimeoutError as exc:
        if "ended early" in str(exc):
            raise
        return None
    return float(value)


def _score(c: Cluster, plan: Plan, report: Report, cuts: list[Cut], pid: int, out: Path,
           timeline_path: Path) -> None:
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    report.checks["job finished and reported"] = bool(result) and bool(result.get("complete"))
    for key in ("submitted", "ok", "lost", "duplicated", "unexpected", "wrong"):
        setattr(report, key, int(result.get(key, 0)))
    report.errors.update(result.get("errors", {}))
    report.notes += result.get("notes", [])
    first_at = {int(tid): float(t) for tid, t in result.get("first_at", [])}
    rows, starts = _timeline(timeline_path), read_starts(c.log_dir)
    detected, requeued, rejoined, working = [], [], [], []
    for k, cut in enumerate(cuts, 1):
        gone = _first(rows, cut.down, lambda ps: pid not in ps)
        if gone is not None and gone < cut.up:
            report.recovery["detect s"].append(gone - cut.down)
        detected.append(gone is not None and gone - cut.down <= plan.bound)
        held, delays = restarts_after(starts, cut.victims, cut.down, cut.up)
        report.recovery["requeue s"] += delays
        # a held task answered right after the cut had finished before it (its answer was on its way);
        # every other one must have started again on host 2 while the link was down
        waiting = {t for t in held if first_at.get(t, float("inf")) > cut.down + IN_TRANSIT}
        moved = {t for t in waiting if any(t_id == t and cut.down < at < cut.up for p_, runs in starts.items()
                                           if p_ not in cut.victims for t_id, at in runs)}
        requeued.append(bool(held) and moved == waiting)
        report.notes.append(f"cut {k} ({cut.seconds:g} s): {len(held)} tasks last started on host 1 before it, "
                            f"{len(waiting)} of them unanswered {IN_TRANSIT:g} s after it, {len(moved)} of those "
                            "restarted on host 2 before link-up")
        if cut.rejoined is not None:
            report.recovery["rejoin s"].append(cut.rejoined - cut.up)
        if cut.working is not None:
            report.recovery["working again s"].append(cut.working - cut.up)
        rejoined.append(cut.rejoined is not None)
        working.append(cut.working is not None)
    n = len(plan.outages)
    report.checks[f"{n} cuts made"] = len(cuts) == n
    report.checks[f"host 1 declared gone within L × I + 0.5 s (+ CI slack) = {plan.bound:g} s of each cut"] = (
        len(detected) == n and all(detected))
    report.checks["tasks host 1 held restarted on host 2 before link-up"] = len(requeued) == n and all(requeued)
    report.checks["host 1 rejoined (STATUS lists 2 workers) after each link-up"] = len(rejoined) == n and all(rejoined)
    report.checks["host 1 takes work again after each rejoin"] = len(working) == n and all(working)
    report.logs = c.logs(1500)


SCENARIOS: dict[str, Callable[[Params], Report]] = {"partition": partition}


def _main(argv: Sequence[str]) -> int:
    """``python -m ndpipe.chaos.partition [--short]``: run the scenario and print the table."""
    report = partition(Params(short="--short" in argv))
    print(report.table())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
