"""The broker's Prometheus metrics (``broker.metrics``): a snapshot of its state, taken by the loop at
each heartbeat, exposed by :mod:`ndpipe.metrics` (whose docstring says why a snapshot).

Per task the loop only bumps :mod:`ndpipe.broker.tally` fields; :meth:`BrokerMetrics.refresh` copies
the tallies and counts queues, in-flight tasks and lanes (O(services + lanes + tasks in flight), as a
STATUS reply does) into a :class:`BrokerSnapshot`, which the scrape thread turns into families.

A pipeline counts as submitted under its first stage's service and as completed or failed under the
stage where it ended; its latency is the whole pipeline's, submit to final result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ndpipe.broker.state import BrokerState
from ndpipe.broker.tally import LATENCY_BOUNDS, TallyRow
from ndpipe.metrics import MetricsServer, SnapshotCollector, histogram

if TYPE_CHECKING:
    from ndpipe.broker.server import Broker

# The broker's other counters (STATUS "counters"), each exposed as ndpipe_broker_<name>_total.
COUNTERS = {
    "duplicates": "SUBMITs of a task id already held (a master resending): ignored",
    "rejected": "SUBMITs refused (QUEUE_FULL or BAD_REQUEST)",
    "cancelled": "tasks cancelled by their master",
    "dropped": "answers from a lane that no longer holds the task (late, or presumed dead)",
    "staged": "pipeline stages passed on to the next stage",
    "parts": "stream parts forwarded to masters",
    "fetched_bytes": "bytes of array refs fetched from masters for workers",
    "iter_rounds": "iteration rounds routed",
    "iter_routed_bytes": "bytes of messages routed between iteration partitions",
    "iter_placed": "iteration partitions placed on lanes",
    "iter_lost": "iteration epochs lost with a lane",
    "handshakes_refused": "CurveZMQ handshakes refused (security.curve)",
    "messages_refused": "messages refused for their key (security.curve)",
}
_SERVICE_COUNTERS = (("submitted", "tasks submitted by masters"),
                     ("completed", "tasks whose result went to their master"),
                     ("requeued", "tasks queued again after their lane or worker was lost"),
                     ("timed_out", "tasks that ended with TIMEOUT (also counted as failed)"))


@dataclass(frozen=True, slots=True)
class BrokerSnapshot:
    """Plain data, never mutated once published."""

    tallies: dict[str, TallyRow]
    queued: dict[str, int]
    inflight: dict[str, int]
    service_lanes: dict[str, int]
    lanes: int
    workers: int
    masters: int
    tasks: int
    bytes_held: int
    counters: dict[str, int]


def take(state: BrokerState, counters: dict[str, int]) -> BrokerSnapshot:
    """Copy what the metrics show out of the state (in the loop's thread). Every service the broker
    knows (queued for, or served) gets a row in each gauge, zeros included."""
    names = {*state.queues, *state.by_service}
    inflight = dict.fromkeys(names, 0)
    for lane in state.lanes.values():
        for tid in lane.inflight:
            task = state.tasks.get(tid)
            if task is not None:
                inflight[task.service] = inflight.get(task.service, 0) + 1
    return BrokerSnapshot(
        tallies=state.tallies.rows(),
        queued={name: len(state.queues.get(name) or ()) for name in names},
        inflight=inflight,
        service_lanes={name: len(state.by_service.get(name) or ()) for name in names},
        lanes=len(state.lanes), workers=len(state.hosts), masters=len(state.masters), tasks=len(state.tasks),
        bytes_held=state.budget.held, counters=counters,
    )


def families(snap: BrokerSnapshot) -> Iterator[Metric]:
    """The metric families of one snapshot (in the scrape thread)."""
    rows = sorted(snap.tallies.items())
    for field, doc in _SERVICE_COUNTERS:
        family = CounterMetricFamily(f"ndpipe_tasks_{field}", f"Broker: {doc}, by service", labels=["service"])
        for name, row in rows:
            family.add_metric([name], getattr(row, field))
        yield family
    failed = CounterMetricFamily("ndpipe_tasks_failed", "Broker: tasks that ended with an error sent to their "
                                 "master, by service and error code", labels=["service", "code"])
    for name, row in rows:
        for code, count in row.failed:
            failed.add_metric([name, code], count)
    yield failed
    yield histogram("ndpipe_task_latency_seconds", "Broker: completed tasks, submit to result",
                    "service", LATENCY_BOUNDS, ((name, row.latency, row.latency_sum) for name, row in rows))
    for field, doc in (("received", "payload bytes received (SUBMITs from masters, results from workers)"),
                       ("sent", "payload bytes sent (TASKs to workers, results to masters)")):
        family = CounterMetricFamily(f"ndpipe_payload_bytes_{field}", f"Broker: {doc}, by service and peer",
                                     labels=["service", "peer"])
        for name, row in rows:
            masters, workers = ((row.bytes_from_masters, row.bytes_from_workers) if field == "received"
                                else (row.bytes_to_masters, row.bytes_to_workers))
            family.add_metric([name, "master"], masters)
            family.add_metric([name, "worker"], workers)
        yield family
    yield from _gauges(snap)
    for key, doc in COUNTERS.items():
        if key in snap.counters:
            yield CounterMetricFamily(f"ndpipe_broker_{key}", f"Broker: {doc}", value=snap.counters[key])


def _gauges(snap: BrokerSnapshot) -> Iterator[Metric]:
    for name, doc, table in (("ndpipe_queue_depth", "tasks queued", snap.queued),
                             ("ndpipe_tasks_in_flight", "tasks dispatched to a lane, not yet answered", snap.inflight),
                             ("ndpipe_service_lanes", "live lanes that serve the service", snap.service_lanes)):
        family = GaugeMetricFamily(name, f"Broker: {doc}, by service", labels=["service"])
        for service in sorted(table):
            family.add_metric([service], table[service])
        yield family
    for name, doc, value in (("ndpipe_lanes_alive", "lanes (compute processes) registered", snap.lanes),
                             ("ndpipe_workers_alive", "worker daemons registered", snap.workers),
                             ("ndpipe_masters_connected", "masters heard from within liveness", snap.masters),
                             ("ndpipe_tasks_held", "tasks held, queued or in flight", snap.tasks),
                             ("ndpipe_payload_bytes_held", "payload bytes held (the byte budget)", snap.bytes_held)):
        yield GaugeMetricFamily(name, f"Broker: {doc}", value=value)


class BrokerMetrics:
    """The listener and its collector; the loop calls :meth:`refresh` at each heartbeat."""

    def __init__(self, listen: str) -> None:
        self.collector: SnapshotCollector[BrokerSnapshot] = SnapshotCollector(families)
        self.server = MetricsServer("broker.metrics", listen, self.collector)

    def refresh(self, broker: Broker) -> None:
        """Publish a new snapshot of the broker's state and counters (its iterations', its guard's)."""
        counters = {**broker.state.counters, **{f"iter_{k}": v for k, v in broker.runs.counters.items()}}
        if broker.guard is not None:
            counters.update(broker.guard.counters)
        self.collector.publish(take(broker.state, counters))

    def close(self) -> None:
        self.server.close()
