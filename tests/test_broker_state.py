"""Pure broker state with an injected clock: queues, fairness, credit, requeue, expiry."""

from __future__ import annotations

import pytest

from ndpipe import protocol as P
from ndpipe.broker.records import task_key
from ndpipe.broker.state import INFLIGHT, QUEUED, BrokerState, LaneRecord, ServiceQueue, Task

pytestmark = pytest.mark.timeout(30)
M1, M2 = b"master-1", b"master-2"


def make(max_queued: int = 100, max_attempts: int = 3) -> BrokerState:
    return BrokerState(heartbeat_interval=1.0, liveness=3, max_attempts=max_attempts, max_queued=max_queued)


def key(tid: bytes, master: bytes = M1) -> bytes:
    """The broker's id for ``master``'s task ``tid``: what lanes see and answer to, and ``s.tasks`` keys."""
    return task_key(master, tid)


def submit(s: BrokerState, tid: bytes, master: bytes = M1, service: str = "svc", now: float = 0.0,
           timeout_ms: int = 0, max_attempts: int = 0) -> str | None:
    return s.submit(master, tid, service, [b"payload"], now, timeout_ms, max_attempts)


def ready(s: BrokerState, wid: bytes, services: list[str], slots: int, now: float = 0.0) -> LaneRecord:
    """A one-lane worker whose daemon and lane share one connection ``wid`` (PROTOCOL.md §2.2 allows it)."""
    host = s.worker_ready(wid, services, slots, now, name=wid.decode())
    lane = s.lane_ready(wid, host.key, 0, now, pid=1)
    assert lane is not None
    return lane


def expire_keeping_masters(s: BrokerState, now: float) -> list[bytes]:
    """Expire at ``now`` with the masters still alive (they ping); return the dead workers."""
    for master in list(s.masters):
        s.master_seen(master, now)
    return s.expire(now)[0]


def test_dispatch_goes_to_least_loaded_worker_then_lru() -> None:
    s = make()
    ready(s, b"w1", ["svc"], 2, now=0.0)
    ready(s, b"w2", ["svc"], 2, now=0.0)
    for i in range(3):
        submit(s, b"t%d" % i)
    sent = [(t.tid, w.wid) for t, w in s.dispatch(now=1.0)]
    assert [w for _, w in sent] == [b"w1", b"w2", b"w1"]
    assert all(s.tasks[tid].state == INFLIGHT for tid, _ in sent)


def test_no_dispatch_without_credit_and_credit_returns_on_result() -> None:
    s = make()
    ready(s, b"w1", ["svc"], 1, now=0.0)
    submit(s, b"a")
    submit(s, b"b")
    assert [t.master_tid for t, _ in s.dispatch(0.0)] == [b"a"]
    assert list(s.dispatch(0.0)) == []
    task = s.complete(b"w1", key(b"a"))
    assert task is not None and task.master == M1 and task.master_tid == b"a"
    assert [t.master_tid for t, _ in s.dispatch(0.0)] == [b"b"]


def test_worker_only_gets_its_services() -> None:
    s = make()
    ready(s, b"w1", ["other"], 4, now=0.0)
    submit(s, b"a")
    assert list(s.dispatch(0.0)) == []
    ready(s, b"w2", ["svc"], 1, now=0.0)
    assert [w.wid for _, w in s.dispatch(0.0)] == [b"w2"]


def test_masters_are_served_round_robin() -> None:
    q = ServiceQueue()
    for i in range(100):
        q.push(Task(b"big%d" % i, "svc", M1, [], 3))
    for i in range(3):
        q.push(Task(b"small%d" % i, "svc", M2, [], 3))
    order = [q.pop().tid for _ in range(6)]  # type: ignore[union-attr]
    assert order == [b"big0", b"small0", b"big1", b"small1", b"big2", b"small2"]
    assert len(q) == 97


def test_duplicate_submission_is_dropped() -> None:
    s = make()
    assert submit(s, b"a") is None
    assert submit(s, b"a") is None
    assert len(s.queues["svc"]) == 1 and s.counters["duplicates"] == 1


