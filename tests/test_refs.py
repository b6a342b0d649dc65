"""Arrays sent once (issue 10, item 2): ``Master.put`` refs, the codec's ref map, the host cache, the
broker's fetch routing, and end to end through a cluster: bytes moved once per host, read-only
arrays in handlers, clear errors for refs that cannot be had."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest

from ndpipe import protocol as P
from ndpipe.broker.records import task_key
from ndpipe.broker.state import BrokerState
from ndpipe.codec import decode, decode_call, encode_call
from ndpipe.config import MasterConfig
from ndpipe.errors import BadRequest, DecodeError, EncodeError
from ndpipe.master.state import MasterState
from ndpipe.refs import Ref, make_ref, parse_meta, raw_bytes
from ndpipe.worker.cache import Fetches, RefCache
from tests.conftest import STEADY

pytestmark = pytest.mark.timeout(120)


# ---- refs and the codec ----------------------------------------------------------------------------
def test_a_ref_names_content_and_description() -> None:
    a = np.arange(12.0).reshape(3, 4)
    ref, kept = make_ref(a)
    assert make_ref(a.copy())[0] == ref  # same content, same ref
    assert make_ref(a.astype(np.float32))[0].digest != ref.digest
    assert make_ref(a.reshape(4, 3))[0].digest != ref.digest  # same bytes, another shape
    a[0, 0] = 99.0  # the master keeps its own copy: the ref still names what was put
    assert kept[0, 0] == 0.0 and not kept.flags.writeable
    assert parse_meta(ref.meta()) == ("<f8", (3, 4), False) and ref.nbytes == 96
    f = np.asfortranarray(np.arange(6).reshape(2, 3))
    fref, fkept = make_ref(f)
    assert fref.fortran and bytes(raw_bytes(fkept)) == f.tobytes(order="F")
    with pytest.raises(EncodeError, match="numeric or bool"):
        make_ref(np.array(["a", "b"]))


def test_a_ref_travels_as_a_small_map_and_only_a_resolver_turns_it_into_an_array() -> None:
    ref, kept = make_ref(np.ones((512, 512)))  # 2 MiB
    frames = encode_call([{"w": [ref]}], {"k": ref})
    assert len(frames) == 1 and len(frames[0]) < 200
    with pytest.raises(DecodeError, match="resolved only by a worker"):
        decode_call(frames)
    seen: list[Ref] = []
    args, kwargs = decode_call(frames, refs=lambda r: seen.append(r) or kept)
    assert args[0]["w"][0] is kept and kwargs["k"] is kept and seen == [ref, ref]


@pytest.mark.parametrize("bad, why", [
    ({b"ref": b"short"}, "16-octet digest"),
    ({b"ref": b"d" * 16, b"data": b"\0" * 8}, "must not carry data"),
    ({b"ref": b"d" * 16, b"shape": [-1]}, "shape"),
])
def test_a_malformed_ref_map_is_a_decode_error(bad: dict[bytes, object], why: str) -> None:
    import msgpack

    ref_map = {b"nd": True, b"type": "<f8", b"kind": b"", b"shape": [1], **bad}
    with pytest.raises(DecodeError, match=why):
        decode([msgpack.packb(ref_map, use_bin_type=True)], refs=lambda r: None)


# ---- the host cache ----------------------------------------------------------------------------------
def ref_bytes(n: int, seed: int = 0) -> tuple[Ref, bytes, memoryview]:
    ref, kept = make_ref(np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8))
    return ref, ref.meta(), raw_bytes(kept)


def test_the_cache_keeps_checked_bytes_sealed_and_evicts_least_recently_used() -> None:
    cache = RefCache(limit=3 * 1000)
    a, b, c = (ref_bytes(1000, seed) for seed in range(3))
    entry_a, _ = cache.admit(a[0].digest, a[1], a[2])  # type: ignore[misc]
    cache.admit(b[0].digest, b[1], b[2])
    assert cache.admit(c[0].digest, b[1], b[2]) == "the bytes received do not hash to the ref's digest (refused)"
    cache.admit(c[0].digest, c[1], c[2])
    assert cache.get(a[0].digest) is entry_a  # a is now the most recently used
    d = ref_bytes(1000, 3)
    _entry, evicted = cache.admit(d[0].digest, d[1], d[2])  # type: ignore[misc]
    assert evicted == [b[0].digest] and cache.used == 3000
    seals = fcntl.fcntl(entry_a.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and os.pread(entry_a.fd, 1000, 0) == bytes(a[2])
    with pytest.raises(PermissionError):
        os.pwrite(entry_a.fd, b"x", 0)
    big = ref_bytes(4000)
    assert "exceed worker.cache_bytes = 3000" in str(cache.admit(big[0].digest, big[1], big[2]))
    cache.close()
    assert cache.used == 0


def test_one_fetch_per_digest_in_flight_and_each_waiter_answered() -> None:
    f = Fetches(timeout=10.0)
    assert f.want(b"d" * 16, b"t1", "lane0", now=0.0) is True
    assert f.want(b"d" * 16, b"t2", "lane1", now=1.0) is False
    assert f.next_expiry() == 10.0 and f.expired(9.0) == []
    assert f.done(b"d" * 16) == ["lane0", "lane1"] and f.done(b"d" * 16) == []
    f.want(b"e" * 16, b"t", "lane0", now=0.0)
    assert f.expired(10.0) == [(b"e" * 16, ["lane0"])]


# ---- the broker routes a fetch to the task's master, for the task's holder only -------------------
def test_the_broker_asks_the_tasks_master_for_the_tasks_holder_only() -> None:
    s = BrokerState()
    host = s.worker_ready(b"d", ["svc"], 1, 0.0, lanes=1, name="w")
    s.lane_ready(b"l", host.key, 0, 0.0, pid=1)
    s.submit(b"m", b"t", "svc", [b"x"], 0.0)
    T = task_key(b"m", b"t")  # what the worker knows the task by
    assert s.fetch(b"d", T, b"g" * 16, 0.0) == "the task is not in flight at this worker"  # still queued
    list(s.dispatch(0.0))
    assert s.fetch(b"stranger", T, b"g" * 16, 0.0) == "the task is not in flight at this worker"
    master, request = s.fetch(b"d", T, b"g" * 16, 0.0)  # type: ignore[misc]
    assert master == b"m"
    assert s.fetched(request, b"h" * 16, 10) is None  # DATA for another digest
    assert s.fetched(request, b"g" * 16, 10) == b"d" and s.counters["fetched_bytes"] == 10
    assert s.fetched(request, b"g" * 16, 10) is None  # answered once
    _m, late = s.fetch(b"l", T, b"g" * 16, 0.0)  # type: ignore[misc]
    s.fetch(b"d", T, b"i" * 16, P.FETCH_TIMEOUT + 1)  # entries past their time are forgotten
    assert s.fetched(late, b"g" * 16, 1) is None
    s.master_gone(b"m")
    assert s.fetch(b"d", T, b"g" * 16, 0.0) == "the task's master is gone"


def test_the_master_serves_what_it_put_and_says_why_not_otherwise() -> None:
    state = MasterState(MasterConfig(), "ipc://x", 0.0)
    ref, kept = make_ref(np.arange(4.0))
    state.put(ref.digest, ref.meta(), kept)
    [data] = state.on_message([P.MASTER, P.FETCH, b"r1", ref.digest], 0.0)
    assert data[:5] == [P.MASTER, P.DATA, b"r1", ref.digest, ref.meta()] and bytes(data[5]) == kept.tobytes()
    state.release(ref.digest)
    [gone] = state.on_message([P.MASTER, P.FETCH, b"r2", ref.digest], 0.0)
    assert gone[4] == b"" and b"does not hold it" in gone[5]
    assert state.counters["fetches"] == 2


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture
def two_hosts(make_cluster):  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY, worker={"cache_bytes": 24 << 20})
    c.start_broker()
    c.start_worker(processes=2)
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 4)
    return c


def test_tasks_sharing_an_array_move_it_once_per_host(two_hosts) -> None:  # type: ignore[no-untyped-def]
    a = np.random.default_rng(1).standard_normal((1024, 1024))  # 8 MiB
    with two_hosts.master() as m:
        ref = m.put(a)
        answers = [f.result(60) for f in [m.submit("array_info", ref, scale=float(i)) for i in range(200)]]
        assert [x[1] for x in answers] == pytest.approx([float(a.sum()) * i for i in range(200)])
        assert all(x[0] is False and x[2] == [1024, 1024] for x in answers)  # read-only, whole
        assert len({x[3] for x in answers}) == 4  # every lane of both hosts took some
        moved = m.status()["counters"]["fetched_bytes"]
        assert moved == 2 * a.nbytes  # once per host, not 200 times
        nested = m.map("array_info", [ref, ref], chunksize=2)  # batched calls resolve refs too
        assert [x[1] for x in nested] == pytest.approx([float(a.sum())] * 2)
        assert m.counters["fetches"] == 2


def test_a_ref_that_cannot_be_had_is_a_clear_error(two_hosts) -> None:  # type: ignore[no-untyped-def]
    with two_hosts.master() as m, two_hosts.master() as other:
        gone = m.put(np.arange(10.0))
        m.release(gone)
        with pytest.raises(BadRequest, match="does not hold it"):
            m.call("array_info", (gone,)).result(30)
        forged = Ref(os.urandom(16), "<f8", (10,))
        with pytest.raises(BadRequest, match="cannot be had"):
            m.call("array_info", (forged,)).result(30)
        theirs = other.put(np.arange(5.0))  # another master's array: not ours to read
        with pytest.raises(BadRequest, match="does not hold it"):
            m.call("array_info", (theirs,)).result(30)
        too_big = m.put(np.zeros(4 << 20))  # 32 MiB > cache_bytes = 24 MiB
        with pytest.raises(BadRequest, match="exceed worker.cache_bytes"):
            m.call("array_info", (too_big,)).result(30)
        assert m.call("echo", (1,)).result(10) == 1  # nothing else disturbed


def test_past_cache_bytes_arrays_are_evicted_and_fetched_again_correctly(two_hosts) -> None:  # type: ignore[no-untyped-def]
    arrays = [np.full((1 << 20,), float(i)) for i in range(5)]  # 8 MiB each, 40 MiB > 24 MiB per host
    with two_hosts.master() as m:
        refs = [m.put(a) for a in arrays]
        for _ in range(3):
            sums = [m.call("array_info", (r,)).result(30)[1] for r in refs]
            assert sums == [float(a.sum()) for a in arrays]
        assert m.status()["counters"]["fetched_bytes"] > 5 * arrays[0].nbytes  # some came twice: evicted


def test_data_counts_only_from_the_master_that_was_asked_and_puts_are_counted() -> None:
    s = BrokerState()
    host = s.worker_ready(b"d", ["svc"], 1, 0.0, lanes=1, name="w")
    s.lane_ready(b"l", host.key, 0, 0.0, pid=1)
    s.submit(b"m", b"t", "svc", [b"x"], 0.0)
    list(s.dispatch(0.0))
    _master, request = s.fetch(b"d", task_key(b"m", b"t"), b"g" * 16, 0.0)  # type: ignore[misc]
    assert s.fetched(request, b"g" * 16, 10, b"intruder") is None  # another master guessed the request id
    assert s.fetched(request, b"g" * 16, 10, b"m") == b"d"
    state = MasterState(MasterConfig(), "ipc://x", 0.0)
    ref, kept = make_ref(np.arange(3.0))
    state.put(ref.digest, ref.meta(), kept)
    state.put(ref.digest, ref.meta(), kept)  # the same content put twice: one ref, two holders
    state.release(ref.digest)
    [data] = state.on_message([P.MASTER, P.FETCH, b"r", ref.digest], 0.0)
    assert data[4] == ref.meta()  # still served: one put is not released yet
    state.release(ref.digest)
    [gone] = state.on_message([P.MASTER, P.FETCH, b"r", ref.digest], 0.0)
    assert gone[4] == b""


def test_put_refuses_an_array_over_max_frame_bytes() -> None:
    from ndpipe.master import Master

    with Master("ipc:///tmp/ndpipe-nobroker", config=MasterConfig(broker="ipc:///tmp/ndpipe-nobroker",
                                                                  max_frame_bytes=1 << 20)) as m:
        with pytest.raises(EncodeError, match="exceeds max_frame_bytes"):
            m.put(np.zeros(1 << 18))  # 2 MiB
