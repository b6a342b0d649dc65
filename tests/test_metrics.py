"""Prometheus metrics (broker.metrics, worker.metrics): the config keys, the tallies and snapshots
without sockets, and a real broker and worker scraped over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ndpipe import protocol as P
from ndpipe.broker.metrics import BrokerSnapshot, families, take
from ndpipe.broker.server import Broker
from ndpipe.broker.state import BrokerState
from ndpipe.broker.tally import LATENCY_BOUNDS, OTHER, Tallies, Tally
from ndpipe.config import BrokerConfig, WorkerConfig, load_config
from ndpipe.errors import AddressInUse, ConfigError, TaskError
from ndpipe.metrics import SnapshotCollector
from ndpipe.worker.daemon import WorkerDaemon
from ndpipe.worker.metrics import death_cause
from tests.conftest import STEADY, wait_until

pytestmark = pytest.mark.timeout(60)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return parse(reply.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["broker", "worker"])
@pytest.mark.parametrize(("given", "problem"), [
    ("127.0.0.1", "expected HOST:PORT"),
    ("127.0.0.1:", "expected HOST:PORT"),
    ("tcp://127.0.0.1:9109", "bad HOST"),
    ("127.0.0.1:70000", "port must be 0..65535"),
    (":9109", "bad HOST"),
    ("bad_host!:9109", "bad HOST"),
    ("999.1.1.1:9109", "bad HOST"),
    ("[::zz]:9109", "bad HOST"),
])
def test_bad_metrics_value_names_the_key(tmp_path: Path, section: str, given: str, problem: str) -> None:
    # Given a metrics value that is not HOST:PORT
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  metrics: '{given}'\n")
    # When loading, Then the error names the file, the key, the problem and the value
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert f"{path}: {section}.metrics: " in str(info.value)
    assert problem in str(info.value) and f"(got '{given}')" in str(info.value)


@pytest.mark.parametrize("given", ["", "127.0.0.1:9109", "0.0.0.0:0", "[::1]:9110", "localhost:9109",
                                   "metrics-1.example.org:65535"])
def test_good_metrics_values(given: str) -> None:
    assert load_config(None, env={"NDPIPE_BROKER__METRICS": f"'{given}'",
                                  "NDPIPE_WORKER__METRICS": f"'{given}'"}).broker.metrics == given


def test_metrics_are_off_by_default() -> None:
    # Given the defaults, When a broker binds and a worker daemon is built, Then neither listens
    assert BrokerConfig().metrics == WorkerConfig().metrics == ""
    broker = Broker(BrokerConfig(frontend="inproc://m-f", backend="inproc://m-b"))
    try:
        broker.bind()
        assert broker.metrics is None
    finally:
        broker.close()
    daemon = WorkerDaemon(WorkerConfig(processes=1))
    try:
        daemon.listen()
        assert daemon.metrics is None
    finally:
        daemon.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_port_in_use_is_address_in_use_naming_the_key(busy_port: int) -> None:
    cfg = BrokerConfig(frontend="inproc://m-f2", backend="inproc://m-b2", metrics=f"127.0.0.1:{busy_port}")
    broker = Broker(cfg)
    try:
        with pytest.raises(AddressInUse, match=rf"^broker\.metrics: cannot listen on 127\.0\.0\.1:{busy_port}: "):
            broker.bind()
    finally:
        broker.close()
    daemon = WorkerDaemon(WorkerConfig(processes=1, metrics=f"127.0.0.1:{busy_port}"))
    try:
        with pytest.raises(AddressInUse, match=r"^worker\.metrics: .*in use"):
            daemon.listen()
    finally:
        daemon.close()


def test_cli_broker_exits_75_naming_the_key_when_the_port_is_taken(tmp_short: Path, busy_port: int) -> None:
    # Given a config whose broker.metrics port another process holds
    path = tmp_short / "c.yaml"
    path.write_text(f"broker: {{frontend: 'ipc://{tmp_short}/f', backend: 'ipc://{tmp_short}/b', "
                    f"metrics: '127.0.0.1:{busy_port}'}}\n")
    # When the broker starts, Then it exits 75 (retried by the units: the port may free up) and says which key
    done = subprocess.run([sys.executable, "-m", "ndpipe.cli", "broker", "--config", str(path)],
                          capture_output=True, timeout=30)
    assert done.returncode == 75
    assert b"broker.metrics: cannot listen on" in done.stderr


# --- tallies and snapshots, no sockets -------------------------------------------------------------


def test_tally_buckets_are_bisected_and_exposed_cumulatively() -> None:
    # Given latencies on a bound, between bounds and past the last one
    tally = Tally()
    for seconds in (0.0005, 0.0007, 0.003, 100.0):
        tally.observe(seconds)
    # Then each lands in the first bucket whose bound is >= it
    assert tally.latency[0] == 1 and tally.latency[1] == 1 and tally.latency[3] == 1 and tally.latency[-1] == 1
    assert len(tally.latency) == len(LATENCY_BOUNDS) + 1
    # And the family's buckets are cumulative, ending at the count
    samples = _expose(_snapshot_of(_state_with({"s": tally})))
    assert value(samples, "ndpipe_task_latency_seconds_bucket", service="s", le="0.0005") == 1
    assert value(samples, "ndpipe_task_latency_seconds_bucket", service="s", le="0.005") == 3
    assert value(samples, "ndpipe_task_latency_seconds_bucket", service="s", le="+Inf") == 4
    assert value(samples, "ndpipe_task_latency_seconds_count", service="s") == 4
    assert value(samples, "ndpipe_task_latency_seconds_sum", service="s") == pytest.approx(100.0042)


def test_tallies_past_the_limit_count_as_other() -> None:
    tallies = Tallies(limit=2)
    tallies.of("a").submitted += 1
    tallies.of("b").submitted += 1
    tallies.of("c").submitted += 1
    tallies.of("d").submitted += 1
    assert {name: t.submitted for name, t in tallies.items()} == {"a": 1, "b": 1, OTHER: 2}


def test_state_tallies_a_task_life_by_service() -> None:
    # Given a broker state with one lane serving "s"
    state = BrokerState(heartbeat_interval=1.0, liveness=3)
    state.worker_ready(b"H", ["s"], 2, 0.0, lanes=1, name="w")
    host = state.hosts[b"H"]
    state.lane_ready(b"L", host.key, 0, 0.0, pid=1)
    # When three tasks come: one completes, one fails, one times out at the broker
    for tid, timeout_ms in ((b"t1", 0), (b"t2", 0), (b"t3", 500)):
        assert state.submit(b"M", tid, "s", [b"abcd"], 0.0, timeout_ms=timeout_ms) is None
    sent = [task for task, _ in state.dispatch(0.0)]
    assert len(sent) == 2
    state.complete(b"L", sent[0].tid, [b"123456"], now=0.25)
    state.fail(b"L", sent[1].tid, P.HANDLER_ERROR, 0.3)
    state.expire(1.0)  # t3 waited in the queue past its 500 ms
    # Then the tallies say so, bytes included
    t = state.tallies.of("s")
    assert (t.submitted, t.completed, t.timed_out, t.failed) == (3, 1, 1, {P.HANDLER_ERROR: 1, P.TIMEOUT: 1})
    assert (t.bytes_from_masters, t.bytes_to_workers, t.bytes_from_workers, t.bytes_to_masters) == (12, 8, 6, 6)
    assert sum(t.latency) == 1 and t.latency_sum == pytest.approx(0.25)
    samples = _expose(_snapshot_of(state))
    assert value(samples, "ndpipe_tasks_failed_total", service="s", code="TIMEOUT") == 1
    assert value(samples, "ndpipe_tasks_timed_out_total", service="s") == 1
    assert value(samples, "ndpipe_payload_bytes_received_total", service="s", peer="master") == 12
    assert value(samples, "ndpipe_lanes_alive") == 1 and value(samples, "ndpipe_service_lanes", service="s") == 1


def test_a_published_snapshot_does_not_change_with_the_state() -> None:
    # Given a snapshot taken with one task queued
    state = BrokerState()
    state.submit(b"M", b"t1", "s", [b"x"], 0.0)
    collector: SnapshotCollector[BrokerSnapshot] = SnapshotCollector(families)
    collector.publish(take(state, dict(state.counters)))
    # When the loop goes on (more tasks, a new service)
    state.submit(b"M", b"t2", "s", [b"x"], 0.0)
    state.submit(b"M", b"t3", "other", [b"x"], 0.0)
    # Then a scrape still reads the snapshot as it was
    samples = _expose_collector(collector)
    assert value(samples, "ndpipe_queue_depth", service="s") == 1
    assert value(samples, "ndpipe_tasks_submitted_total", service="s") == 1
    assert value(samples, "ndpipe_queue_depth", service="other") is None


def test_nothing_is_exposed_before_the_first_snapshot() -> None:
    assert _expose_collector(SnapshotCollector(families)) == {}


@pytest.mark.parametrize(("code", "killed", "cause"), [
    (-14, "", "timeout"), (-9, "timeout", "timeout"), (-9, "cancel", "cancel"), (-9, "", "sigkill"),
    (P.EXIT_OUT_OF_MEMORY, "", "out_of_memory"), (-15, "", "signal"), (0, "", "exit_ok"), (1, "", "exit_error"),
])
def test_death_causes(code: int, killed: str, cause: str) -> None:
    assert death_cause(code, killed) == cause


def _state_with(tallies: dict[str, Tally]) -> BrokerState:
    state = BrokerState()
    state.tallies.update(tallies)
    return state


def _snapshot_of(state: BrokerState) -> BrokerSnapshot:
    return take(state, dict(state.counters))


def _expose(snap: BrokerSnapshot) -> Samples:
    collector: SnapshotCollector[BrokerSnapshot] = SnapshotCollector(families)
    collector.publish(snap)
    return _expose_collector(collector)


def _expose_collector(collector: SnapshotCollector[Any]) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return parse(generate_latest(registry).decode())


# --- a real broker and worker, scraped ------------------------------------------------------------


def test_broker_and_worker_metrics_count_what_happened(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Given a broker and a worker of 2 lanes, each with a metrics listener
    bport, wport = free_port(), free_port()
    c = make_cluster(broker={**STEADY, "metrics": f"127.0.0.1:{bport}"}, worker={"metrics": f"127.0.0.1:{wport}"})
    c.start_broker()
    c.start_worker(processes=2, wait=True)
    # When 20 echo tasks complete, one handler fails and one task outlives its service's timeout
    with c.master() as m:
        assert [f.result(timeout=30) for f in [m.submit("echo", i) for i in range(20)]] == list(range(20))
        with pytest.raises(TaskError):
            m.submit("fail", "no").result(timeout=30)
        with pytest.raises(TaskError):
            m.submit("hang", 30).result(timeout=30)  # hang: sleep under a 0.5 s timeout
    # Then the broker's endpoint counts them exactly (its snapshot is at most a heartbeat old)
    b = wait_until(lambda: (s := scrape(bport)) and value(s, "ndpipe_tasks_timed_out_total", service="hang") == 1
                   and value(s, "ndpipe_tasks_completed_total", service="echo") == 20 and s, what="broker counts")
    assert value(b, "ndpipe_tasks_submitted_total", service="echo") == 20
    assert value(b, "ndpipe_tasks_failed_total", service="fail", code="HANDLER_ERROR") == 1
    assert value(b, "ndpipe_tasks_failed_total", service="hang", code="TIMEOUT") == 1
    assert value(b, "ndpipe_task_latency_seconds_count", service="echo") == 20
    assert value(b, "ndpipe_task_latency_seconds_bucket", service="echo", le="+Inf") == 20
    assert value(b, "ndpipe_tasks_requeued_total", service="echo") == 0
    assert value(b, "ndpipe_queue_depth", service="echo") == 0
    assert value(b, "ndpipe_tasks_in_flight", service="echo") == 0
    assert value(b, "ndpipe_workers_alive") == 1
    assert (value(b, "ndpipe_payload_bytes_received_total", service="echo", peer="master") or 0) > 0
    assert (value(b, "ndpipe_payload_bytes_sent_total", service="echo", peer="master") or 0) > 0
    assert value(b, "ndpipe_broker_rejected_total") == 0
    assert (value(b, "process_resident_memory_bytes") or 0) > 0
    # And the worker's endpoint: the lane killed at the deadline was replaced, 21 tasks answered
    w = wait_until(lambda: (s := scrape(wport)) and value(s, "ndpipe_worker_lanes_ready") == 2
                   and value(s, "ndpipe_worker_lane_deaths_total", cause="timeout") == 1 and s, what="worker counts")
    assert value(w, "ndpipe_worker_lane_restarts_total") == 1
    assert value(w, "ndpipe_worker_failures_reported_total", code="TIMEOUT") == 1
    assert value(w, "ndpipe_worker_tasks_answered_total") == 21
    assert value(w, "ndpipe_worker_registered") == 1
    assert value(w, "ndpipe_worker_lanes_configured") == 2
    assert value(w, "ndpipe_worker_cache_bytes") == 0
    for lane in ("0", "1"):
        assert (value(w, "ndpipe_worker_lane_rss_bytes", lane=lane) or 0) > 0
        assert value(w, "ndpipe_worker_lane_cpu_seconds_total", lane=lane) is not None
    # And the lanes the broker counts agree
    assert wait_until(lambda: value(scrape(bport), "ndpipe_lanes_alive") == 2, what="2 lanes at the broker")


def test_failure_codes_outside_the_protocols_count_as_other() -> None:
    """A worker may send any code of 1..32 letters: counted by its own name it could grow the labels
    (and every scrape) without bound."""
    from ndpipe.broker.tally import Tally

    tally = Tally()
    for code in ("HANDLER_ERROR", "TIMEOUT", "MADE_UP_ONE", "MADE_UP_TWO", "HANDLER_ERROR"):
        tally.fail(code)
    assert tally.failed == {"HANDLER_ERROR": 2, "TIMEOUT": 1, "OTHER": 2}
