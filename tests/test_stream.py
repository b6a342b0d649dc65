"""Streamed results (issue 10, item 4): a generator's parts arrive as they are made, in order, each
once, with back-pressure; leaving early stops the generator on the worker; a generator that raises
gives its parts then its traceback; a lane lost mid-stream fails the stream, never repeats a part."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ndpipe import protocol as P
from ndpipe.broker.records import task_key
from ndpipe.broker.state import BrokerState
from ndpipe.errors import StreamBroken, TaskFailed
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)


# ---- the broker's state ------------------------------------------------------------------------------
T = task_key(b"m", b"t")  # the broker's id for master m's task t: what its lane sees and answers to


def stream_at_lane(s: BrokerState) -> None:
    host = s.worker_ready(b"w", ["gen"], 1, 0.0, name="w")
    s.lane_ready(b"w", host.key, 0, 0.0, pid=1)
    s.submit(b"m", b"t", "gen", [b"p"], 0.0, flags=P.FLAG_STREAM)
    list(s.dispatch(0.0))


def test_parts_are_forwarded_once_in_order_and_acks_go_to_the_lane() -> None:
    s = BrokerState()
    stream_at_lane(s)
    assert s.part(b"w", T, 0) is not None and s.part(b"w", T, 0) is None  # a repeat: dropped
    assert s.part(b"w", T, 2) is None  # out of order: dropped
    assert s.part(b"stranger", T, 1) is None and s.part(b"w", T, 1) is not None
    task = s.ack(b"m", b"t")
    assert task is not None and task.worker == b"w" and s.ack(b"other", b"t") is None
    assert s.counters["parts"] == 2 and s.counters["dropped"] == 3


def test_a_stream_lost_after_some_parts_fails_instead_of_repeating_them() -> None:
    s = BrokerState()
    stream_at_lane(s)
    s.part(b"w", T, 0)
    s.lane_gone(b"w", 1.0)
    [failure] = s.take_failures()
    assert failure.code == P.STREAM_BROKEN and failure.details["parts"] == 1 and T not in s.tasks


def test_a_stream_lost_before_its_first_part_simply_runs_again() -> None:
    s = BrokerState()
    stream_at_lane(s)
    s.lane_gone(b"w", 1.0)
    assert s.take_failures() == [] and s.tasks[T].state == "queued"


def test_closing_or_leaving_stops_the_stream_at_its_lane() -> None:
    s = BrokerState()
    stream_at_lane(s)
    assert s.cancel(b"m", b"t") and [(lane.wid, tid) for lane, tid in s.take_stops()] == [(b"w", T)]
    assert s.take_cancels() == []  # not the daemon: the lane stops the generator itself, nobody is killed
    stream_at_lane(s)
    s.master_gone(b"m")
    assert [tid for _, tid in s.take_stops()] == [T]


# ---- end to end ----------------------------------------------------------------------------------
def test_parts_arrive_as_they_are_made_in_order(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        t0 = time.monotonic()
        stream = m.stream("counter", 20, seconds=0.05)
        first = next(stream)
        assert first[0] == 0 and time.monotonic() - t0 < 0.5  # not after the whole generator (1 s)
        rest = list(stream)
        assert [p[0] for p in [first, *rest]] == list(range(20)) and stream.future.result(5) == 20
        assert list(m.stream("counter", 0)) == []


def test_a_slow_consumer_holds_the_generator_back(cluster, tmp_short: Path) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        stream = m.stream("counter", 1000, log_dir=cluster.log_dir)
        next(stream)
        time.sleep(0.5)  # the generator could make 1000 parts in this time; the window lets it make ~8
        status = m.status()["counters"]
        assert status["parts"] <= P.STREAM_WINDOW + 1
        stream.close()
        closed = wait_until(lambda: list(Path(cluster.log_dir).glob("*.closed")), 10, "the generator closed")
        made = int(closed[0].read_text().split()[0])
        assert made <= P.STREAM_WINDOW + 2  # stopped on the worker, not run to 1000
        assert m.call("echo", (1,)).result(10) == 1  # its lane serves on (not killed)


def test_leaving_the_loop_early_stops_the_generator(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        for part in m.stream("counter", 10_000, log_dir=cluster.log_dir):
            if part[0] == 3:
                break
        closed = wait_until(lambda: list(Path(cluster.log_dir).glob("*.closed")), 10, "the generator closed")
        assert int(closed[0].read_text().split()[0]) < 100


def test_a_generator_that_raises_gives_its_parts_then_its_traceback(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        got: list[Any] = []
        with pytest.raises(TaskFailed, match="failed at part 3") as err:
            for part in m.stream("counter", 10, fail_at=3):
                got.append(part[0])
        assert got == [0, 1, 2] and "counter" in err.value.remote_traceback
        with pytest.raises(TaskFailed, match="not an iterable"):
            list(m.stream("echo", 1))


def test_a_lane_killed_mid_stream_fails_it_without_repeating_a_part(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        got: list[Any] = []
        with pytest.raises(StreamBroken, match="STREAM_BROKEN") as err:
            for part in m.stream("counter", 50, seconds=0.05):
                got.append(part[0])
                if part[0] == 4:
                    os.kill(part[1], signal.SIGKILL)
        assert got == list(range(len(got))) and len(got) >= 5  # each part once, in order, none missing
        assert err.value.details["parts"] >= 5


# ---- the master's side: gaps and lost acks never go unnoticed ------------------------------------
def stream_state() -> tuple[Any, Any]:
    from concurrent.futures import Future

    from ndpipe.config import MasterConfig
    from ndpipe.master.state import MasterState, Pending
    from ndpipe.master.stream import Stream

    state = MasterState(MasterConfig(), "ipc://x", 0.0)
    future: Future[Any] = Future()
    stream = Stream(future, lambda seq: None)
    import weakref

    state.submit(Pending(b"t", b"gen", P.OPTIONS.pack(0, 0, P.FLAG_STREAM), [b""], future, None,
                         stream=weakref.ref(stream)), 0.0)
    return state, stream


def part(seq: int) -> list[Any]:
    from ndpipe.codec import encode

    return [P.MASTER, P.PART, b"t", seq.to_bytes(4, "big"), *encode(seq)]


def test_a_part_lost_on_the_way_breaks_the_stream_instead_of_leaving_a_hole() -> None:
    state, stream = stream_state()
    state.on_message(part(0), 0.0)
    assert state.on_message(part(2), 0.0) == [[P.MASTER, P.CANCEL, b"t"]]  # part 1 never came
    assert next(stream) == 0
    with pytest.raises(StreamBroken, match="part 1 of the stream was lost"):
        next(stream)


def test_a_stream_that_ends_short_of_its_count_is_broken_and_a_repeat_is_acknowledged() -> None:
    from ndpipe.codec import encode

    state, stream = stream_state()
    state.on_message(part(0), 0.0)
    assert state.on_message(part(0), 0.0) == [[P.MASTER, P.ACK, b"t", (0).to_bytes(4, "big")]]  # a rerun's
    state.on_message([P.MASTER, P.RESULT, b"t", *encode(2)], 0.0)  # it made 2, 1 arrived
    assert next(stream) == 0
    with pytest.raises(StreamBroken, match="made 2 parts but 1 arrived"):
        next(stream)


def test_acks_are_sent_again_when_the_link_comes_back() -> None:
    state, stream = stream_state()
    state.on_message(part(0), 0.0)
    state.on_message(part(1), 0.0)
    next(stream), next(stream)
    sent = state.link_came_back(1.0)
    assert [P.MASTER, P.ACK, b"t", (1).to_bytes(4, "big")] in sent
