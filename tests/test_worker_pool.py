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
