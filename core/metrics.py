"""Prometheus endpoints (``broker.metrics``, ``worker.metrics``): the HTTP listener, and a collector
that reads an immutable snapshot.

Why no collector reads a daemon's live state: prometheus_client serves ``/metrics`` from its own
thread, while the broker's and the worker daemon's state (dicts, sets, lists) is mutated by their
one poll loop; iterating it from the scrape thread could raise "dictionary changed size during
iteration" or read half an update. So the loop itself builds a snapshot of plain data that is never
mutated afterwards (copied dicts, tuples, frozen dataclasses), once per heartbeat in the broker and
at most once a second in the worker, and publishes it with a single attribute assignment, which is
atomic under the GIL. :class:`SnapshotCollector` turns the latest snapshot into metric families at
scrape time, in the scrape thread. A scrape is at most one refresh old; the loop pays nothing per
message beyond the O(1) tallies of :mod:`ndpipe.broker.tally`, and the copy once per refresh
(O(services + lanes + tasks in flight), like a STATUS reply).

Each process has its own :class:`CollectorRegistry`, never prometheus_client's global one, so tests
can run several in one process; prometheus_client's process collector joins it (``process_*``: the
daemon's own CPU seconds, RSS, open fds).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric

from ndpipe.errors import AddressInUse, ConfigError

log = logging.getLogger("ndpipe.metrics")
S = TypeVar("S")


def split_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (validated by ndpipe.config) -> (host, port); an IPv6 host loses its brackets."""
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class SnapshotCollector(Generic[S]):
    """Yields the families ``build`` makes of the snapshot last :meth:`publish`\\ ed (nothing before)."""

    def __init__(self, build: Callable[[S], Iterable[Metric]]) -> None:
        self._build = build
        self._snap: S | None = None

    def publish(self, snap: S) -> None:
        """Called by the loop: one reference store, so a scrape sees the old snapshot or the new one."""
        self._snap = snap

    @property
    def snapshot(self) -> S | None:
        return self._snap

    def collect(self) -> Iterator[Metric]:
        snap = self._snap  # read once: the loop may publish another while we build
        if snap is not None:
            yield from self._build(snap)

    def describe(self) -> list[Metric]:
        """Nothing to declare up front (the registry would otherwise call collect() at register)."""
        return []


class MetricsServer:
    """prometheus_client's HTTP server on ``listen`` for one collector, in a daemon thread, until
    :meth:`close`. Binding happens in the constructor (before the daemon says it is ready); a
    failure is a ConfigError naming ``key`` (AddressInUse, exit 75, for a port in use)."""

    def __init__(self, key: str, listen: str, collector: SnapshotCollector[S]) -> None:
        self.key = key
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        host, port = split_listen(listen)
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # EADDRINUSE, EADDRNOTAVAIL, a name that does not resolve (gaierror)
            busy = exc.errno == errno.EADDRINUSE
            hint = " (another process on that port? every daemon needs its own)" if busy else ""
            kind = AddressInUse if busy else ConfigError  # in use: exit 75, which the units retry
            raise kind(f"{key}: cannot listen on {listen}: {exc.strerror or exc}{hint}") from exc
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics (%s)", host, self.port, key)

    def close(self) -> None:
        """Stop serving and release the port (a scrape under way finishes in its own thread)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def histogram(name: str, doc: str, label: str, bounds: Sequence[float],
              rows: Iterable[tuple[str, Sequence[int], float]]) -> HistogramMetricFamily:
    """A histogram family from per-bucket (not cumulative) counts, one row per ``label`` value:
    (value, counts with one more entry than ``bounds`` for +Inf, sum)."""
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, counts, total in rows:
        cumulative, buckets = 0, []
        for le, count in zip((*map(repr, bounds), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        family.add_metric([value], buckets, total)
    return family
