"""The Master client's own guarantees: thread safety of close/submit, callbacks on the I/O
thread, frame limits checked at submit, link drops noticed, status requests matched by id."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import zmq

from ndpipe.config import MasterConfig
from ndpipe.errors import EncodeError, NdpipeError
from ndpipe.master import Master
from ndpipe.transport import LinkWatch
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.timeout(60)


def test_close_fails_a_submit_blocked_on_the_window(tmp_short) -> None:  # type: ignore[no-untyped-def]
    # Given a master with a window of 1 and no broker, its window already full
    m = Master(f"ipc://{tmp_short}/nobody", window=1)
    first = m.submit("echo", 1)
    outcome: list[object] = []

    def producer() -> None:
        try:
            outcome.append(m.submit("echo", 2))
        except NdpipeError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=producer)
    thread.start()
    wait_until(lambda: m._slots._value == 0 and thread.is_alive(), what="producer blocked")  # type: ignore[attr-defined]
    # When the master is closed from another thread
    m.close()
    thread.join(10)
    # Then nothing hangs: the first task failed, the blocked submit raised or its future failed
    with pytest.raises(NdpipeError, match="closed"):
        first.result(timeout=5)
    assert not thread.is_alive() and len(outcome) == 1
    if not isinstance(outcome[0], NdpipeError):
        with pytest.raises(NdpipeError):
            outcome[0].result(timeout=5)  # type: ignore[attr-defined]
    with pytest.raises(NdpipeError, match="closed"):
        m.submit("echo", 3)
    m.close()  # idempotent


def test_callback_cannot_deadlock_on_a_full_window(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=FAST)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master(window=2) as m:
        c.wait_slots(m, 2)
        outcomes: list[object] = []

        def fan_out(_f: object) -> None:
            for i in range(2):  # the second follow-up finds the window full
                try:
                    outcomes.append(m.submit("echo", i))
                except NdpipeError as exc:
                    outcomes.append(exc)
            outcomes.append(_status_in_callback(m))

        slow = m.submit("sleep", 1.0, "slow")
        fast = m.submit("echo", 1)
        fast.add_done_callback(fan_out)
        assert fast.result(timeout=20) == 1
        wait_until(lambda: len(outcomes) == 3, what="the callback to finish")
        follow_up, refused, status_refused = outcomes
        assert follow_up.result(timeout=20) == 0  # type: ignore[attr-defined]
        assert isinstance(refused, NdpipeError) and "callback" in str(refused)
        assert isinstance(status_refused, NdpipeError) and "callback" in str(status_refused)
        assert slow.result(timeout=20) == "slow"
        assert m.submit("echo", 2).result(timeout=20) == 2  # the I/O thread is alive


def _status_in_callback(m: Master) -> BaseException:
    try:
        m.status()
    except NdpipeError as exc:
        return exc
    return AssertionError("status() inside a callback should refuse")


def test_oversized_arguments_are_refused_at_submit(tmp_short) -> None:  # type: ignore[no-untyped-def]
    cfg = MasterConfig(max_frame_bytes=1 << 20, max_frames=2)
    with Master(f"ipc://{tmp_short}/nobody", config=cfg) as m:
        with pytest.raises(EncodeError, match="max_frame_bytes"):
            m.submit("echo", np.zeros(1 << 18))  # 2 MiB
        with pytest.raises(EncodeError, match="max_frames"):
            m.submit("echo", *[np.zeros(10_000) for _ in range(3)])


def test_link_watch_sees_a_drop_and_the_return() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RECONNECT_IVL, 20)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    watch = LinkWatch(dealer)
    try:
        dealer.send(b"hello")
        assert router.poll(5000)
        router.recv_multipart()
        assert not watch.came_back()  # the first handshake is not a return
        router.close(linger=0)  # the peer goes away…
        wait_until(lambda: watch.came_back() or watch.dropped, what="disconnect seen")
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"tcp://127.0.0.1:{port}")  # …and comes back on the same address
        wait_until(watch.came_back, what="reconnect seen")
    finally:
        watch.close()
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_status_replies_are_matched_to_their_requests(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=FAST)
    c.start_broker()
    with c.master() as m:
        results: list[dict[str, object]] = []
        threads = [threading.Thread(target=lambda: results.append(m.status())) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(results) == 8 and all("services" in r for r in results)


def test_no_submission_waits_for_a_ping_to_be_sent(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Given a master whose I/O thread wakes for pings only every 20 s: every submit must wake it itself
    c = make_cluster(broker={"heartbeat_interval": 20.0}, master={"heartbeat_interval": 20.0})
    c.start_broker()
    c.start_worker(processes=2)
    with c.master(window=4) as m:
        c.wait_slots(m, 2)
        for _round in range(5):
            # When bursts from several threads alternate with lone calls (the pattern that once left
            # the wake-up flag set with an empty pipe: every later call waited for the next ping)
            assert sum(1 for _ in m.map("echo", (i for i in range(200)))) == 200
            threads = [threading.Thread(target=lambda: [m.submit("echo", k).result(timeout=10) for k in range(50)])
                       for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            # Then each lone call is answered long before the next ping
            for k in range(10):
                assert m.submit("echo", k).result(timeout=10) == k


def test_finished_tasks_leave_no_reference_cycles(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Cyclic garbage per task (a future whose callback closes over its own record) costs nothing at
    # first and then a full GC pass over the whole heap: a 5x slower map right after a big submit.
    import gc

    c = make_cluster(broker=FAST)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
        m.submit("echo", 0).result(timeout=10)
        gc.collect()
        gc.disable()
        try:
            futures = [m.submit("echo", k) for k in range(300)]
            assert [f.result(timeout=30) for f in futures] == list(range(300))
            del futures
            assert list(m.map("echo", range(300), chunksize=30)) == list(range(300))
            unreachable = gc.collect()
        finally:
            gc.enable()
        assert unreachable < 100, f"{unreachable} objects in reference cycles after 600 calls"
