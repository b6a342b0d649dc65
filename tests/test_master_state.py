"""MasterState, the master's decisions without a socket: time is passed in, messages come out."""

from __future__ import annotations

import os
from concurrent.futures import Future
from typing import Any

import msgpack
import pytest

from ndpipe import protocol as P
from ndpipe.codec import encode
from ndpipe.config import MasterConfig
from ndpipe.errors import BrokerUnreachable, ProtocolError, TaskFailed, TaskTimeout
from ndpipe.master.state import Frames, MasterState, Pending

pytestmark = pytest.mark.timeout(30)

CFG = MasterConfig(heartbeat_interval=1.0, liveness=3, broker_timeout=10.0)
S1, S2 = b"s" * 16, b"t" * 16


def task(tid: bytes, deadline: float | None = None, timeout_ms: int = 0) -> Pending:
    return Pending(tid, b"echo", P.OPTIONS.pack(timeout_ms, 0, 0), [b"\x90"], Future(), deadline)


def pong(session: bytes, interval_ms: int = 1000) -> Frames:
    return [P.MASTER, P.PONG, session, interval_ms.to_bytes(4, "big")]


def result(tid: bytes, value: Any) -> Frames:
    return [P.MASTER, P.RESULT, tid, *encode(value)]


def submitted(out: list[Frames]) -> list[bytes]:
    return [frames[3] for frames in out if frames[1] == P.SUBMIT]


@pytest.fixture
def state() -> MasterState:
    s = MasterState(CFG, "ipc://test", now=0.0)
    assert s.on_message(pong(S1), 0.0) == []  # the session is known
    return s


def test_an_answer_resolves_its_task_once_and_a_second_is_counted_late(state: MasterState) -> None:
    t = task(b"a")
    assert submitted(state.submit(t, 0.1)) == [b"a"]
    state.on_message(result(b"a", 42), 0.2)
    state.on_message(result(b"a", 43), 0.3)
    assert t.future.result(0) == 42 and state.counters["late_answers"] == 1 and not state.pending


def test_tasks_submitted_before_the_first_pong_are_not_sent_twice() -> None:
    s = MasterState(CFG, "ipc://test", now=0.0)
    assert submitted(s.submit(task(b"a"), 0.0) + s.submit(task(b"b"), 0.0)) == [b"a", b"b"]
    assert submitted(s.on_message(pong(S1), 0.5)) == []
    assert s.counters["resends"] == 0


def test_a_new_session_resends_every_outstanding_task_once(state: MasterState) -> None:
    state.submit(task(b"a"), 0.1)
    state.submit(task(b"b"), 0.1)
    state.on_message(result(b"a", 1), 0.2)
    assert submitted(state.on_message(pong(S1), 1.0)) == []  # the same broker: nothing lost
    assert submitted(state.on_message(pong(S2), 2.0)) == [b"b"]
    assert submitted(state.on_message(pong(S2), 3.0)) == []


def test_link_return_resends_at_the_next_pong_only(state: MasterState) -> None:
    state.submit(task(b"a"), 0.1)
    assert state.link_came_back(1.0) == [[P.MASTER, P.PING]]
    assert submitted(state.on_message(pong(S1), 1.1)) == [b"a"]  # the same broker, but messages were lost
    assert submitted(state.on_message(pong(S1), 2.0)) == []


def test_link_return_and_new_session_together_are_one_resend(state: MasterState) -> None:
    state.submit(task(b"a"), 0.1)
    assert state.link_came_back(1.0) == [[P.MASTER, P.PING]]
    assert submitted(state.on_message(pong(S2), 1.1)) == [b"a"]  # a restarted broker: both events, one resend
    assert submitted(state.on_message(pong(S2), 2.0)) == []
    assert state.counters["resends"] == 1


