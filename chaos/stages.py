"""Scenarios for the stateful features (issue 10): lanes killed under stage pipelines and under
streams, and arrays sent once under cache pressure. Same checker as the others: nothing lost, duplicated, unexpected
or wrong, errors exactly as expected, every planned task submitted, recovery within its bound."""

from __future__ import annotations

import itertools
import os
import queue
import random
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ndpipe.chaos.checker import History, Report, read_stage_starts, restarts_after
from ndpipe.chaos.handlers import SERVICES, checksum
from ndpipe.chaos.scenarios import SIZE, Params, finish, slack, track_in_background
from ndpipe.cluster import Cluster
from ndpipe.errors import TaskError
from ndpipe.master import Master

STAGES = ["first", "relay1", "relay2"]


def pipelines_in_background(m: Master, hist: History, tids: Iterable[int], seconds: float,
                            log_dir: str) -> threading.Thread:
    """Submit ``work(tid) → relay1 → relay2`` for every id from a thread (``pipeline`` blocks on a
    full window); each answer must be work's value, carried through both relays."""
    return track_in_background(hist, tids, lambda tid: m.pipeline(STAGES, [tid, SIZE, seconds, log_dir]))


def pipeline_killed(p: Params) -> Report:
    """kill -9 a random lane every 0.5–1 s while 3-stage pipelines run on 2 daemons × 2 lanes."""
    tasks, kills = p.n(4_000, 600), (4 if p.short else 20)
    gap = (0.2, 0.4) if p.short else (0.5, 1.0)
    seconds = max(0.001, kills * statistics.mean(gap) * 4 / (3 * tasks) * 1.3)  # per stage; outlasts the kills
    report = Report("pipeline_killed", f"kill -9 of a random lane every {gap[0]}–{gap[1]} s, {kills} kills; "
                    f"{tasks:,} pipelines of 3 stages × {seconds * 1000:.1f} ms (work → relay1 → relay2, the "
                    "relays resident) on 2 daemons × 2 lanes", recovery={"stage rerun s": []},
                    bounds={"stage rerun s": 1.0 + slack(p)}, planned=tasks)
    root = tempfile.mkdtemp(prefix="ndpc-")  # the relays' init names the log dir inside it
    services: dict[str, Any] = {**SERVICES, "first": "ndpipe.chaos.handlers:work_from"}
    for stage in STAGES[1:]:
        services[stage] = {"handler": "ndpipe.chaos.handlers:Relay",
                           "init": {"log_dir": f"{root}/starts", "seconds": seconds, "stage": stage}}
    try:
        _pipelines_under_kills(Cluster(services, broker={"max_attempts": 10}, root=root), p, report, tasks,
                               kills, gap, seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _pipelines_under_kills(cluster: Cluster, p: Params, report: Report, tasks: int, kills: int,
                           gap: tuple[float, float], seconds: float) -> None:
    rng = random.Random(p.seed)
    with cluster as c:
        c.start_broker()
        workers = [c.start_worker(2), c.start_worker(2)]
        with c.master() as m:
            c.wait_slots(m, 4, service="relay1")
            hist, t0 = History(), time.monotonic()
            submitter = pipelines_in_background(m, hist, range(tasks), seconds, c.log_dir)
            victims = _kill_lanes(c, workers, rng, kills, gap, t0 + 30 + 3 * kills)
            submitter.join(p.wait(120))
            finish(c, hist, report, p.wait(300), t0)
            starts = read_stage_starts(c.log_dir)  # a stage's rerun, not the next stage's first run
            for pid, t_kill in victims:
                report.recovery["stage rerun s"] += restarts_after(starts, {pid}, t_kill)[1]
            waits = sorted(hand_offs(starts, seconds))
            p99 = waits[int(0.99 * (len(waits) - 1))] if waits else 0.0
            report.checks[f"stage hand-offs wait for a lane, not for the new pipelines (p99 {p99 * 1000:.1f} ms "
                          f"≤ {100 + 1000 * slack(p):.0f} ms)"] = p99 <= 0.1 + slack(p)
            report.notes.append(f"stage hand-off (a stage's start after the previous one's, less its run time): "
                                f"p50 {waits[len(waits) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
                                f"{waits[-1] * 1000:.0f} ms over {len(waits):,}" if waits else "no hand-off logged")
            report.checks[f"{kills} kills made"] = len(victims) >= kills
            counters = m.status()["counters"]
            report.checks["every pipeline passed both relays at the broker"] = counters["staged"] >= 2 * tasks
            report.notes.append(f"broker counters: staged {counters['staged']:,}, completed "
                                f"{counters['completed']:,}, requeued {counters['requeued']:,}")


def hand_offs(starts: dict[int, list[tuple[tuple[int, str], float]]], seconds: float) -> list[float]:
    """For each pipeline and stage after the first: from the previous stage's last start (plus its run
    time) to this stage's first start — the time a finished stage's result waited in the broker."""
    first: dict[tuple[int, str], float] = {}
    last: dict[tuple[int, str], float] = {}
    for runs in starts.values():
        for key, t in runs:
            first[key] = min(first.get(key, t), t)
            last[key] = max(last.get(key, t), t)
    labels = ["", *STAGES[1:]]  # the first stage logs as a plain task
    return [max(0.0, first[(tid, b)] - last[(tid, a)] - seconds)
            for (tid, stage) in first if stage == ""
            for a, b in itertools.pairwise(labels) if (tid, a) in last and (tid, b) in first]


def cache_pressure(p: Params) -> Report:
    """Tasks over many arrays sent once, together 3× worker.cache_bytes: evictions, refetches, and
    every answer still computed from the right array."""
    arrays, mib = 12, 4
    tasks = p.n(3_000, 400)
    cache = arrays * mib // 3 << 20
    report = Report("cache_pressure", f"{tasks:,} tasks, each on one of {arrays} arrays of {mib} MiB sent once "
                    f"(Master.put) at random, worker.cache_bytes = {cache >> 20} MiB per host; 2 daemons × 2 "
                    "lanes", planned=tasks)
    rng = random.Random(p.seed)
    data = [np.random.default_rng(j).standard_normal(mib << 17) for j in range(arrays)]  # mib MiB of float64
    truth = [checksum(x) for x in data]
    pick = [rng.randrange(arrays) for _ in range(tasks)]
    services = {**SERVICES, "ref_work": "ndpipe.chaos.handlers:ref_work"}
    with Cluster(services, worker={"cache_bytes": cache}) as c:
        c.start_broker()
        c.start_worker(2)
        c.start_worker(2)
        with c.master() as m:
            c.wait_slots(m, 4, service="ref_work")
            refs = [m.put(x) for x in data]
            hist, t0 = History(expect=lambda tid, size: truth[pick[tid]]), time.monotonic()
            for tid in range(tasks):
                hist.track(tid, SIZE, m.call("ref_work", (tid, refs[pick[tid]], c.log_dir)))
            finish(c, hist, report, p.wait(300), t0)
            fetched = m.status()["counters"]["fetched_bytes"]
            distinct = len(set(pick)) * (mib << 20)
            report.checks["arrays were evicted and fetched again (fetched > distinct bytes × 2 hosts)"] = \
                fetched > 2 * distinct
            report.notes.append(f"fetched through the broker: {fetched / 2**20:,.0f} MiB for {tasks:,} tasks "
                                f"({distinct / 2**20:,.0f} MiB distinct; without put: {tasks * mib:,} MiB)")
    return report


def stream_killed(p: Params) -> Report:
    """kill -9 a random lane every 0.5–1 s while 4 consumers read streams of 20 parts each."""
    rng = random.Random(p.seed)
    streams, parts, kills = p.n(600, 120), 20, (4 if p.short else 20)
    gap = (0.2, 0.4) if p.short else (0.5, 1.0)
    seconds = max(0.0005, kills * statistics.mean(gap) * 1.3 * 4 / (streams * parts))
    report = Report("stream_killed", f"kill -9 of a random lane every {gap[0]}–{gap[1]} s, {kills} kills; "
                    f"{streams:,} streams of {parts} parts × {seconds * 1000:.1f} ms read by 4 consumers on 2 "
                    "daemons × 2 lanes", expected_errors={"STREAM_BROKEN": None}, planned=streams)
    report.notes.append("a stream whose lane dies after some parts ends with STREAM_BROKEN (any number "
                        "allowed); what must hold: each stream's parts came in order, each once, none missing, "
                        "and the error says how many came")
    outcomes: dict[int, tuple[list[int], str, int]] = {}  # stream -> (parts seen, outcome, parts claimed)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for k in range(streams):
        todo.put(k)
    with Cluster(SERVICES | {"counter": "ndpipe.chaos.handlers:counter"}, broker={"max_attempts": 10}) as c:
        c.start_broker()
        workers = [c.start_worker(2), c.start_worker(2)]
        with c.master() as m:
            c.wait_slots(m, 4, service="counter")
            t0 = time.monotonic()
            consumers = [threading.Thread(target=_consume, args=(m, todo, outcomes, parts, seconds), daemon=True)
                         for _ in range(4)]
            for thread in consumers:
                thread.start()
            made = len(_kill_lanes(c, workers, rng, kills, gap, t0 + 30 + 3 * kills))
            for thread in consumers:
                thread.join(p.wait(300))
    report.seconds = time.monotonic() - t0
    report.submitted = len(outcomes)
    for k in range(streams):
        seen, outcome, claimed = outcomes.get(k, ([], "lost", 0))
        if outcome == "lost":
            report.lost += 1
        elif len(set(seen)) != len(seen):
            report.duplicated += 1
        elif seen != list(range(len(seen))) or (outcome == "ok" and len(seen) != parts) or \
                (outcome != "ok" and claimed != len(seen)):
            report.wrong += 1
        elif outcome == "ok":
            report.ok += 1
        else:
            report.errors[outcome] += 1
    report.checks[f"{kills} kills made"] = made >= kills
    return report


def _consume(m: Master, todo: queue.SimpleQueue[int], outcomes: dict[int, tuple[list[int], str, int]],
             parts: int, seconds: float) -> None:
    while True:
        try:
            k = todo.get_nowait()
        except queue.Empty:
            return
        seen: list[int] = []
        try:
            stream = m.stream("counter", parts, seconds=seconds)
            for part in stream:
                seen.append(part[0])
            outcomes[k] = (seen, "ok", stream.future.result(10))
        except TaskError as exc:
            outcomes[k] = (seen, exc.code, int(exc.details.get("parts", -1)))
        except Exception as exc:
            outcomes[k] = (seen, type(exc).__name__, -1)


def _kill_lanes(c: Cluster, workers: list[Any], rng: random.Random, kills: int, gap: tuple[float, float],
                deadline: float) -> list[tuple[int, float]]:
    """kill -9 a random lane every ``gap`` seconds, ``kills`` times (bounded by ``deadline``): the
    (pid, time) of each kill."""
    victims: list[tuple[int, float]] = []
    while len(victims) < kills and time.monotonic() < deadline:
        time.sleep(rng.uniform(*gap))
        pids = sorted(pid for w in workers for pid in c.lane_pids(w))
        if not pids:
            continue
        pid, t_kill = rng.choice(pids), time.monotonic()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        victims.append((pid, t_kill))
    return victims


SCENARIOS: dict[str, Callable[[Params], Report]] = {
    "pipeline_killed": pipeline_killed,
    "cache_pressure": cache_pressure,
    "stream_killed": stream_killed,
}
