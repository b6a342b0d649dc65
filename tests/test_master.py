"""The Master client's own guarantees: thread safety of close/submit, callbacks on the I/O
thread, frame limits checked at submit, link drops noticed, status requests matched by id."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from ndpipe import protocol as P
from ndpipe.config import MasterConfig
from ndpipe.errors import BrokerUnreachable, EncodeError, NdpipeError
from ndpipe.master import Master
from ndpipe.transport import LinkWatch
from tests.conftest import STEADY, wait_until

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
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master(window=2) as m:
        c.wait_slots(m, 2)
        outcomes: list[object] = []

        def fan_out(_f: object) -> None:
            for i in range(2):  # the second follow-up finds the window full (the first takes 0.5 s: it cannot
                try:                # have finished and freed its slot in between, however the loop is scheduled)
                    outcomes.append(m.submit("sleep", 0.5, i))
                except NdpipeError as exc:
                    outcomes.append(exc)
            outcomes.append(_status_in_callback(m))

        slow = m.submit("sleep", 1.0, "slow")
        # 0.2 s: still running when the callback is added (a callback added to a finished future runs at
        # once in this thread, outside the loop, where submit waits for a slot instead of refusing)
        fast = m.submit("sleep", 0.2, 1)
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
    c = make_cluster(broker=STEADY)
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

    c = make_cluster(broker=STEADY)
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


class FakeBroker:
    """A bare ROUTER standing in for the broker: answers PING, hands STATUS requests to the test."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.master = b""
        self.seen: set[bytes] = set()

    def next_status(self, timeout: float = 10.0) -> bytes:
        """Serve PINGs until a new STATUS request arrives (resends of known ones are skipped: the
        master resends its requests after any event that may have lost them); return its request id."""
        for _ in range(10_000):
            assert self.sock.poll(int(timeout * 1000)), "no STATUS request from the master"
            ident, header, command, *rest = self.sock.recv_multipart()
            self.master = ident
            assert header == P.MASTER
            if command == P.PING:
                self.sock.send_multipart([ident, P.MASTER, P.PONG, b"s" * 16, (200).to_bytes(4, "big")])
            elif command == P.STATUS and rest[0] not in self.seen:
                self.seen.add(rest[0])
                return rest[0]
        raise AssertionError("no STATUS request among 10,000 messages")

    def reply(self, request: bytes, body: dict[str, Any]) -> None:
        self.sock.send_multipart([self.master, P.MASTER, P.STATUS_REPLY, msgpack.packb(body), request])


@pytest.fixture
def fake_broker() -> Iterator[FakeBroker]:
    ctx = zmq.Context()
    fake = FakeBroker(ctx)
    yield fake
    fake.sock.close(linger=0)
    ctx.term()


def _status_in_thread(m: Master, timeout: float = 10.0) -> Future[Any]:
    out: Future[Any] = Future()

    def run() -> None:
        try:
            out.set_result(m.status(timeout=timeout))
        except Exception as exc:
            out.set_exception(exc)
    threading.Thread(target=run, daemon=True).start()
    return out


def test_status_replies_out_of_order_reach_their_requests(fake_broker: FakeBroker) -> None:
    with Master(fake_broker.endpoint, config=MasterConfig(broker=fake_broker.endpoint)) as m:
        # Given two STATUS requests in flight
        first = _status_in_thread(m)
        r1 = fake_broker.next_status()
        second = _status_in_thread(m)
        r2 = fake_broker.next_status()
        # When the broker answers the second one first
        fake_broker.reply(r2, {"which": 2})
        fake_broker.reply(r1, {"which": 1})
        # Then each reply reaches the request that asked for it
        assert first.result(10) == {"which": 1} and second.result(10) == {"which": 2}
        # Given a request that timed out (its id withdrawn) and a new one in flight
        with pytest.raises(BrokerUnreachable):
            m.status(timeout=0.2)
        late = fake_broker.next_status()
        third = _status_in_thread(m)
        r3 = fake_broker.next_status()
        # When the late reply to the withdrawn request arrives first
        fake_broker.reply(late, {"which": "late"})
        fake_broker.reply(r3, {"which": 3})
        # Then it is dropped, not handed to the request waiting now
        assert third.result(10) == {"which": 3}
