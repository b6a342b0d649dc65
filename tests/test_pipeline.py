"""End to end with real processes: submit, map, scatter, errors, timeouts, cancel, queue bounds."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from ndpipe.errors import BadRequest, QueueFull, TaskFailed, TaskTimeout
from tests.conftest import STEADY

pytestmark = pytest.mark.timeout(90)


def test_submit_map_scatter_round_trip_values(cluster) -> None:  # type: ignore[no-untyped-def]
    # Given a broker and one worker with two compute processes
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        # When values of every supported kind go through the echo service
        values = [np.arange(12, dtype=np.int16).reshape(3, 4), np.asfortranarray(np.ones((3, 5))),
                  np.float32(1.5), 7, "text", b"\x00bytes", None, [1, {"k": np.zeros(2)}],
                  np.random.default_rng(0).standard_normal((300, 300)), np.array(3.25)]
        results = [m.submit("echo", v).result(timeout=20) for v in values]
        # Then they come back equal, with dtype and shape
        for v, r in zip(values, results, strict=True):
            if isinstance(v, np.ndarray):
                assert r.dtype == v.dtype and r.shape == v.shape and np.array_equal(r, v)
            elif isinstance(v, list):
                assert r[0] == 1 and np.array_equal(r[1]["k"], np.zeros(2))
            else:
                assert r == v
        assert list(m.map("echo", range(500))) == list(range(500))
        x = np.random.default_rng(1).standard_normal((1000, 16))
        y = m.scatter("normalize", x, shards=7, axis=0)
        assert np.allclose(y, (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True))


def test_several_workers_share_the_work(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    w1, w2 = c.start_worker(processes=2), c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 4)
        pids = list(m.map("slow_pid", [0.02] * 200))
    children = set(c.lane_pids(w1)) | set(c.lane_pids(w2))
    assert len(pids) == 200 and set(pids) <= children and len(set(pids)) == 4


def test_handler_exception_reaches_caller_with_remote_traceback(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        fut = m.submit("fail", "it broke")
        with pytest.raises(TaskFailed) as info:
            fut.result(timeout=20)
        err = info.value
        assert err.remote_type == "builtins.ValueError"
        assert "it broke" in str(err) and "handlers.py" in err.remote_traceback
        assert m.submit("echo", 5).result(timeout=20) == 5  # the pool is unharmed
        assert m.status()["counters"]["requeued"] == 0  # not retried


def test_wrong_arguments_are_a_handler_error(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        with pytest.raises(TaskFailed, match="TypeError"):
            m.submit("normalize").result(timeout=20)


def test_unencodable_argument_fails_at_submit(cluster) -> None:  # type: ignore[no-untyped-def]
    from ndpipe.errors import EncodeError

    with cluster.master() as m:
        with pytest.raises(EncodeError):
            m.submit("echo", object())
        with pytest.raises(EncodeError):
            m.submit("echo", np.array([object()]))


def test_timeout_from_caller_and_from_service_default(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        with pytest.raises(TaskTimeout):
            m.call("sleep", (30,), timeout=0.5).result(timeout=20)
        # service "hang" has timeout: 0.5 in YAML: the worker kills and replaces the process
        with pytest.raises(TaskTimeout, match="timeout of 0.5 s"):
            m.submit("hang", 30).result(timeout=20)
        cluster.wait_slots(m, 2)
        assert list(m.map("echo", range(10))) == list(range(10))


def test_queue_full_and_cancel(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # Given a broker with a small queue bound and no worker for the service
    c = make_cluster(broker={**STEADY, "max_queued": 3})
    c.start_broker()
    with c.master() as m:
        futs = [m.submit("nobody", i) for i in range(3)]
        with pytest.raises(QueueFull, match="max_queued"):
            m.submit("nobody", 99).result(timeout=20)
        # When a queued task is cancelled, Then the broker forgets it
        assert futs[0].cancel()
        with pytest.raises(cf.CancelledError):
            futs[0].result()
        from tests.conftest import wait_until

        wait_until(lambda: m.status()["services"]["nobody"]["queued"] == 2, what="cancel to reach the broker")


def test_undecodable_payload_gets_bad_request(cluster) -> None:  # type: ignore[no-untyped-def]
    import msgpack

    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        # a pickled object array in msgpack-numpy's format: must never be unpickled
        hostile = msgpack.packb([[{b"nd": True, b"type": "|O", b"kind": b"", b"shape": [1],
                                   b"data": b"\x80\x04K\x01."}], {}], use_bin_type=True)
        with pytest.raises(BadRequest, match="dtype"):
            _submit_raw(m, "echo", [hostile]).result(timeout=20)
        with pytest.raises(BadRequest, match="msgpack"):
            _submit_raw(m, "echo", [b"\xc1 not msgpack"]).result(timeout=20)
        assert m.submit("echo", 1).result(timeout=20) == 1


def _submit_raw(m, service: str, payload: list[bytes]):  # type: ignore[no-untyped-def]
    """Submit pre-encoded frames, bypassing the encoder (to test the worker's decoder)."""
    import uuid
    from concurrent.futures import Future

    from ndpipe import protocol as P
    from ndpipe.master.ioloop import Submit
    from ndpipe.master.state import Pending

    m._slots.acquire()
    fut: Future[object] = Future()
    p = Pending(uuid.uuid4().bytes, service.encode(), P.OPTIONS.pack(0, 0, 0), payload, fut, None)
    fut.add_done_callback(lambda f: m._done(f, p.tid))
    m._post(Submit(p))
    return fut


def test_scatter_rejects_arrays_it_cannot_split(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        with pytest.raises(ValueError, match="axis"):
            m.scatter("normalize", np.float64(3.0), shards=2)
        with pytest.raises(ValueError, match="axis 2"):
            m.scatter("normalize", np.zeros((4, 4)), shards=2, axis=2)
        with pytest.raises(ValueError, match="shards"):
            m.scatter("normalize", np.zeros((4, 4)), shards=0)
        # more shards than rows: one shard per row
        assert m.scatter("echo", np.arange(3.0), shards=10).tolist() == [0.0, 1.0, 2.0]
