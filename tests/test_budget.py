"""Byte budgets (issue 12, item 4): payload bytes held by the broker are bounded in all, per master and
per service; a SUBMIT past a bound is answered QUEUE_FULL naming it, and the bytes come back as
tasks finish, are cancelled, or their master leaves."""

from __future__ import annotations

import psutil
import pytest
import zmq

from ndpipe import protocol as P
from ndpipe.broker.budget import ByteBudget
from ndpipe.broker.state import BrokerState

pytestmark = pytest.mark.timeout(120)
M1, M2 = b"master-1", b"master-2"


def state(total: int = 0, master: int = 0, service: int = 0) -> BrokerState:
    return BrokerState(heartbeat_interval=1.0, liveness=3, budget=ByteBudget(total, master, service))


def test_each_bound_is_named_when_it_refuses() -> None:
    s = state(total=100, master=60, service=50)
    assert s.submit(M1, b"a", "x", [b"1" * 40], 0.0) is None
    assert s.submit(M1, b"b", "y", [b"1" * 30], 0.0) == P.QUEUE_FULL
    assert "max_queued_bytes_per_master = 60" in s.refused
    assert s.submit(M2, b"c", "x", [b"1" * 20], 0.0) == P.QUEUE_FULL and "per_service = 50" in s.refused
    assert s.submit(M2, b"d", "y", [b"1" * 40], 0.0) is None
    assert s.submit(M2, b"e", "z", [b"1" * 30], 0.0) == P.QUEUE_FULL and "max_queued_bytes = 100" in s.refused
    assert s.budget.held == 80 and s.counters["rejected"] == 3


def test_bytes_come_back_when_tasks_end_however_they_end() -> None:
    s = state(total=1000)
    host = s.worker_ready(b"w", ["x", "y"], 1, 0.0, name="w")
    s.lane_ready(b"w", host.key, 0, 0.0, pid=1)
    s.submit(M1, b"done", "x", [b"1" * 100], 0.0)
    [(task, _)] = list(s.dispatch(0.0))
    s.submit(M1, b"cancelled", "y", [b"1" * 200], 0.0)
    s.submit(M2, b"left", "y", [b"1" * 300], 0.0)
    assert s.budget.held == 600
    s.complete(b"w", task.tid, [b"r"])
    assert s.cancel(M1, b"cancelled") and s.budget.held == 300
    s.master_gone(M2)
    assert s.budget.held == 0 and s.budget.by_master == {} and s.budget.by_service == {}


def test_a_pipeline_stage_is_counted_at_its_new_size_and_never_refused() -> None:
    s = state(service=150)
    host = s.worker_ready(b"w", ["a", "b"], 1, 0.0, name="w")
    s.lane_ready(b"w", host.key, 0, 0.0, pid=1)
    s.submit(M1, b"p", "a", [b"1" * 100], 0.0, stages=("a", "b"), flags=P.FLAG_PIPELINE)
    [(task, _)] = list(s.dispatch(0.0))
    s.submit(M1, b"q", "b", [b"1" * 100], 0.0)
    s.complete(b"w", task.tid, [b"2" * 500])  # over the bound for "b": still taken
    assert s.budget.by_service == {"b": 600} and s.tasks[task.tid].state == "queued"


def test_a_flood_of_large_submits_is_refused_and_the_broker_stays_small(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """The issue's reproduction: 1,500 SUBMITs of 1 MiB over 50 service names nobody serves took the
    broker from 39 to 1,019 MiB. With a 32 MiB budget per master every SUBMIT past it is answered
    QUEUE_FULL naming the bound, and the broker's memory stays near the budget."""
    c = make_cluster(broker={"max_queued_bytes_per_master": 32 << 20, "unroutable_timeout": 600})
    c.start_broker()
    with c.master() as m:
        m.status()  # the broker is up
    broker = psutil.Process(c.broker.pid)
    before = broker.memory_info().rss
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 0
    sock.connect(c.frontend)
    blob = b"\x00" * (1 << 20)
    try:
        for i in range(1500):
            sock.send_multipart([P.MASTER, P.SUBMIT, b"svc%d" % (i % 50), b"t%d" % i, P.OPTIONS.pack(0, 0, 0),
                                 b"\x92\x90\x80", blob], copy=False)
        kept = (32 << 20) // (len(blob) + 3)  # each task holds its 3-octet header and the blob: 31 fit
        refused = 0
        for _ in range(1500 - kept):
            assert sock.poll(60_000), f"{refused} refusals, then nothing"
            reply = sock.recv_multipart()
            assert reply[1] == P.ERROR and reply[3] == P.QUEUE_FULL.encode()
            assert b"max_queued_bytes_per_master = 33554432" in reply[4]
            refused += 1
        grown = (broker.memory_info().rss - before) / 2**20
        with c.master() as m:
            status = m.status()
        assert status["tasks"] == kept and status["counters"]["rejected"] == refused == 1500 - kept
    finally:
        sock.close(linger=0)
        ctx.term()
    assert grown < 128, f"broker RSS grew {grown:.0f} MiB"
    print(f"broker RSS grew {grown:.0f} MiB under 1,500 × 1 MiB SUBMITs with a 32 MiB budget per master")
