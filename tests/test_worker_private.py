"""Nothing between a worker daemon and its lanes can be reached by another local user.

The daemon and its lanes talk over an inherited socketpair and an unlinked shared-memory slot; tasks
and results travel on each lane's own connection to the broker. (Before lanes, the daemon bound an
ipc socket that carried every task in the clear: an abstract-namespace one let a second uid that
connected as ``c0`` take over a process's tasks.) A lane joins the broker only with the key the
broker gave its daemon, so a stranger on the backend cannot pose as one.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from ndpipe import protocol as P
from tests.conftest import STEADY, in_ci

pytestmark = pytest.mark.timeout(90)

NOBODY = 65534
SO_ACCEPTCON = 0x00010000  # /proc/net/unix flag of a listening socket


def unix_sockets(pid: int) -> list[tuple[int, str]]:
    """(flags, path) of every unix socket the process holds, as /proc/net/unix lists it."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 7 and fields[6] in inodes:
            out.append((int(fields[3], 16), fields[7] if len(fields) > 7 else ""))
    return out


@pytest.fixture
def worker(make_cluster):  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    w = c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
    lanes = c.lane_pids(w)
    assert len(lanes) == 2
    return c, w, lanes


def test_neither_daemon_nor_lanes_listen_anywhere(worker) -> None:  # type: ignore[no-untyped-def]
    _c, w, lanes = worker
    for pid in (w.pid, *lanes):
        socks = unix_sockets(pid)
        assert socks, "the check can fail: every process holds unix sockets (its pipe to the other side)"
        assert not [s for s in socks if s[0] & SO_ACCEPTCON], f"pid {pid} listens on a unix socket: {socks}"
        assert not [s for s in socks if s[1]], f"pid {pid} holds a named unix socket: {socks}"
        listening = [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert not listening, f"pid {pid} listens on {listening}"


def test_another_uid_cannot_reach_the_lanes_channels(worker) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("CI runs as root: this test must run there")
        pytest.skip("needs root, to look as a second uid (nobody)")
    _c, w, lanes = worker
    for pid in (w.pid, *lanes):
        # The check can fail: the worker's own uid lists the same fds (its pipe and shared slot).
        assert list_fds_as(None, pid) == 0
        assert list_fds_as(NOBODY, pid) == errno.EACCES


def list_fds_as(uid: int | None, pid: int) -> int:
    """List /proc/<pid>/fd from a forked child running as ``uid``; 0 or the errno it got. (A fork, not
    a new interpreter: the second uid may not be able to read this Python's install.)"""
    child = os.fork()
    if child == 0:  # plain syscalls only, then _exit
        code = 0
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            os.listdir(f"/proc/{pid}/fd")
        except OSError as exc:
            code = exc.errno or 255
        os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_connection_posing_as_a_lane_gets_no_task(worker) -> None:  # type: ignore[no-untyped-def]
    """A peer on the backend that claims a lane index without its worker's key is told DISCONNECT
    and receives nothing, while the real lanes run the whole job."""
    c, _w, _lanes = worker
    ctx = zmq.Context()
    impostors = []
    try:
        for index in (0, 1):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(c.backend)
            info = {"key": os.urandom(P.KEY_BYTES), "lane": index, "pid": os.getpid()}
            sock.send_multipart([P.WORKER, P.LANE, msgpack.packb(info, use_bin_type=True)])
            impostors.append(sock)
        for sock in impostors:
            assert sock.poll(10_000) and sock.recv_multipart() == [P.WORKER, P.DISCONNECT]
        with c.master() as m:
            futures = [m.submit("echo", i) for i in range(40)]
            assert [f.result(timeout=30) for f in futures] == list(range(40))
        assert not any(sock.poll(0) for sock in impostors)
    finally:
        for sock in impostors:
            sock.close(linger=0)
        ctx.term()
