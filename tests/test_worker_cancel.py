"""W_CANCEL against a real worker daemon and its lane, driven by a bare ROUTER standing in for the broker.

The broker sends W_CANCEL when it gives up on a task that is running (its deadline passed, or the
first answer came from another copy): the worker must stop it at once and free its process, not let
it run to its own deadline. Here the tasks have no deadline at all, so only W_CANCEL can stop them:
a worker that ignored it would keep the process for 60 s and every wait below would time out.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from ndpipe import protocol as P
from ndpipe.chaos.checker import read_starts, started
from ndpipe.chaos.handlers import SERVICES
from ndpipe.cluster import Cluster, process_gone
from ndpipe.codec import decode, encode_call
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(90)
LONG = 60.0  # seconds a cancelled task would run if nothing stopped it


class FakeBroker:
    """The backend side of the protocol, step by step under the test's control: the daemon's
    connection and its one lane's connection."""

    def __init__(self, ctx: zmq.Context[Any], root: Path) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.endpoint = f"ipc://{root}/fake-backend"
        self.sock.bind(self.endpoint)
        self.worker = b""
        self.lane = b""
        self.key = b"k" * P.KEY_BYTES

    def recv(self, timeout: float = 20.0) -> list[bytes]:
        assert self.sock.poll(int(timeout * 1000)), f"nothing from the worker within {timeout} s"
        frames = self.sock.recv_multipart()
        assert frames[1] == P.WORKER, frames[:3]
        if frames[2] == P.LANE:  # a (new) lane joined: tasks go to its connection
            assert msgpack.unpackb(frames[3])["key"] == self.key
            self.lane = frames[0]
        return frames

    def welcome(self) -> None:
        """Take the daemon's READY, WELCOME it with a liveness long enough for the whole test, and
        wait for its lane to join."""
        for _ in range(100):
            frames = self.recv()
            if frames[2] == P.READY:
                self.worker = frames[0]
                params = {"heartbeat_interval": 5.0, "liveness": 20, "broker_id": "fake", "key": self.key}
                self.send(P.WELCOME, msgpack.packb(params, use_bin_type=True))
            if self.lane:
                return
        raise AssertionError("no READY and LANE from the worker")

    def send(self, command: bytes, *frames: Any, to: bytes | None = None) -> None:
        self.sock.send_multipart([to or self.worker, P.WORKER, command, *frames], copy=True)

    def cancel(self, tid: bytes) -> None:
        """As the broker does: to the lane (drops it if waiting) and to its daemon (kills it if running)."""
        self.send(P.W_CANCEL, tid, to=self.lane)
        self.send(P.W_CANCEL, tid)

    def task(self, tid: bytes, *args: Any) -> None:
        self.send(P.TASK, tid, b"work", P.META.pack(1, 0, 0), *encode_call(list(args), {}), to=self.lane)

    def next_lane(self, old: bytes, timeout: float = 20.0) -> None:
        """Wait until a lane other than ``old`` joined (the replacement of a killed one)."""
        for _ in range(1000):
            if self.lane != old:
                return
            self.recv(timeout)
        raise AssertionError("no new lane joined")

    def answers(self, until: bytes, timeout: float = 20.0) -> dict[bytes, list[bytes]]:
        """Every W_RESULT / W_ERROR (task id -> frames) up to and including the one for ``until``."""
        got: dict[bytes, list[bytes]] = {}
        for _ in range(1000):
            frames = self.recv(timeout)
            if frames[2] in (P.W_RESULT, P.W_ERROR):
                got[frames[3]] = frames[2:]
                if frames[3] == until:
                    return got
        raise AssertionError(f"no answer for {until!r}")


@pytest.fixture
def setup(tmp_short: Path) -> Iterator[tuple[Cluster, FakeBroker]]:
    ctx = zmq.Context()
    fake = FakeBroker(ctx, tmp_short)
    # prefetch 1: a second task waits in the lane's own socket behind the running one
    cluster = Cluster(SERVICES, backend=fake.endpoint, worker={"prefetch": 1}, root=str(tmp_short))
    try:
        yield cluster, fake
    finally:
        cluster.close()
        fake.sock.close(linger=0)
        ctx.term()


def _runner_of(log_dir: str, tid: int) -> int:
    """Pid of the compute process whose start log shows task ``tid`` (waits for it to start)."""
    pid, _t = wait_until(partial(started, log_dir, tid), 20, f"task {tid} started")
    return int(pid)


def test_cancel_kills_the_running_task_and_frees_its_process(setup: tuple[Cluster, FakeBroker]) -> None:
    cluster, fake = setup
    worker = cluster.start_worker(1)
    fake.welcome()
    # Given a task with no deadline running in the worker's only compute process
    fake.task(b"t1", 1, 64, LONG, cluster.log_dir)
    runner = _runner_of(cluster.log_dir, 1)
    # When the broker cancels it
    first = fake.lane
    fake.cancel(b"t1")
    # Then that lane is killed and replaced, and the next task runs in the new one
    wait_until(lambda: process_gone(runner), 20, "the cancelled task's process killed")
    fake.next_lane(first)
    fake.task(b"t2", 2, 64, 0.0, "")
    got = fake.answers(until=b"t2")
    assert b"t1" not in got, "a cancelled task must not be answered"
    value = decode(got[b"t2"][2:])
    assert value[0] == 2 and value[2] != runner and value[2] in cluster.lane_pids(worker)


def test_cancel_of_a_task_waiting_in_the_process_stops_it_before_it_runs(
        setup: tuple[Cluster, FakeBroker]) -> None:
    cluster, fake = setup
    cluster.start_worker(1)
    fake.welcome()
    # Given a running task and a long one queued behind it in the same process's socket
    fake.task(b"t1", 1, 64, 1.0, cluster.log_dir)
    fake.task(b"t2", 2, 64, LONG, cluster.log_dir)
    runner = _runner_of(cluster.log_dir, 1)
    # When the broker cancels the queued one
    fake.cancel(b"t2")
    # Then the running task still answers, the cancelled one never does, and it holds no process:
    # a third task is answered long before the cancelled one could have finished
    fake.task(b"t3", 3, 64, 0.0, "")
    got = fake.answers(until=b"t3", timeout=30)
    assert set(got) == {b"t1", b"t3"}
    assert decode(got[b"t1"][2:])[0] == 1 and decode(got[b"t3"][2:])[0] == 3
    assert not any(t == 2 for t, _ in read_starts(cluster.log_dir).get(runner, [])), "the cancelled task started"