def test_silence_asks_for_a_new_socket_and_a_resend_at_the_next_pong(state: MasterState) -> None:
    state.submit(task(b"a"), 0.1)
    tick = state.tick(1.0)
    assert not tick.reconnect and tick.send == [[P.MASTER, P.PING]]
    assert not state.tick(2.0).reconnect and not state.tick(3.0).reconnect  # 3 s of silence: not yet over
    tick = state.tick(4.0)  # over liveness × interval
    assert tick.reconnect and tick.send == [[P.MASTER, P.PING]]
    assert not state.tick(5.0).reconnect  # the new socket gets a full liveness period
    assert submitted(state.on_message(pong(S1), 5.5)) == [b"a"]  # same session, but messages may be lost


def test_broker_unreachable_for_broker_timeout_fails_everything(state: MasterState) -> None:
    t = task(b"a")
    state.submit(t, 0.1)
    request: Future[dict[str, Any]] = Future()
    state.status(b"r", request)
    now = 1.0
    while not t.future.done() and now < 30:
        state.tick(now)
        now += 1.0
    assert isinstance(t.future.exception(0), BrokerUnreachable) and 10 < now < 20
    assert isinstance(request.exception(0), BrokerUnreachable)


def test_deadline_fails_the_task_and_cancels_it_at_the_broker(state: MasterState) -> None:
    late, answered = task(b"a", deadline=2.0, timeout_ms=2000), task(b"b", deadline=2.0, timeout_ms=2000)
    out = state.submit(late, 0.5) + state.submit(answered, 0.5)
    assert [P.OPTIONS.unpack(f[4])[0] for f in out] == [1500, 1500]  # what is left, not the original
    state.tick(0.5)  # the first PING
    state.on_message(result(b"b", 1), 1.0)
    assert state.next_wake() == 1.5  # the next PING comes before the deadline
    state.tick(1.5)
    assert state.next_wake() == 2.0
    tick = state.tick(2.0)
    assert [P.MASTER, P.CANCEL, b"a"] in tick.send and [P.MASTER, P.CANCEL, b"b"] not in tick.send
    assert isinstance(late.future.exception(0), TaskTimeout) and answered.future.result(0) == 1


def test_status_replies_reach_their_own_request_and_a_withdrawn_one_is_dropped(state: MasterState) -> None:
    first: Future[dict[str, Any]] = Future()
    second: Future[dict[str, Any]] = Future()
    gone: Future[dict[str, Any]] = Future()
    for request, future in ((b"1", first), (b"2", second), (b"3", gone)):
        assert state.status(request, future) == [[P.MASTER, P.STATUS, request]]
    state.status_withdrawn(b"3")
    for request, n in ((b"3", 3), (b"2", 2), (b"1", 1)):
        state.on_message([P.MASTER, P.STATUS_REPLY, msgpack.packb({"n": n}), request], 1.0)
    assert first.result(0) == {"n": 1} and second.result(0) == {"n": 2} and not gone.done()


def test_error_details_that_are_not_a_map_still_fail_the_task(state: MasterState) -> None:
    t = task(b"a")
    state.submit(t, 0.1)
    state.on_message([P.MASTER, P.ERROR, b"a", b"HANDLER_ERROR", b"\xc1"], 0.2)
    exc = t.future.exception(0)
    assert isinstance(exc, TaskFailed) and "undecodable error details" in str(exc)


def test_a_cancelled_task_is_cancelled_at_the_broker_once(state: MasterState) -> None:
    state.submit(task(b"a"), 0.1)
    assert state.cancel(b"a") == [[P.MASTER, P.CANCEL, b"a"]]
    assert state.cancel(b"a") == []
    assert submitted(state.on_message(pong(S2), 1.0)) == []  # not resent either


def test_malformed_messages_raise_protocol_error(state: MasterState) -> None:
    for frames in ([P.MASTER], [b"NDPW02", P.RESULT, b"a", b"x"], [P.MASTER, b"\x7f"], [P.MASTER, P.PONG, S1]):
        with pytest.raises(ProtocolError):
            state.on_message(frames, 1.0)


def test_a_master_that_cannot_connect_says_why() -> None:
    from ndpipe.errors import NdpipeError
    from ndpipe.master import Master

    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(NdpipeError, match="cannot start: .*"):
        Master("tcp://no-port-here")
    assert len(os.listdir("/proc/self/fd")) == fds  # its wake-up pipe closed, its context released
