"""The worker daemon's Prometheus metrics (``worker.metrics``): its lanes, their deaths, its link.

The daemon never sees a task's payload or its service (lanes talk to the broker directly), so it
counts what it supervises: lanes alive and ready, lane deaths by cause and restarts, tasks answered
per lane (the lane's shared slot counts them; a replaced lane's count is kept in the total), the
failures it reports for its lanes (CRASHED, TIMEOUT; a handler's own errors go from the lane to the
broker and are counted there, by service), each lane's RSS and CPU seconds, whether it is
registered, and the bytes its host cache holds.

As in the broker (see :mod:`ndpipe.metrics`), the loop publishes an immutable snapshot, here at most
once per :data:`REFRESH` seconds; psutil reads (``cpu_times``, ``memory_info``: stateless, so the
heartbeat's ``cpu_percent`` is not disturbed) happen then, in the loop, not at scrape time.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ndpipe import protocol as P
from ndpipe.metrics import MetricsServer, SnapshotCollector
from ndpipe.worker.lane import RUNNING, read_slot

if TYPE_CHECKING:
    from ndpipe.worker.daemon import WorkerDaemon

REFRESH = 1.0  # seconds between snapshots


def death_cause(code: int | None, killed: str) -> str:
    """Why a lane process ended, as a bounded label: timeout, cancel (the daemon killed it), out_of_memory,
    sigkill (kill -9 or the kernel's OOM killer), signal, exit_ok (it left, e.g. draining) or exit_error."""
    if killed in ("timeout", "cancel"):
        return killed
    if code == P.EXIT_OUT_OF_MEMORY:
        return "out_of_memory"
    if code == -signal.SIGKILL:
        return "sigkill"
    if code == -signal.SIGALRM:
        return "timeout"
    if code is not None and code < 0:
        return "signal"
    return "exit_ok" if code == 0 else "exit_error"


@dataclass(slots=True, eq=False)
class LaneTally:
    """What the daemon counts about its lanes, always (a few increments per lane death or report)."""

    deaths: dict[str, int] = field(default_factory=dict)  # cause -> lanes
    reported: dict[str, int] = field(default_factory=dict)  # error code -> reports sent for its lanes
    restarts: int = 0

    def ended(self, cause: str, respawn: bool) -> None:
        self.deaths[cause] = self.deaths.get(cause, 0) + 1
        self.restarts += respawn

    def report(self, code: str) -> None:
        self.reported[code] = self.reported.get(code, 0) + 1


@dataclass(frozen=True, slots=True)
class LaneRow:
    index: int
    pid: int
    ready: bool
    running: bool
    done: int
    rss: int
    cpu_seconds: float


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """Plain data, never mutated once published."""

    lanes: tuple[LaneRow, ...]
    configured: int
    registered: bool
    deaths: tuple[tuple[str, int], ...]
    reported: tuple[tuple[str, int], ...]
    restarts: int
    done_total: int
    cache_bytes: int
    cache_arrays: int
    cache_limit: int


class WorkerMetrics:
    """The listener and its collector; the daemon's loop calls :meth:`refresh` on every pass."""

    def __init__(self, listen: str) -> None:
        self.collector: SnapshotCollector[WorkerSnapshot] = SnapshotCollector(families)
        self.server = MetricsServer("worker.metrics", listen, self.collector)
        self._next = 0.0

    def refresh(self, daemon: WorkerDaemon, now: float, force: bool = False) -> None:
        """Publish a new snapshot if :data:`REFRESH` seconds passed since the last (or ``force``)."""
        if now < self._next and not force:
            return
        self._next = now + REFRESH
        rows = []
        for lane in sorted(daemon.lanes.values(), key=lambda each: each.index):
            pid = lane.proc.pid or 0
            view = read_slot(lane.slot)
            rss, cpu = _usage(daemon.usage.process(pid))
            rows.append(LaneRow(lane.index, pid, lane.ready, view.state == RUNNING, view.done, rss, cpu))
        t = daemon.tally
        self.collector.publish(WorkerSnapshot(
            lanes=tuple(rows), configured=daemon.nlanes, registered=daemon.key is not None,
            deaths=tuple(sorted(t.deaths.items())), reported=tuple(sorted(t.reported.items())), restarts=t.restarts,
            done_total=daemon.totals.done + sum(row.done for row in rows), cache_bytes=daemon.cache.used,
            cache_arrays=len(daemon.cache.entries), cache_limit=daemon.cache.limit,
        ))

    def close(self) -> None:
        self.server.close()


def _usage(proc: psutil.Process | None) -> tuple[int, float]:
    """(RSS bytes, user + system CPU seconds) of a lane; zeros once it is gone. Cumulative CPU time,
    not the heartbeat's cpu_percent: a counter for Prometheus (the two do not disturb each other)."""
    if proc is None:
        return 0, 0.0
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            return proc.memory_info().rss, times.user + times.system
    except psutil.Error:
        return 0, 0.0


def families(snap: WorkerSnapshot) -> Iterator[Metric]:
    """The metric families of one snapshot (in the scrape thread)."""
    for name, doc, value in (
        ("ndpipe_worker_lanes_alive", "lane (compute) processes running", len(snap.lanes)),
        ("ndpipe_worker_lanes_ready", "lanes whose handlers loaded (said HELLO)", sum(r.ready for r in snap.lanes)),
        ("ndpipe_worker_lanes_configured", "lanes this daemon keeps (worker.processes)", snap.configured),
        ("ndpipe_worker_registered", "1 while registered with the broker (WELCOME received), else 0",
         int(snap.registered)),
        ("ndpipe_worker_cache_bytes", "bytes of arrays sent once (Master.put) held for the lanes", snap.cache_bytes),
        ("ndpipe_worker_cache_arrays", "arrays held in the host cache", snap.cache_arrays),
        ("ndpipe_worker_cache_limit_bytes", "worker.cache_bytes", snap.cache_limit),
    ):
        yield GaugeMetricFamily(name, f"Worker: {doc}", value=value)
    deaths = CounterMetricFamily("ndpipe_worker_lane_deaths", "Worker: lane processes that ended, by cause",
                                 labels=["cause"])
    for cause, count in snap.deaths:
        deaths.add_metric([cause], count)
    yield deaths
    yield CounterMetricFamily("ndpipe_worker_lane_restarts", "Worker: lanes spawned to replace one that ended",
                              value=snap.restarts)
    reported = CounterMetricFamily("ndpipe_worker_failures_reported", "Worker: task failures the daemon reported "
                                   "for its lanes (CRASHED, TIMEOUT), by code", labels=["code"])
    for code, count in snap.reported:
        reported.add_metric([code], count)
    yield reported
    yield CounterMetricFamily("ndpipe_worker_tasks_answered", "Worker: tasks its lanes answered (results and "
                              "errors), replaced lanes included", value=snap.done_total)
    per_lane = (
        (CounterMetricFamily, "ndpipe_worker_lane_tasks_answered", "tasks answered since the lane process started",
         "done"),
        (GaugeMetricFamily, "ndpipe_worker_lane_rss_bytes", "resident memory of the lane process", "rss"),
        (CounterMetricFamily, "ndpipe_worker_lane_cpu_seconds", "user + system CPU seconds of the lane process",
         "cpu_seconds"),
        (GaugeMetricFamily, "ndpipe_worker_lane_running", "1 while the lane runs a task", "running"),
    )
    for kind, name, doc, attr in per_lane:
        family = kind(name, f"Worker: {doc}, by lane index", labels=["lane"])
        for row in snap.lanes:
            family.add_metric([str(row.index)], float(getattr(row, attr)))
        yield family
