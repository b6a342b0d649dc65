"""Scenarios for iterations (issue 11, ``Master.iterate``): lanes killed mid-run, a worker frozen
mid-run, a master killed mid-run. What must hold: the run ends with states **bit-identical** to the
same rounds in one process (a deterministic step), and a dead master's partitions are freed.

The checker's counts are per partition: ``ok`` a final state equal to the reference bit for bit,
``wrong`` one that differs, ``lost`` every partition of a run that failed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ndpipe.chaos.checker import Report
from ndpipe.chaos.scenarios import Params, slack
from ndpipe.cluster import Cluster, wait_for
from ndpipe.errors import TaskError
from ndpipe.examples.exchange import ring_local, ring_states

HB = {"heartbeat_interval": 0.5, "liveness": 4}
SERVICES = {"slow_ring": "ndpipe.chaos.handlers:slow_ring_step", "ring": "ndpipe.examples.exchange:ring_step"}


def _states(parts: int, delay: float) -> list[dict[str, Any]]:
    return [{**s, "delay": delay} for s in ring_states(parts, size=64, seed=11)]


def _judge(report: Report, got: list[dict[str, Any]] | None, want: list[dict[str, Any]]) -> None:
    report.submitted = len(want)
    if got is None:
        report.lost = len(want)
        return
    for a, b in zip(got, want, strict=True):
        if a["x"].dtype == b["x"].dtype and a["x"].tobytes() == b["x"].tobytes():
            report.ok += 1
        else:
            report.wrong += 1


def _run_under(p: Params, name: str, injected: str, fault: Callable[[Cluster, list[Any], Any], None],
               recovery: str, bound: float, rounds: int, parts: int, delay: float, at: set[int],
               after: Callable[[Cluster, list[Any]], None] | None = None, hb: dict[str, float] = HB) -> Report:
    """Run ``rounds`` rounds of the slow ring, calling ``fault`` when the rounds in ``at`` are reported.
    Recovery per fault: until the run reports a round past the fault's (after a rollback) — the
    time the fault cost the run."""
    report = Report(name, injected, recovery={recovery: []}, bounds={recovery: bound + slack(p)}, planned=parts)
    want = ring_local(_states(parts, delay), rounds, -1.0)
    with Cluster(SERVICES, broker=hb) as c:
        c.start_broker()
        workers = [c.start_worker(2), c.start_worker(2)]
        with c.master() as m:
            c.wait_slots(m, 4, service="slow_ring")
            t0 = time.monotonic()
            run = m.iterate("slow_ring", _states(parts, delay), max_rounds=rounds, tol=-1.0, checkpoint=5,
                            max_recoveries=20)
            faults: list[tuple[float, int, int]] = []  # (when, the last round reported, rollbacks so far)
            resumed: list[float] = []
            last = -1
            try:
                for info in run:
                    last = info.round
                    while len(resumed) < len(faults) and info.recoveries > faults[len(resumed)][2]:
                        resumed.append(time.monotonic() - faults[len(resumed)][0])  # rolled back, and past it
                    if info.round in at and len(faults) < len(at):
                        faults.append((time.monotonic(), last, run.recoveries))
                        fault(c, workers, m)
                got: list[dict[str, Any]] | None = run.result(p.wait(300))
            except TaskError as exc:
                got = None
                report.errors[type(exc).__name__] += 1
            report.seconds = time.monotonic() - t0
            report.recovery[recovery] = resumed
            report.checks[f"{len(at)} faults injected"] = len(faults) == len(at)
            report.checks["the run rolled back once per fault"] = run.recoveries >= len(faults) > 0
            report.notes.append(f"{rounds} rounds of {parts} partitions (64 floats, {delay * 1000:.0f} ms per step), "
                                f"checkpoint every 5 rounds; {run.recoveries} rollbacks; last round {last}")
        if after is not None:
            after(c, workers)
    _judge(report, got, want)
    return report


def _fault_rounds(p: Params, rounds: int, picks: int, spacing: int) -> set[int]:
    """``picks`` rounds at random, at least ``spacing`` apart, none in the first or last 8."""
    rng = random.Random(p.seed)
    return set(rng.sample(range(8, rounds - 8, spacing), picks))


def iterate_lane_killed(p: Params) -> Report:
    """kill -9 of a lane holding partitions, several times mid-run."""
    rng = random.Random(p.seed)
    rounds = 60 if p.short else 150

    def kill(c: Cluster, workers: list[Any], m: Any) -> None:
        """kill -9 a random lane among those holding partitions of the run."""
        status = m.status()
        holding = set(status["iterations"][0]["lanes"])
        pids = sorted(lane["pid"] for w in status["workers"] for lane in w["lanes"] if lane["address"] in holding)
        if pids:
            c_kill(rng.choice(pids))

    faults = 2 if p.short else 5
    return _run_under(p, "iterate_lane_killed", f"kill -9 of a random lane holding partitions at {faults} random "
                      f"rounds of a {rounds}-round run, 8 partitions on 2 daemons × 2 lanes", kill,
                      "rolled back and past the fault s", 3.0, rounds, 8, 0.005, _fault_rounds(p, rounds, faults, 7))


def iterate_worker_frozen(p: Params) -> Report:
    """SIGSTOP of a worker daemon mid-run (its lanes run on); SIGCONT at the next fault."""

    frozen: list[Any] = []

    def freeze(c: Cluster, workers: list[Any], m: Any) -> None:
        """Freeze the daemon of the worker holding most of the run's partitions (thawing the one frozen
        before). Its lanes run on, but the broker declares the worker dead and its lanes with it."""
        for w in frozen:
            os.kill(w.pid, signal.SIGCONT)
        held = {w.pid: 0 for w in workers}
        for address, parts in m.status()["iterations"][0]["lanes"].items():
            pid = int(address.split("/")[0].rsplit(":", 1)[1])
            held[pid] = held.get(pid, 0) + len(parts)
        victim = max(workers, key=lambda w: held.get(w.pid, 0))
        frozen[:] = [victim]
        os.kill(victim.pid, signal.SIGSTOP)

    def thaw(c: Cluster, workers: list[Any]) -> None:
        for w in frozen:
            os.kill(w.pid, signal.SIGCONT)

    hb = {"heartbeat_interval": 0.25, "liveness": 4} if p.short else HB  # CI: a shorter liveness, same story
    bound = hb["heartbeat_interval"] * hb["liveness"] + 1.5  # declared dead, then the replay
    faults = 2 if p.short else 3
    spacing = int(hb["heartbeat_interval"] * hb["liveness"] / 0.04 * 1.4)  # rounds of ~40 ms outlasting liveness
    rounds = spacing * faults + 30
    return _run_under(p, "iterate_worker_frozen", f"SIGSTOP of the worker daemon holding most partitions at {faults} "
                      f"random rounds of a {rounds}-round run (its lanes run on), thawed at the next fault and at the "
                      "end; 8 partitions on 2 daemons × 2 lanes", freeze, "rolled back and past the fault s", bound,
                      rounds, 8, 0.02, _fault_rounds(p, rounds, faults, spacing), after=thaw, hb=hb)


MASTER = """
import sys
from ndpipe.config import MasterConfig
from ndpipe.master import Master
from ndpipe.examples.exchange import ring_states
m = Master(sys.argv[1], config=MasterConfig(heartbeat_interval=0.5, liveness=4))
for info in m.iterate("slow_ring", [{**s, "delay": 0.01} for s in ring_states(8)], max_rounds=10**6, tol=-1.0):
    print(info.round, flush=True)
