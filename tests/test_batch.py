"""Master.map's batches (FLAG_BATCH): many calls per message, one outcome per call, and a batch
that fails as a whole (timeout, crash, results too large) split so only the culprit call fails."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zmq

from ndpipe import protocol as P
from ndpipe.codec import batch_length, decode_batch, decode_outcomes, encode, encode_batch, encode_call
from ndpipe.errors import DecodeError, TaskCrashed, TaskFailed, TaskTimeout
from ndpipe.transport import unpack_map
from tests.conftest import STEADY

pytestmark = pytest.mark.timeout(90)


# ---- codec ----------------------------------------------------------------------------------------
def test_batch_round_trip_and_length_from_the_header_alone() -> None:
    big = np.arange(20_000, dtype=np.float64)  # out-of-band: buffer indexes shared by the batch
    for n in (1, 15, 16, 65_535, 65_536):
        calls = [(i,) for i in range(n)] if n < 100 else [()] * n
        frames = encode_batch(calls, {"k": 1})
        assert batch_length(frames[0]) == n
    frames = encode_batch([(1, big), (2, big * 2)], {"scale": 3})
    calls, kwargs = decode_batch(frames)
    assert kwargs == {"scale": 3} and [c[0] for c in calls] == [1, 2]
    np.testing.assert_array_equal(calls[1][1], big * 2)
    assert batch_length(encode_call([1, 2, 3], {})[0]) == 3  # a plain call reads as its arg count...
    assert batch_length(b"") == 0 and batch_length(b"\xc0") == 0  # ...and garbage reads as 0


@pytest.mark.parametrize(("value", "problem"), [
    ([[], {}], "no calls"),
    ([[1, [2]], {}], "batch call 0: args must be a list"),
    ({"a": 1}, "call payload must be"),
])
def test_hostile_batches_are_refused_with_the_reason(value: object, problem: str) -> None:
    with pytest.raises(DecodeError, match=problem):
        decode_batch(encode(value))


@pytest.mark.parametrize(("value", "problem"), [
    ([[1, 2], {}], "holds 2 values for 3 calls"),
    ([[1, 2, 3], {5: ["X", {}]}], "bad error entry 5"),
    ([[1, 2, 3], {0: "oops"}], "bad error entry 0"),
    ([[1, 2, 3]], "must be \\[values list, errors map\\]"),
])
def test_hostile_batch_results_are_refused(value: object, problem: str) -> None:
    with pytest.raises(DecodeError, match=problem):
        decode_outcomes(encode(value), 3)


# ---- through a cluster --------------------------------------------------------------------------------
def test_map_batches_tiny_calls_and_keeps_order(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
        n = 5000
        assert list(m.map("echo", range(n))) == list(range(n))
        submitted = m.status()["counters"]["submitted"]
        assert submitted < n / 10, f"{submitted} tasks for {n} calls: map did not batch"
        # a generator has no length: one call per task unless chunksize says otherwise
        assert list(m.map("echo", (i for i in range(50)))) == list(range(50))
        assert list(m.map("echo", (i for i in range(50)), chunksize=7)) == list(range(50))
        assert list(m.map("echo", [], chunksize=4)) == []
        with pytest.raises(ValueError, match="chunksize"):
            m.map("echo", [1], chunksize=0)


def test_one_raising_call_fails_alone_with_its_remote_traceback(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
        results = m.map("reciprocal", [1, 2, 0, 4], chunksize=4)
        assert [next(results), next(results)] == [1.0, 0.5]  # the calls before the bad one arrive
        with pytest.raises(TaskFailed, match="map item 2") as info:
            next(results)
        assert info.value.remote_type == "builtins.ZeroDivisionError"
        assert "reciprocal" in info.value.remote_traceback


def test_a_crashing_call_is_isolated_and_the_rest_of_its_batch_completes(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker={**STEADY, "max_attempts": 2})
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
        results = m.map("crash_on", range(6), itertools.repeat(3), chunksize=6)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(TaskCrashed):
            next(results)
        # the pool recovered: the next batch runs
        assert list(m.map("echo", range(100), chunksize=50)) == list(range(100))


def test_service_timeout_is_per_call_and_a_hung_call_times_out_alone(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2, service="hang")
        # "hang" has timeout 0.5 s per call: 4 calls of 0.3 s in one batch (1.2 s) are fine
        assert list(m.map("hang", [0.3] * 4, range(4), chunksize=4)) == [0, 1, 2, 3]
        # one call of 30 s: the batch times out, its calls rerun alone, only that one fails
        results = m.map("hang", [0.05, 30, 0.05], range(3), chunksize=3)
        assert next(results) == 0
        with pytest.raises(TaskTimeout):
            next(results)


def test_large_arrays_are_split_out_of_batches(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
        arrays = [np.full(700_000, i, dtype=np.float64) for i in range(4)]  # 5.6 MB each
        out = list(m.map("echo", arrays, chunksize=4))
        for a, b in zip(arrays, out, strict=True):
            np.testing.assert_array_equal(a, b)
            assert b.flags.writeable


def test_hostile_batch_submissions_get_bad_request(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(c.frontend)
    try:
        not_a_batch = encode_call([1], {})
        sock.send_multipart([P.MASTER, P.SUBMIT, b"echo", b"nb", P.OPTIONS.pack(0, 0, P.FLAG_BATCH), *not_a_batch])
        sock.send_multipart([P.MASTER, P.SUBMIT, b"echo", b"fl", P.OPTIONS.pack(0, 0, 0x8000), b"x"])
        replies = {}
        while len(replies) < 2:
            assert sock.poll(20_000), f"no reply; got {sorted(replies)}"
            frames = sock.recv_multipart()
            if frames[1] == P.ERROR:
                replies[frames[2]] = (frames[3].decode(), unpack_map(frames[4])["message"])
        assert replies[b"fl"][0] == P.BAD_REQUEST and "unknown task flags 0x8000" in replies[b"fl"][1]
        assert replies[b"nb"][0] == P.BAD_REQUEST and "batch call 0: args must be a list" in replies[b"nb"][1]
    finally:
        sock.close()


def test_a_result_over_the_frame_limit_fails_alone_instead_of_cutting_the_link(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Given workers that may send frames of at most 1 MiB (libzmq cuts a link on a bigger one)
    c = make_cluster(broker=STEADY, worker={"max_frame_bytes": 1 << 20})
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
        # When a small call returns 8 MB, alone or inside a batch
        with pytest.raises(TaskFailed, match="exceeds worker.max_frame_bytes"):
            m.submit("zeros", 1_000_000).result(timeout=30)
        results = m.map("zeros", [10, 1_000_000, 10], chunksize=3)
        assert len(next(results)) == 10
        with pytest.raises(TaskFailed, match="max_frame_bytes"):
            next(results)
        # Then the worker kept its link and its registration: it still serves
        assert m.status()["counters"]["requeued"] == 0
        assert list(m.map("echo", range(10), chunksize=5)) == list(range(10))
