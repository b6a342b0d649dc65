"""Garbage at both broker sockets: logged and dropped, clear errors where a task id is usable,
and the broker keeps serving a real job throughout."""

from __future__ import annotations

import random

import msgpack
import pytest
import zmq

from ndpipe import protocol as P
from tests.conftest import STEADY, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cluster(make_cluster):  # type: ignore[no-untyped-def]
    c = make_cluster(broker={**STEADY, "max_frames": 16, "max_frame_bytes": 1 << 20})
    c.start_broker()
    c.start_worker(processes=2)
    return c


@pytest.fixture
def raw() -> object:
    ctx = zmq.Context()
    socks: list[zmq.Socket[bytes]] = []

    def connect(endpoint: str) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        socks.append(sock)
        return sock

    yield connect
    for sock in socks:
        sock.close(linger=0)
    ctx.term()


def garbage(rng: random.Random) -> list[bytes]:
    """Random frame counts and bytes, sometimes with a valid header and command in front."""
    frames = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 24))]
    if rng.random() < 0.5:
        header = rng.choice([P.MASTER, P.WORKER])
        command = bytes([rng.choice([*range(0x01, 0x0A), *range(0x11, 0x1A), 0x00, 0xFF])])
        frames[:0] = [header, command]
    return frames


def test_garbage_at_both_sockets_while_a_job_runs(cluster, raw) -> None:  # type: ignore[no-untyped-def]
    front, back = raw(cluster.frontend), raw(cluster.backend)
    rng = random.Random(1234)
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        job = m.map("echo", range(300))
        first = [next(job) for _ in range(10)]
        # When thousands of malformed messages hit both sockets mid-job
        for _ in range(3000):
            front.send_multipart(garbage(rng))
            back.send_multipart(garbage(rng))
        front.send_multipart([P.MASTER, P.SUBMIT, b"echo", b"t" * 16, P.OPTIONS.pack(0, 0, 0)] + [b"x"] * 40)
        front.send(b"x" * (2 << 20))  # above max_frame_bytes: libzmq drops the connection
        # Then the job completes correctly and the broker still answers
        assert first + list(job) == list(range(300))
        assert m.submit("echo", "still here").result(timeout=20) == "still here"
    assert cluster.broker.poll() is None


def test_bad_submit_with_task_id_gets_bad_request(cluster, raw) -> None:  # type: ignore[no-untyped-def]
    front = raw(cluster.frontend)
    cases = {
        b"bad-options": [P.MASTER, P.SUBMIT, b"echo", b"bad-options", b"\x00\x01", b"payload"],
        b"no-payload": [P.MASTER, P.SUBMIT, b"echo", b"no-payload", P.OPTIONS.pack(0, 0, 0)],
        b"bad-service": [P.MASTER, P.SUBMIT, b"\xff\xfe", b"bad-service", P.OPTIONS.pack(0, 0, 0), b"p"],
        b"too-many": [P.MASTER, P.SUBMIT, b"echo", b"too-many", P.OPTIONS.pack(0, 0, 0)] + [b"p"] * 18,
        b"far-too-many": [P.MASTER, P.SUBMIT, b"echo", b"far-too-many", P.OPTIONS.pack(0, 0, 0)] + [b"p"] * 500,
    }
    for frames in cases.values():
        front.send_multipart(frames)
    answers = {}
    while len(answers) < len(cases):
        assert front.poll(10_000), f"no answer for {set(cases) - set(answers)}"
        frames = front.recv_multipart()
        if frames[1] == P.ERROR:
            answers[frames[2]] = (frames[3].decode(), msgpack.unpackb(frames[4])["message"])
    assert all(code == P.BAD_REQUEST for code, _ in answers.values())
    assert "options frame" in answers[b"bad-options"][1]
    assert "UTF-8" in answers[b"bad-service"][1]
    assert "buffer frames" in answers[b"too-many"][1]
    assert "more than" in answers[b"far-too-many"][1]


