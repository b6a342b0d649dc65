"""The broker's O(log n) dispatch index, checked against the rule it replaces (a scan of all workers).

A seeded random walk of registrations (daemons of 1-3 lanes), submits, results, crashes, stalls,
drains, lane deaths and daemon deaths; after
every step the state dispatches and each choice must be the one a full scan would make (least
in-flight / slots among workers with credit, ties: the longest since its last dispatch), and no
service may be left with a queued task while one of its workers has credit.
"""

from __future__ import annotations

import random

import pytest

from ndpipe import protocol as P
from ndpipe.broker.state import INFLIGHT, BrokerState, LaneRecord

pytestmark = pytest.mark.timeout(60)
SERVICES = ("a", "b", "c")


def key(rec: LaneRecord, inflight: int, last: float) -> tuple[float, float]:
    return inflight / rec.slots, last


def dispatch_and_check(s: BrokerState, now: float, last: dict[bytes, float]) -> int:
    sent = 0
    for task, best in s.dispatch(now):
        sent += 1
        chosen = key(best, len(best.inflight) - 1, last.get(best.wid, 0.0))
        for rec in s.by_service[task.service]:
            if rec is not best and rec.free > 0:
                assert chosen <= key(rec, len(rec.inflight), last.get(rec.wid, 0.0)), (task.service, best, rec)
        last[best.wid] = now
    for service, queue in s.queues.items():
        if queue.size:
            assert not any(rec.free > 0 for rec in s.by_service.get(service, ())), f"{service} starved"
    return sent


def register(s: BrokerState, rng: random.Random, now: float, last: dict[bytes, float]) -> None:
    """A daemon of 1-3 lanes (replacing one of the same name), every lane joined."""
    wid = b"w%d" % rng.randrange(12)
    host = s.worker_ready(wid, rng.sample(SERVICES, rng.randint(1, 3)), rng.randint(1, 4), now,
                          lanes=rng.randint(1, 3), name=wid.decode())
    for i in range(host.nlanes):
        s.lane_ready(wid + b"/%d" % i, host.key, i, now, pid=i)
        last.pop(wid + b"/%d" % i, None)


@pytest.mark.parametrize("seed", range(6))
def test_dispatch_index_chooses_what_a_scan_would(seed: int) -> None:
    rng = random.Random(seed)
    s = BrokerState(heartbeat_interval=1.0, liveness=3, max_attempts=100, max_queued=10_000)
    s.master_seen(b"m", 0.0)
    last: dict[bytes, float] = {}
    next_task = 0
    sent = 0
    for step in range(3_000):
        now = 1.0 + step * 0.001
        s.master_seen(b"m", now)
        op = rng.random()
        inflight = [(tid, t.worker) for tid, t in s.tasks.items() if t.state == INFLIGHT and t.worker]
        if op < 0.08 or not s.hosts:
            register(s, rng, now, last)
        elif op < 0.45:
            for _ in range(rng.randint(1, 5)):
                s.submit(b"m", b"t%d" % next_task, rng.choice(SERVICES), [b"p"], now, 0, 0, 0)
                next_task += 1
        elif op < 0.75 and inflight:
            tid, wid = rng.choice(inflight)
            s.complete(wid, tid)
        elif op < 0.80 and inflight:
            tid, wid = rng.choice(inflight)
            s.fail(wid, tid, P.CRASHED, now, "test crash")
        elif op < 0.85 and inflight:
            s.stall(s.tasks[rng.choice(inflight)[0]])
        elif op < 0.93:
            s.worker_seen(rng.choice(list(s.hosts)), now)  # ends a stall
        elif op < 0.95:
            s.worker_drain(rng.choice(list(s.hosts)))
        elif op < 0.97 and s.lanes:
            s.lane_gone(rng.choice(list(s.lanes)), now, penalize=rng.random() < 0.5)
        else:
            s.worker_gone(rng.choice(list(s.hosts)), now, penalize=rng.random() < 0.5)
        sent += dispatch_and_check(s, now, last)
        heaps = s._free  # the index itself: its stale entries must stay bounded
        for service, heap in heaps.items():
            assert len(heap) <= 2 * len(s.by_service.get(service, ())) + 16 + 3  # stale entries bounded
    assert sent > 1_000  # the walk exercised dispatch, not just registrations
