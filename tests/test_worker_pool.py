"""Pure worker-side slot bookkeeping with an injected clock."""

from __future__ import annotations

import pytest

from ndpipe.worker.pool import Job, Pool

pytestmark = pytest.mark.timeout(30)


def test_jobs_start_only_on_ready_idle_slots() -> None:
    pool = Pool(2)
    pool.add(Job(b"a", "svc", [], None))
    assert pool.next_start(0.0) is None  # no child said HELLO yet
    pool.child_ready(1)
    slot, job = pool.next_start(0.0)  # type: ignore[misc]
    assert (slot.index, job.tid) == (1, b"a")
    pool.add(Job(b"b", "svc", [], None))
    assert pool.next_start(0.0) is None
    assert pool.finished(1, b"a") is job
    assert pool.next_start(0.0)[1].tid == b"b"  # type: ignore[index]


def test_deadline_overdue_and_reported_once() -> None:
    pool = Pool(1)
    pool.child_ready(0)
    pool.add(Job(b"a", "svc", [], timeout=2.0))
    pool.next_start(10.0)
    assert pool.next_deadline() == 12.0
    assert pool.overdue(11.9) == []
    (slot,) = pool.overdue(12.0)
    slot.reported = True
    assert pool.overdue(13.0) == [] and pool.next_deadline() is None
    assert pool.died(0) is None  # its timeout was reported: no CRASHED as well


def test_death_returns_the_running_job() -> None:
    pool = Pool(1)
    pool.child_ready(0)
    pool.add(Job(b"a", "svc", [], None))
    pool.next_start(0.0)
    assert pool.died(0).tid == b"a"  # type: ignore[union-attr]
    assert not pool.slots[0].ready and not pool.busy


def test_cancel_waiting_and_running() -> None:
    pool = Pool(1)
    pool.child_ready(0)
    pool.add(Job(b"a", "svc", [], None))
    pool.add(Job(b"b", "svc", [], None))
    pool.next_start(0.0)
    assert pool.cancel(b"b") is None and not pool.pending
    slot = pool.cancel(b"a")
    assert slot is not None and slot.reported
    assert pool.finished(0, b"a") is None  # answer after cancel is not forwarded
    pool.add(Job(b"c", "svc", [], None))
    assert pool.next_start(0.0) is None  # the slot stays busy until its process is gone
    assert pool.died(0) is None
    pool.child_ready(0)
    assert pool.next_start(0.0)[1].tid == b"c"  # type: ignore[index]


def test_job_for_a_vanished_process_goes_back_to_the_front() -> None:
    pool = Pool(1)
    pool.child_ready(0)
    pool.add(Job(b"a", "svc", [], None))
    pool.add(Job(b"b", "svc", [], None))
    pool.next_start(0.0)
    pool.requeue(0)
    assert [j.tid for j in pool.pending] == [b"a", b"b"] and not pool.slots[0].ready


def test_pipelined_slots_fill_idle_children_first_and_answer_in_order() -> None:
    pool = Pool(2, depth=2)
    pool.child_ready(0)
    pool.child_ready(1)
    for tid in (b"a", b"b", b"c", b"d", b"e"):
        pool.add(Job(tid, "svc", [], timeout=1.0))
    started = [pool.next_start(10.0) for _ in range(5)]
    assert [(s.index, j.tid) for s, j in started[:4]] == [(0, b"a"), (1, b"b"), (0, b"c"), (1, b"d")]  # type: ignore[misc]
    assert started[4] is None and [j.tid for j in pool.pending] == [b"e"]
    assert pool.next_deadline() == 11.0 and pool.slots[0].queue[1].deadline is None  # queued: clock not started
    assert pool.finished(0, b"c", 10.5) is None  # not the head: a child answers in order, so this is stale
    assert pool.finished(0, b"a", 10.5).tid == b"a"  # type: ignore[union-attr]
    assert pool.slots[0].job.tid == b"c" and pool.slots[0].job.deadline == 11.5  # type: ignore[union-attr]
    assert pool.running == 3


def test_a_dying_pipelined_child_reports_only_its_head() -> None:
    pool = Pool(1, depth=3)
    pool.child_ready(0)
    for tid in (b"a", b"b", b"c", b"d"):
        pool.add(Job(tid, "svc", [], None))
    for _ in range(3):
        pool.next_start(0.0)
    assert pool.cancel(b"c") is None and pool.slots[0].queue[2].cancelled  # queued in the child: marked
    crashed = pool.died(0)
    assert crashed is not None and crashed.tid == b"a"
    assert [j.tid for j in pool.pending] == [b"b", b"d"]  # never ran: back in front, the cancelled one dropped
    assert pool.running == 0 and pool.next_start(0.0) is None  # waits for the new HELLO


def test_a_timed_out_head_blocks_its_slot_until_the_child_is_gone() -> None:
    pool = Pool(1, depth=2)
    pool.child_ready(0)
    pool.add(Job(b"a", "svc", [], timeout=1.0))
    pool.add(Job(b"b", "svc", [], None))
    pool.next_start(0.0)
    pool.next_start(0.0)
    (slot,) = pool.overdue(1.0)
    slot.reported = True
    pool.add(Job(b"c", "svc", [], None))
    assert pool.next_start(1.0) is None  # no new job to a process that is being killed
    assert pool.finished(0, b"a", 1.1) is None
    assert pool.died(0) is None  # reported as TIMEOUT already
    assert [j.tid for j in pool.pending] == [b"b", b"c"]


def test_dropping_pending_also_drops_jobs_waiting_in_processes() -> None:
    pool = Pool(1, depth=3)
    pool.child_ready(0)
    for tid in (b"a", b"b", b"c", b"d"):
        pool.add(Job(tid, "svc", [], None))
    for _ in range(3):
        pool.next_start(0.0)
    assert pool.drop_pending() == 3  # d waiting in the daemon, b and c in the process's socket
    assert pool.finished(0, b"a", 1.0).tid == b"a"  # type: ignore[union-attr]  # the running one still answers
    assert pool.slots[0].job.cancelled  # type: ignore[union-attr]  # b is next: the daemon kills the process
    assert pool.finished(0, b"b", 1.0) is None  # and an answer for it is dropped