def test_status_request_ids_are_echoed_whole_and_a_long_one_is_refused(cluster, raw) -> None:  # type: ignore[no-untyped-def]
    front = raw(cluster.frontend)
    front.send_multipart([P.MASTER, P.STATUS, b"x" * 65])  # cut short, it would match no request: dropped
    front.send_multipart([P.MASTER, P.STATUS, b"y" * 64])
    front.send_multipart([P.MASTER, P.STATUS])
    replies = []
    while len(replies) < 2:
        assert front.poll(10_000), f"replies so far: {replies}"
        frames = front.recv_multipart()
        assert frames[1] == P.STATUS_REPLY
        replies.append(frames[3])
    assert replies == [b"y" * 64, b""]


def test_bad_request_counts_as_rejected(cluster, raw) -> None:  # type: ignore[no-untyped-def]
    front = raw(cluster.frontend)
    front.send_multipart([P.MASTER, P.SUBMIT, b"echo", b"bad-options", b"\x00\x01", b"payload"])
    assert front.poll(10_000)
    assert front.recv_multipart()[1] == P.ERROR
    front.send_multipart([P.MASTER, P.STATUS, b"r"])
    assert front.poll(10_000)
    assert msgpack.unpackb(front.recv_multipart()[2])["counters"]["rejected"] == 1


def test_unknown_worker_is_told_to_register(cluster, raw) -> None:  # type: ignore[no-untyped-def]
    back = raw(cluster.backend)
    back.send_multipart([P.WORKER, P.W_RESULT, b"some-task", b"payload"])
    assert back.poll(10_000)
    assert back.recv_multipart() == [P.WORKER, P.DISCONNECT]


def test_bad_ready_is_refused(cluster, raw) -> None:  # type: ignore[no-untyped-def]
    back = raw(cluster.backend)
    for info in ({"services": "echo", "lanes": 1, "credit": 1}, {"services": ["echo"], "lanes": 1, "credit": 10**9},
                 [1, 2], {"services": ["echo"], "lanes": 1, "credit": True},  # a bool is an int to Python, not credit
                 {"services": ["echo"], "lanes": 0, "credit": 1}, {"services": ["echo"], "lanes": 2000, "credit": 1},
                 {"services": ["echo"], "slots": 4}):  # NDPW02's READY: no lanes
        back.send_multipart([P.WORKER, P.READY, msgpack.packb(info)])
    back.send_multipart([P.WORKER, P.READY, b"\xc1garbage"])
    back.send_multipart([P.WORKER, P.HEARTBEAT])  # still unknown: must be told to register
    assert back.poll(10_000)
    assert back.recv_multipart() == [P.WORKER, P.DISCONNECT]


def test_silent_fake_worker_loses_its_tasks_to_real_ones(cluster, raw) -> None:  # type: ignore[no-untyped-def]
    # Given a peer that registers for echo with many slots and then never answers
    fake = raw(cluster.backend)
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        info = {"services": ["echo"], "lanes": 1, "credit": 50, "id": "fake"}
        fake.send_multipart([P.WORKER, P.READY, msgpack.packb(info)])
        assert fake.poll(10_000)
        welcome = fake.recv_multipart()
        assert welcome[:2] == [P.WORKER, P.WELCOME]
        key = msgpack.unpackb(welcome[2])["key"]  # one connection may be the daemon and its one lane
        fake.send_multipart([P.WORKER, P.LANE, msgpack.packb({"key": key, "lane": 0, "pid": 1})])
        cluster.wait_slots(m, 52)
        # When a job runs, Then tasks the fake swallowed are requeued once it is declared dead
        assert list(m.map("echo", range(100))) == list(range(100))
        assert m.status()["counters"]["requeued"] > 0


def test_a_worker_of_the_previous_protocol_is_refused_with_a_reason(cluster, raw) -> None:  # type: ignore[no-untyped-def]
    old = raw(cluster.backend)
    old.send_multipart([b"NDPW02", P.READY, msgpack.packb({"services": ["echo"], "slots": 4})])
    with cluster.master() as m:
        cluster.wait_slots(m, 2)  # the real worker's two lanes, and nothing from the old one
        assert all(w["id"] != "" and w["lanes"] for w in m.status()["workers"])
    assert not old.poll(500)  # no DISCONNECT: it would only register again, in a loop
    log = wait_until(lambda: "NDPW02" in cluster.logs() and cluster.logs(), what="the broker's log line")
    assert "speaking NDPW02" in log and "upgrade it to NDPW03" in log
