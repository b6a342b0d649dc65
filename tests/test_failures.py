"""Faults with real processes: every result correct and delivered exactly once, or a clear error."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest
import zmq

from ndpipe import protocol as P
from ndpipe.codec import encode_call
from ndpipe.errors import TaskCrashed
from tests.conftest import FAST, STEADY, kill9, wait_until

pytestmark = pytest.mark.timeout(120)


def test_compute_process_killed_mid_task_runs_elsewhere(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Given one worker with two compute processes and a job of slow tasks
    c = make_cluster(broker=STEADY)  # a killed process is seen through its sentinel, not a heartbeat
    c.start_broker()
    w = c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
        futs = [m.submit("sleep", 0.3, i) for i in range(20)]
        # When a compute process is killed with SIGKILL while it runs a task
        wait_until(lambda: m.status()["workers"][0]["stats"].get("running") == 2, what="tasks running")
        victim = c.lane_pids(w)[0]
        kill9(victim)
        # Then every task completes exactly once with the right value, and one was requeued
        assert [f.result(timeout=60) for f in futs] == list(range(20))
        assert m.status()["counters"]["requeued"] >= 1
        assert victim not in c.lane_pids(w) and len(c.lane_pids(w)) == 2  # replaced


@contextmanager
def job_on_two_workers(make_cluster):  # type: ignore[no-untyped-def]
    """Two workers × 2 processes, 40 sleep tasks submitted, all four slots busy."""
    c = make_cluster(broker=FAST)
    c.start_broker()
    w1 = c.start_worker(processes=2)
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 4, service="sleep")
        futs = [m.submit("sleep", 0.2, i) for i in range(40)]
        wait_until(lambda: m.status()["services"]["sleep"]["inflight"] == 4, what="tasks in flight")
        yield c, w1, m, futs


def test_worker_daemon_killed_tasks_finish_on_other_worker(make_cluster) -> None:  # type: ignore[no-untyped-def]
    with job_on_two_workers(make_cluster) as (_c, w1, m, futs):
        kill9(w1.pid)
        assert [f.result(timeout=60) for f in futs] == list(range(40))
        status = m.status()
        assert len(status["workers"]) == 1 and status["counters"]["requeued"] >= 1


def test_frozen_worker_tasks_finish_before_it_resumes(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Given two workers running a job of slow tasks, When one is frozen whole (SIGSTOP: the daemon and
    # its compute processes, as a hung VM or a cut-off host would be)
    with job_on_two_workers(make_cluster) as (c, w1, m, futs):
        frozen = [w1.pid, *c.lane_pids(w1)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            # Then the broker declares it dead and the whole job finishes while it is still stopped:
            # the tasks it held ran elsewhere (its own late answers cannot have completed them)
            assert [f.result(timeout=60) for f in futs] == list(range(40))
            status = m.status()
            assert status["counters"]["requeued"] >= 1 and len(status["workers"]) == 1
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        # And after SIGCONT it registers again
        wait_until(lambda: len(m.status()["workers"]) == 2, 30, "the frozen worker back")


def test_worker_stopped_gracefully_mid_job(make_cluster) -> None:  # type: ignore[no-untyped-def]
    with job_on_two_workers(make_cluster) as (c, w1, m, futs):
        w1.send_signal(signal.SIGTERM)
        assert w1.wait(30) == 0  # it finished its running tasks and left cleanly
        assert [f.result(timeout=60) for f in futs] == list(range(40))
        assert m.status()["counters"]["failed"] == 0
    assert "disconnected; 0 tasks handed back" in c.logs()  # it said goodbye, it was not timed out


def test_broker_killed_and_restarted_mid_job(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=FAST, master={"heartbeat_interval": 0.2})
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2, service="sleep")
        futs = [m.submit("sleep", 0.05, i) for i in range(100)]
        wait_until(lambda: sum(f.done() for f in futs) >= 10, what="some results")
        kill9(c.broker.pid)  # type: ignore[union-attr]
        c.broker.wait(10)  # type: ignore[union-attr]
        time.sleep(0.5)  # a real outage: the broker is away for a while
        c.start_broker()
        results = [f.result(timeout=60) for f in futs]
        assert results == list(range(100))  # each exactly once, in the right future


def test_resend_of_a_running_task_runs_it_once(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """A master resends every outstanding task after a link or session change; the broker must drop a
    resend of a task it is running, not queue it again. With one compute process the order of replies
    proves it without waiting: a second copy of X would run, and answer, before Y."""
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=1)
    ctx = zmq.Context()
    front = ctx.socket(zmq.DEALER)
    front.linger = 0
    try:
        with c.master() as m:
            c.wait_slots(m, 1, service="sleep")
            front.setsockopt(zmq.ROUTING_ID, b"raw-master")  # PROTOCOL.md §2: a master sets its own id
            front.connect(c.frontend)
            options = P.OPTIONS.pack(0, 0, 0)
            front.send_multipart([P.MASTER, P.SUBMIT, b"sleep", b"task-X", options, *encode_call([1.0, "x"], {})])
            wait_until(lambda: m.status()["workers"][0]["stats"].get("running") == 1, what="task X running")
            front.send_multipart([P.MASTER, P.SUBMIT, b"sleep", b"task-X", options, *encode_call([1.0, "x"], {})])
            front.send_multipart([P.MASTER, P.SUBMIT, b"sleep", b"task-Y", options, *encode_call([0.0, "y"], {})])
            answered: list[bytes] = []
            deadline = time.monotonic() + 30
            while b"task-Y" not in answered and time.monotonic() < deadline:
                if not front.poll(500):
                    front.send_multipart([P.MASTER, P.PING])  # stay known to the broker under load
                    continue
                frames = front.recv_multipart()
                if frames[1] != P.PONG:
                    assert frames[1] == P.RESULT, frames
                    answered.append(frames[2])
            assert answered == [b"task-X", b"task-Y"]
            assert m.status()["counters"]["duplicates"] == 1
    finally:
        front.close(linger=0)
        ctx.term()


def test_crashing_handler_fails_after_max_attempts(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker={**STEADY, "max_attempts": 3})
    c.start_broker()
    w = c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2, service="crash")
        with pytest.raises(TaskCrashed, match="3 of 3 attempts"):
            m.submit("crash").result(timeout=60)
        # the pool recovers: both compute processes are back and serve
        wait_until(lambda: len(c.lane_pids(w)) == 2, what="compute processes replaced")
        assert list(m.map("echo", range(20))) == list(range(20))
        assert w.poll() is None


def test_master_reports_unreachable_broker(make_cluster) -> None:  # type: ignore[no-untyped-def]
    from ndpipe.errors import BrokerUnreachable

    c = make_cluster(master={"heartbeat_interval": 0.1, "liveness": 2, "broker_timeout": 0.5})
    with c.master() as m:  # no broker was started
        with pytest.raises(BrokerUnreachable, match="broker_timeout"):
            m.submit("echo", 1).result(timeout=30)


def test_pool_survives_worker_restart_of_compute_processes(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=FAST)
    c.start_broker()
    w = c.start_worker(processes=1)
    with c.master() as m:
        c.wait_slots(m, 1)
        for _ in range(3):
            pid = m.submit("pid").result(timeout=30)
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pid: c.lane_pids(w) and p not in c.lane_pids(w), what="replacement")
        assert m.submit("echo", "alive").result(timeout=30) == "alive"


def test_busy_worker_keeps_heartbeating(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Given liveness of 1 s, When a handler holds the GIL in a Python loop for 2.5 s (one of the two
    # cores, so that the daemon's heartbeat depends on the design, not on how loaded CI is)
    c = make_cluster(broker={"heartbeat_interval": 0.2, "liveness": 5})
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2, service="spin")
        futs = [m.submit("spin", 2.5)]
        assert all(f.result(timeout=30) > 0 for f in futs)
        # Then the worker was never declared dead and nothing ran twice
        status = m.status()
        assert status["counters"]["requeued"] == 0 and len(status["workers"]) == 1


def test_killed_master_loses_its_queued_tasks(make_cluster, tmp_short) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    c = make_cluster(broker=FAST)
    c.start_broker()
    script = tmp_short / "m.py"
    script.write_text(
        "import sys\nfrom ndpipe import Master\n"
        "with Master(sys.argv[1]) as m:\n"
        "    futs = [m.submit('nobody', i) for i in range(500)]\n"
        "    print('submitted', flush=True)\n"
        "    futs[0].result()\n")
    with subprocess.Popen([sys.executable, str(script), c.frontend], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
            with c.master() as m:
                wait_until(lambda: m.status()["services"].get("nobody", {}).get("queued") == 500, what="queued")
                kill9(proc.pid)
                wait_until(lambda: m.status()["tasks"] == 0, timeout=10, what="broker to drop the dead master's tasks")
        finally:
            proc.kill()
            proc.wait(10)


def test_small_job_is_not_starved_by_a_big_one(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=FAST)
    c.start_broker()
    c.start_worker(processes=1)
    with c.master() as big, c.master() as small:
        c.wait_slots(big, 1, service="sleep")
        big_futs = [big.submit("sleep", 0.01, i) for i in range(300)]
        wait_until(lambda: big.status()["services"]["sleep"]["queued"] > 250, what="big job queued")
        small_futs = [small.submit("sleep", 0.01, i) for i in range(5)]
        assert [f.result(timeout=30) for f in small_futs] == list(range(5))
        # the small job finished while most of the big one was still waiting
        assert sum(f.done() for f in big_futs) < 100
        assert [f.result(timeout=60) for f in big_futs] == list(range(300))


def test_stopping_worker_hands_back_what_it_cannot_finish(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Given workers that wait at most 0.3 s for running tasks when stopped
    c = make_cluster(broker={**FAST, "max_attempts": 1}, worker={"drain_timeout": 0.3})
    c.start_broker()
    w1 = c.start_worker(processes=1)
    c.start_worker(processes=1)
    with c.master() as m:
        c.wait_slots(m, 2, service="sleep")
        futs = [m.submit("sleep", 1.5, i) for i in range(2)]
        wait_until(lambda: all(w["stats"].get("running") == 1 for w in m.status()["workers"]), what="both running")
        # When one is stopped mid-task
        w1.send_signal(signal.SIGTERM)
        assert w1.wait(30) == 0
        # Then its task is handed back and reruns elsewhere; with max_attempts 1 that proves
        # a hand-back does not count as a failed attempt
        assert [f.result(timeout=30) for f in futs] == [0, 1]
    assert "disconnected; 1 tasks handed back" in c.logs()