def test_queue_full_is_an_explicit_error() -> None:
    s = make(max_queued=2)
    assert submit(s, b"a") is None and submit(s, b"b") is None
    assert submit(s, b"c") == P.QUEUE_FULL
    assert key(b"c") not in s.tasks


def test_dead_worker_tasks_go_back_to_the_head_with_attempt_plus_one() -> None:
    s = make()
    ready(s, b"w1", ["svc"], 1, now=0.0)
    submit(s, b"a")
    submit(s, b"b")
    list(s.dispatch(0.0))
    dead = expire_keeping_masters(s, 3.5)  # 3 intervals of silence
    assert dead == [b"w1"]
    assert s.tasks[key(b"a")].state == QUEUED and s.tasks[key(b"a")].attempt == 1
    ready(s, b"w2", ["svc"], 1, now=4.0)
    (task, rec), = list(s.dispatch(4.0))
    assert task.master_tid == b"a" and task.attempt == 2 and rec.wid == b"w2"


def test_heartbeat_keeps_worker_alive() -> None:
    s = make()
    ready(s, b"w1", ["svc"], 1, now=0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        assert s.worker_seen(b"w1", t)
        assert s.expire(t)[0] == []
    assert s.expire(7.0)[0] == [b"w1"]
    assert not s.worker_seen(b"w1", 7.1)


def test_poison_task_fails_after_max_attempts() -> None:
    s = make(max_attempts=2)
    submit(s, b"poison")
    ready(s, b"w0", ["svc"], 1, now=0.0)
    ready(s, b"w1", ["svc"], 1, now=0.0)
    for n in range(2):
        ((task, rec),) = list(s.dispatch(float(n)))
        assert task.master_tid == b"poison" and task.attempt == n + 1
        assert s.fail(rec.wid, key(b"poison"), P.CRASHED, float(n)) is None
    failures = s.take_failures()
    assert [(f.task.master_tid, f.code) for f in failures] == [(b"poison", P.MAX_ATTEMPTS)]
    assert "2 of 2 attempts" in failures[0].details["message"]
    assert key(b"poison") not in s.tasks


def test_per_task_max_attempts_overrides_default() -> None:
    s = make(max_attempts=5)
    submit(s, b"a", max_attempts=1)
    ready(s, b"w", ["svc"], 1, now=0.0)
    list(s.dispatch(0.0))
    s.fail(b"w", key(b"a"), P.CRASHED, 0.0)
    assert [f.code for f in s.take_failures()] == [P.MAX_ATTEMPTS]


def test_handler_error_is_forwarded_not_retried() -> None:
    s = make()
    ready(s, b"w", ["svc"], 1, now=0.0)
    submit(s, b"a")
    list(s.dispatch(0.0))
    task = s.fail(b"w", key(b"a"), P.HANDLER_ERROR, 0.0)
    assert task is not None and task.master_tid == b"a" and task.master == M1
    assert key(b"a") not in s.tasks and s.lanes[b"w"].free == 1


def test_graceful_disconnect_requeues_without_penalty() -> None:
    s = make(max_attempts=1)
    ready(s, b"w", ["svc"], 1, now=0.0)
    submit(s, b"a")
    list(s.dispatch(0.0))
    requeued = s.worker_gone(b"w", 0.5, penalize=False)
    assert [t.master_tid for t in requeued] == [b"a"]
    assert s.tasks[key(b"a")].attempt == 0 and s.take_failures() == []


def test_draining_worker_gets_no_new_tasks() -> None:
    s = make()
    ready(s, b"w", ["svc"], 4, now=0.0)
    s.worker_drain(b"w")
    submit(s, b"a")
    assert list(s.dispatch(0.0)) == []


def test_late_result_from_a_lane_presumed_dead_is_dropped_and_the_holder_answers() -> None:
    s = make()
    ready(s, b"w1", ["svc"], 1, now=0.0)
    submit(s, b"a")
    list(s.dispatch(0.0))
    expire_keeping_masters(s, 3.5)  # w1 declared dead, a requeued
    ready(s, b"w2", ["svc"], 1, now=3.6)
    list(s.dispatch(3.6))
    assert s.complete(b"w1", key(b"a")) is None  # the frozen worker woke up: not the holder any more
    assert s.counters["dropped"] == 1 and s.tasks[key(b"a")].worker == b"w2"
    assert s.complete(b"w2", key(b"a")) is not None  # the holder's answer is the one delivered
    assert s.lanes[b"w2"].free == 1 and key(b"a") not in s.tasks


def test_cancel_only_queued_tasks_of_the_same_master() -> None:
    s = make()
    submit(s, b"a")
    assert not s.cancel(M2, b"a")
    assert s.cancel(M1, b"a")
    assert key(b"a") not in s.tasks and len(s.queues["svc"]) == 0
    ready(s, b"w", ["svc"], 1, now=0.0)
    assert list(s.dispatch(0.0)) == []



def test_two_masters_may_use_the_same_task_id_and_each_answer_reaches_its_own_master() -> None:
    # Given two masters that both submit a task under the id T
    s = make()
    ready(s, b"w1", ["svc"], 1, now=0.0)
    ready(s, b"w2", ["svc"], 1, now=0.0)
    assert submit(s, b"T", master=M1) is None and submit(s, b"T", master=M2) is None
    # Then both are queued, neither is a duplicate, and the lanes see two different ids
    assert len(s.queues["svc"]) == 2 and s.counters["duplicates"] == 0 and s.counters["submitted"] == 2
    assert set(s.tasks) == {key(b"T", M1), key(b"T", M2)} and key(b"T", M1) != key(b"T", M2)
    held = {t.master: (t, w.wid) for t, w in s.dispatch(0.0)}
    assert set(held) == {M1, M2} and {w for _, w in held.values()} == {b"w1", b"w2"}
    for master, (task, _) in held.items():
        assert task.tid == key(b"T", master) and task.master_tid == b"T"
    # When each lane answers: a lane cannot answer the other master's task, only the one it holds
    (_, w_m1), (_, w_m2) = held[M1], held[M2]
    assert s.complete(w_m1, key(b"T", M2)) is None and s.complete(w_m2, key(b"T", M1)) is None
    done1 = s.complete(w_m1, key(b"T", M1))
    done2 = s.complete(w_m2, key(b"T", M2))
    # Then each result goes to its own master, under the id that master gave
    assert done1 is not None and done1.master == M1 and done1.master_tid == b"T"
    assert done2 is not None and done2.master == M2 and done2.master_tid == b"T"
    assert s.tasks == {} and s.counters["completed"] == 2 and s.counters["dropped"] == 2


def test_a_master_cannot_cancel_or_ack_another_masters_task() -> None:
    # Given M1 with a stream in flight and a task queued behind it, and M2 holding neither
    s = make()
    ready(s, b"w", ["svc"], 1, now=0.0)
    assert s.submit(M1, b"S", "svc", [b"p"], 0.0, flags=P.FLAG_STREAM) is None
    assert [t.master_tid for t, _ in s.dispatch(0.0)] == [b"S"]
    assert submit(s, b"Q", master=M1) is None
    s.master_seen(M2, 0.0)
    # When M2 names M1's ids: nothing is cancelled, acknowledged or stopped
    assert s.cancel(M2, b"Q") is False and s.cancel(M2, b"S") is False
    assert s.ack(M2, b"S") is None and s.ack(M2, b"Q") is None
    assert s.take_stops() == [] and s.counters["cancelled"] == 0
    # Then M1's tasks stay as they were, and M1 itself still can ack and cancel them
    assert s.tasks[key(b"S")].state == INFLIGHT and s.tasks[key(b"Q")].state == QUEUED
    assert len(s.queues["svc"]) == 1 and s.lanes[b"w"].inflight == {key(b"S")}
    acked = s.ack(M1, b"S")
    assert acked is not None and acked is s.tasks[key(b"S")] and acked.worker == b"w"
    # And M2's own task under the same id is the only one its cancel reaches
    assert submit(s, b"Q", master=M2) is None
    assert s.cancel(M2, b"Q") and key(b"Q", M2) not in s.tasks
    assert s.tasks[key(b"Q")].state == QUEUED and len(s.queues["svc"]) == 1
    assert s.cancel(M1, b"Q") and key(b"Q") not in s.tasks

def test_queued_task_times_out_and_is_not_dispatched() -> None:
    s = make()
    submit(s, b"a", timeout_ms=500)
    s.expire(now=0.6)
    assert s.take_cancels() == []  # it was only queued: dropped, error to master
    assert [(f.task.master_tid, f.code) for f in s.take_failures()] == [(b"a", P.TIMEOUT)]
    ready(s, b"w", ["svc"], 1, now=0.7)
    assert list(s.dispatch(0.7)) == []


def test_inflight_task_times_out_and_frees_credit() -> None:
    s = make()
    ready(s, b"w", ["svc"], 1, now=0.0)
    submit(s, b"a", timeout_ms=500)
    list(s.dispatch(0.0))
    s.worker_seen(b"w", 0.5)
    s.expire(now=0.6)
    assert [(lane.wid, tid) for lane, tid in s.take_cancels()] == [(b"w", key(b"a"))]  # the lane is told to stop it
    assert s.lanes[b"w"].free == 1
    assert s.complete(b"w", key(b"a")) is None  # its late result goes nowhere


def test_silent_master_loses_its_queued_tasks() -> None:
    s = make()
    s.master_seen(M1, 0.0)
    s.master_seen(M2, 0.0)
    for i in range(5):
        submit(s, b"m1-%d" % i, master=M1)
    submit(s, b"m2", master=M2)
    s.master_seen(M2, 2.9)
    _, gone = s.expire(now=3.1)
    assert gone == [M1]
    assert list(s.tasks) == [key(b"m2", M2)] and len(s.queues["svc"]) == 1


def test_master_session_token_changes_when_forgotten() -> None:
    s = make()
    s.master_seen(M1, 0.0)
    first = s.session(M1)
    s.master_seen(M1, 1.0)
    assert s.session(M1) == first
    s.expire(now=10.0)
    s.master_seen(M1, 10.5)
    assert s.session(M1) != first


def test_reregistering_worker_hands_its_tasks_back() -> None:
    s = make()
    ready(s, b"w", ["svc"], 1, now=0.0)
    submit(s, b"a")
    list(s.dispatch(0.0))
    ready(s, b"w", ["svc"], 1, now=1.0)
    assert s.tasks[key(b"a")].state == QUEUED
    assert [t.master_tid for t, _ in s.dispatch(1.0)] == [b"a"]


def test_snapshot_is_plain_data() -> None:
    s = make()
    host = s.worker_ready(b"w", ["svc"], 2, 0.0, info={"host": "h"})
    s.lane_ready(b"w", host.key, 0, 0.0)
    submit(s, b"a")
    submit(s, b"b")
    submit(s, b"c")
    list(s.dispatch(0.0))
    snap = s.snapshot(0.5)
    assert snap["services"]["svc"] == {"queued": 1, "inflight": 2, "workers": 1, "lanes": 1, "slots": 2, "broken": 0}
    assert snap["workers"][0]["info"] == {"host": "h"}


def test_stale_crash_report_for_a_requeued_task_changes_nothing() -> None:
    # Given a task requeued after its worker was declared dead
    s = make()
    ready(s, b"w1", ["svc"], 1, now=0.0)
    submit(s, b"a")
    list(s.dispatch(0.0))
    expire_keeping_masters(s, 3.5)
    assert s.tasks[key(b"a")].state == QUEUED and len(s.queues["svc"]) == 1
    # When the old worker's compute process dies and reports CRASHED late
    assert s.fail(b"w1", key(b"a"), P.CRASHED, 3.6) is None
    # Then the task is still queued, counted once, and dispatchable
    assert len(s.queues["svc"]) == 1
    ready(s, b"w2", ["svc"], 1, now=3.7)
    assert [t.master_tid for t, _ in s.dispatch(3.7)] == [b"a"]
    assert s.master_gone(M1) == 0 and len(s.queues["svc"]) == 0


def test_late_handler_error_for_a_requeued_task_is_dropped() -> None:
    s = make()
    ready(s, b"w1", ["svc"], 1, now=0.0)
    submit(s, b"a")
    list(s.dispatch(0.0))
    expire_keeping_masters(s, 3.5)
    assert s.fail(b"w1", key(b"a"), P.HANDLER_ERROR, 3.6) is None
    assert s.tasks[key(b"a")].state == QUEUED and len(s.queues["svc"]) == 1


def test_status_counts_inflight_per_service() -> None:
    s = make()
    ready(s, b"w", ["svc", "other"], 4, now=0.0)
    submit(s, b"a")
    submit(s, b"b", service="other")
    list(s.dispatch(0.0))
    snap = s.snapshot(0.0)
    assert snap["services"]["svc"]["inflight"] == 1 and snap["services"]["other"]["inflight"] == 1


def test_requeued_task_of_a_master_that_left_is_dropped() -> None:
    s = make()
    ready(s, b"w", ["svc"], 1, now=0.0)
    submit(s, b"a")
    list(s.dispatch(0.0))
    s.master_gone(M1)  # BYE: in-flight tasks run on, but nobody will wait for a rerun
    assert s.worker_gone(b"w", 0.1) == [] and key(b"a") not in s.tasks


def two_lane_worker(s: BrokerState, now: float = 0.0) -> tuple[bytes, bytes, bytes]:
    """A daemon on connection d with lanes on connections l0 and l1, one credit each."""
    host = s.worker_ready(b"d", ["svc"], 1, now, lanes=2, name="host:1")
    for i in range(2):
        assert s.lane_ready(b"l%d" % i, host.key, i, now, pid=100 + i) is not None
    return b"d", b"l0", b"l1"


def test_lanes_are_dispatched_to_and_answer_for_themselves() -> None:
    s = make()
    _, l0, l1 = two_lane_worker(s)
    submit(s, b"a")
    submit(s, b"b")
    sent = {t.master_tid: w.wid for t, w in s.dispatch(0.0)}
    assert sorted(sent.values()) == [l0, l1]
    other = l1 if sent[b"a"] == l0 else l0
    assert s.complete(other, key(b"a")) is None  # the other lane of the same worker is not the holder
    assert s.complete(sent[b"a"], key(b"a")) is not None


def test_the_daemon_reports_for_its_lane_and_nobody_else_does() -> None:
    s = make()
    d, _, _ = two_lane_worker(s)
    ready(s, b"x", ["other"], 1)  # a registered worker, but not the holder
    submit(s, b"a")
    assert len(list(s.dispatch(0.0))) == 1
    assert s.fail(b"x", key(b"a"), P.HANDLER_ERROR, 0.1) is None  # another worker cannot end it
    assert s.tasks[key(b"a")].state == INFLIGHT
    assert s.fail(d, key(b"a"), P.CRASHED, 0.1) is None  # its own daemon can: requeued, one attempt counted
    assert s.tasks[key(b"a")].state == QUEUED and s.tasks[key(b"a")].attempt == 1


def test_a_lane_needs_its_workers_key_and_an_index_in_range() -> None:
    s = make()
    host = s.worker_ready(b"d", ["svc"], 1, 0.0, lanes=2)
    assert s.lane_ready(b"l", b"k" * 16, 0, 0.0) is None
    assert s.lane_ready(b"l", host.key, 2, 0.0) is None
    assert s.lane_ready(b"l", host.key, 1, 0.0) is not None
    s.worker_gone(b"d", 0.0)
    assert s.lane_ready(b"l2", host.key, 0, 0.0) is None and not s.lanes  # the key died with its worker


def test_lane_gone_hands_back_without_penalty_and_only_for_the_same_process() -> None:
    s = make()
    d, l0, l1 = two_lane_worker(s)
    submit(s, b"a")
    submit(s, b"b")
    sent = {w.wid: t for t, w in s.dispatch(0.0)}
    assert s.lane_ended(d, 0, pid=999, now=0.1) is None  # not that process: a replaced lane's late report
    handed = s.lane_ended(d, 0, pid=100, now=0.1)
    assert handed == [sent[l0]] and sent[l0].attempt == 0 and sent[l0].state == QUEUED
    assert l0 not in s.lanes and sent[l1].state == INFLIGHT


def test_a_dead_daemon_takes_its_lanes_and_their_tasks_count_an_attempt() -> None:
    s = make()
    two_lane_worker(s)
    submit(s, b"a")
    submit(s, b"b")
    list(s.dispatch(0.0))
    dead = expire_keeping_masters(s, 3.5)
    assert dead == [b"d"] and not s.lanes and not s.hosts
    assert all(s.tasks[key(t)].state == QUEUED and s.tasks[key(t)].attempt == 1 for t in (b"a", b"b"))


def test_draining_worker_gets_no_task_on_any_lane() -> None:
    s = make()
    d, _, _ = two_lane_worker(s)
    s.worker_drain(d)
    submit(s, b"a")
    assert list(s.dispatch(0.0)) == []


def test_same_worker_name_registering_again_replaces_the_old_registration() -> None:
    s = make()
    two_lane_worker(s)
    submit(s, b"a")
    list(s.dispatch(0.0))
    s.worker_ready(b"d2", ["svc"], 1, 0.5, lanes=2, name="host:1")  # the daemon's new socket
    assert list(s.hosts) == [b"d2"] and not s.lanes
    assert s.tasks[key(b"a")].state == QUEUED and s.tasks[key(b"a")].attempt == 0


def test_snapshot_shows_each_lane_with_its_address_pid_and_inflight() -> None:
    s = make()
    two_lane_worker(s)
    submit(s, b"a")
    list(s.dispatch(0.0))
    (worker,) = s.snapshot(0.0)["workers"]
    assert worker["id"] == "host:1" and worker["inflight"] == 1 and worker["slots"] == 2
    assert [(x["address"], x["pid"]) for x in worker["lanes"]] == [("host:1/0", 100), ("host:1/1", 101)]
    assert sum(x["inflight"] for x in worker["lanes"]) == 1


def test_full_link_hands_back_one_task_and_stalls_the_worker() -> None:
    s = make()
    ready(s, b"w", ["svc"], 2, now=0.0)
    submit(s, b"a")
    submit(s, b"b")
    (first, _), = [next(iter(s.dispatch(0.0)))]
    s.stall(first)
    assert s.tasks[first.tid].state == QUEUED and first.attempt == 0
    assert list(s.dispatch(0.0)) == []  # nothing more until it speaks
    s.worker_seen(b"w", 0.5)
    assert {t.master_tid for t, _ in s.dispatch(0.5)} == {b"a", b"b"}


def test_dead_entries_release_payloads_and_lanes_compact() -> None:
    s = make(max_queued=10_000)
    for i in range(3000):
        submit(s, b"t%d" % i, timeout_ms=100)
    held = [s.tasks[key(b"t%d" % i)] for i in range(3000)]
    s.master_seen(M1, 0.2)
    s.expire(now=0.2)
    assert not s.tasks and all(t.payload == [] for t in held)
    queue = s.queues["svc"]
    assert len(queue) == 0 and sum(len(lane) for lane in queue._lanes.values()) <= 1024 + 1


def test_deadline_heap_does_not_grow_with_finished_tasks() -> None:
    s = make(max_queued=100_000)
    ready(s, b"w", ["svc"], 1, now=0.0)
    for i in range(5000):
        submit(s, b"t%d" % i, timeout_ms=3_600_000)
        list(s.dispatch(0.0))
        assert s.complete(b"w", key(b"t%d" % i)) is not None
    s.worker_seen(b"w", 1.0)
    s.master_seen(M1, 1.0)
    s.expire(now=1.0)
    assert len(s._deadlines) <= 1024


def test_prune_forgets_idle_services() -> None:
    s = make()
    submit(s, b"a", service="job-1")
    assert s.cancel(M1, b"a")
    s.prune()
    assert "job-1" not in s.queues and "job-1" not in s.snapshot(0.0)["services"]


def test_service_names_are_bounded_too() -> None:
    # Given a broker that queues tasks for at most 2 services
    s = BrokerState(max_queued=10, max_services=2)
    assert submit(s, b"a", service="one") is None and submit(s, b"b", service="two") is None
    # When a master names a third: refused, counted, nothing held for it
    assert submit(s, b"c", service="three") == P.QUEUE_FULL
    assert "three" not in s.queues and key(b"c") not in s.tasks and s.counters["rejected"] == 1
    # Then a known service still queues; and once a name's queue empties and is pruned, a new name fits
    assert submit(s, b"d", service="one") is None
    assert s.cancel(M1, b"b")
    s.prune()
    assert submit(s, b"e", service="three") is None


def test_snapshot_counts_in_flight_tasks_per_service() -> None:
    s = make()
    ready(s, b"w1", ["svc", "other"], 2, now=0.0)
    for i in range(5):
        submit(s, b"t%d" % i)
    submit(s, b"o1", service="other")
    list(s.dispatch(now=0.0))
    snap = s.snapshot(0.0)["services"]
    assert snap["svc"]["inflight"] + snap["other"]["inflight"] == 2
    assert snap["svc"]["queued"] + snap["other"]["queued"] == 4


def test_resent_running_task_is_not_queued_again() -> None:
    # Given a task running on a worker
    s = make()
    ready(s, b"w1", ["svc"], 2, now=0.0)
    submit(s, b"a")
    assert [t.master_tid for t, _ in s.dispatch(0.0)] == [b"a"]
    # When its master resends it under the same id (after a link drop it cannot know it arrived)
    assert submit(s, b"a") is None
    # Then it is not queued or dispatched a second time, and the duplicate is counted
    assert len(s.queues["svc"]) == 0 and list(s.dispatch(0.1)) == []
    assert s.tasks[key(b"a")].state == INFLIGHT and s.counters["duplicates"] == 1
    assert s.complete(b"w1", key(b"a")) is not None and s.tasks == {}


def test_max_queued_bounds_each_service_queue_alone() -> None:
    # Given max_queued = 3, a worker running one task of svc and another service with a full queue
    s = make(max_queued=3)
    ready(s, b"w1", ["svc"], 1, now=0.0)
    assert submit(s, b"run") is None
    list(s.dispatch(0.0))
    for k in range(3):
        assert submit(s, b"o%d" % k, service="other") is None
    assert submit(s, b"o3", service="other") == P.QUEUE_FULL
    # Then svc still queues exactly max_queued tasks: neither the task in flight nor other services count
    assert [submit(s, b"q%d" % k) for k in range(3)] == [None, None, None]
    assert submit(s, b"q3") == P.QUEUE_FULL
    assert len(s.queues["svc"]) == 3 and s.counters["rejected"] == 2
    # And a slot freed by dispatch is a slot to queue again
    assert s.complete(b"w1", key(b"run")) is not None
    list(s.dispatch(1.0))
    assert submit(s, b"q4") is None and submit(s, b"q5") == P.QUEUE_FULL


# ---- resident services whose constructor failed in a lane ------------------------------------------
WHY = {"type": "ValueError", "message": "weights file is corrupt", "traceback": "Traceback ... ValueError"}


def broken_lane(s: BrokerState, wid: bytes, services: list[str], broken: list[str], now: float = 0.0) -> LaneRecord:
    host = s.worker_ready(wid, services, 1, now, name=wid.decode())
    lane = s.lane_ready(wid, host.key, 0, now, pid=7, broken={name: WHY for name in broken})
    assert lane is not None
    return lane


def test_a_lane_is_offered_no_task_of_a_service_it_could_not_build() -> None:
    s = make()
    lane = broken_lane(s, b"w1", ["lm", "echo"], ["lm"])
    assert lane.services == ("echo",) and s.snapshot(0.0)["services"]["lm"]["broken"] == 1
    submit(s, b"e", service="echo")
    assert [(t.master_tid, w.wid) for t, w in s.dispatch(0.0)] == [(b"e", b"w1")]


def wait_out(s: BrokerState, start: float, seconds: float) -> None:
    """Expiry passes from ``start`` to ``start + seconds``, masters and workers alive throughout."""
    for now in (start, start + seconds):
        for hid in list(s.hosts):
            s.worker_seen(hid, now)
        expire_keeping_masters(s, now)


def test_a_service_no_live_lane_can_serve_fails_soon_naming_the_constructor_error() -> None:
    s = make()
    broken_lane(s, b"w1", ["lm"], ["lm"])
    assert submit(s, b"t", service="lm") is None
    wait_out(s, 0.0, 2.9)
    assert s.take_failures() == []  # a healthy lane may still join (after a restart they come one by one)
    wait_out(s, 3.0, 0.0)
    [failure] = s.take_failures()
    assert failure.task.master_tid == b"t" and failure.code == P.UNAVAILABLE
    assert "'lm'" in failure.details["message"] and "ValueError: weights file is corrupt" in failure.details["message"]
    assert failure.details["traceback"] == WHY["traceback"] and failure.details["lanes"] == ["w1/0"]
    assert key(b"t") not in s.tasks and s.counters["failed"] == 1


def test_tasks_waiting_for_a_service_fail_when_a_lane_reports_it_broken() -> None:
    s = make()
    submit(s, b"t1", service="lm")
    submit(s, b"t2", service="lm")
    wait_out(s, 0.0, 2.0)
    assert s.take_failures() == []  # nobody said anything yet: they wait (up to broker.unroutable_timeout)
    broken_lane(s, b"w1", ["lm"], ["lm"])
    wait_out(s, 3.0, 0.0)
    assert sorted(f.task.master_tid for f in s.take_failures()) == [b"t1", b"t2"]


def test_a_broken_lane_does_not_fail_work_that_another_lane_serves() -> None:
    s = make()
    broken_lane(s, b"w1", ["lm"], ["lm"])
    ready(s, b"w2", ["lm"], 1)
    submit(s, b"t", service="lm")
    wait_out(s, 0.0, 5.0)
    assert s.take_failures() == [] and [w.wid for _, w in s.dispatch(5.0)] == [b"w2"]


def test_a_healthy_lane_joining_in_the_grace_serves_what_a_broken_one_could_not() -> None:
    s = make()
    broken_lane(s, b"w1", ["lm"], ["lm"])
    submit(s, b"t", service="lm")
    wait_out(s, 0.0, 1.0)
    ready(s, b"w2", ["lm"], 1, now=1.5)
    wait_out(s, 2.0, 3.0)
    assert s.take_failures() == [] and [w.wid for _, w in s.dispatch(5.0)] == [b"w2"]


def test_a_broken_report_goes_with_its_lane() -> None:
    s = make()
    lane = broken_lane(s, b"w1", ["lm"], ["lm"])
    s.lane_gone(lane.wid, 1.0)
    s.prune()
    assert "lm" not in s.broken_by
    submit(s, b"t", service="lm", now=1.0)
    wait_out(s, 1.0, 10.0)
    assert s.take_failures() == []  # no witness left: the task waits for a lane (unroutable_timeout: 30 s)


def test_broken_names_outside_the_workers_services_are_ignored() -> None:
    s = make()
    lane = broken_lane(s, b"w1", ["echo"], ["nosuch"])
    assert lane.broken == {} and "nosuch" not in s.broken_by


def test_tasks_for_a_service_nobody_serves_fail_after_the_unroutable_timeout() -> None:
    s = BrokerState(unroutable_timeout=30.0)
    ready(s, b"w1", ["echo"], 1)

    def tick(now: float) -> None:
        s.worker_seen(b"w1", now)
        expire_keeping_masters(s, now)

    submit(s, b"t", service="nosuch", now=0.0)
    tick(1.0)  # the wait starts here
    tick(30.0)
    assert s.take_failures() == []
    tick(31.0)
    [failure] = s.take_failures()
    assert failure.code == P.UNAVAILABLE and "'nosuch'" in failure.details["message"]
    assert failure.details["served"] == ["echo"] and key(b"t") not in s.tasks


def test_a_worker_that_comes_in_time_ends_the_unroutable_wait() -> None:
    s = BrokerState(unroutable_timeout=30.0)
    submit(s, b"t", service="late", now=0.0)
    expire_keeping_masters(s, 1.0)
    ready(s, b"w1", ["late"], 1, now=20.0)
    s.worker_seen(b"w1", 40.0)
    expire_keeping_masters(s, 40.0)
    assert s.take_failures() == [] and [t.master_tid for t, _ in s.dispatch(40.0)] == [b"t"]
    assert s.complete(b"w1", key(b"t")) is not None
    s.lane_gone(b"w1", 40.0)
    s.prune()
    submit(s, b"u", service="late", now=41.0)  # a new wait starts afresh, not from an old entry
    expire_keeping_masters(s, 42.0)
    expire_keeping_masters(s, 71.0)
    assert s.take_failures() == []
    expire_keeping_masters(s, 72.5)
    assert [f.task.master_tid for f in s.take_failures()] == [b"u"]