"""


def iterate_master_killed(p: Params) -> Report:
    """kill -9 of a master mid-run: the broker forgets its run and the lanes drop the partitions."""
    report = Report("iterate_master_killed", "kill -9 of a master 20 rounds into an endless run of 8 partitions "
                    "on 2 daemons × 2 lanes", recovery={"freed after s": []},
                    bounds={"freed after s": HB["heartbeat_interval"] * HB["liveness"] + 1.0 + slack(p)})
    with Cluster(SERVICES, broker=HB) as c, tempfile.TemporaryDirectory(prefix="ndpc-") as tmp:
        c.start_broker()
        c.start_worker(2)
        c.start_worker(2)
        script = Path(tmp) / "master.py"
        script.write_text(MASTER)
        with c.master() as watcher:
            c.wait_slots(watcher, 4, service="slow_ring")
            with subprocess.Popen([sys.executable, str(script), c.frontend], stdout=subprocess.PIPE, text=True) as proc:
                assert proc.stdout is not None
                try:
                    for line in proc.stdout:
                        if int(line) >= 20:
                            break
                    report.checks["the run was placed"] = len(watcher.status()["iterations"]) == 1
                    t_kill = time.monotonic()
                    proc.kill()
                finally:
                    proc.kill()
            wait_for(lambda: watcher.status()["iterations"] == [], 30, "the dead master's run freed", 0.05)
            report.recovery["freed after s"].append(time.monotonic() - t_kill)
            report.seconds = time.monotonic() - t_kill
            report.checks["the lanes serve a new run"] = len(watcher.iterate("ring", ring_states(4), max_rounds=5)
                                                             .result(60)) == 4
    return report


def c_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


SCENARIOS: dict[str, Callable[[Params], Report]] = {
    "iterate_lane_killed": iterate_lane_killed,
    "iterate_worker_frozen": iterate_worker_frozen,
    "iterate_master_killed": iterate_master_killed,
}
