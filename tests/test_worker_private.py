"""The worker daemon's channel to its compute processes is private to the worker's uid.

It carries every task and result in the clear, so another local user who could connect would read
tasks and forge results (an abstract-namespace socket, open to every uid, allowed exactly that).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest
import zmq

from ndpipe import protocol as P
from tests.conftest import STEADY, in_ci, wait_until

pytestmark = pytest.mark.timeout(90)

NOBODY = 65534


def channel_paths(daemon_pid: int) -> list[str]:
    """Unix socket paths of the daemon's compute channel, as every local user sees them."""
    marker = f"ndpipe-worker-{daemon_pid}-"
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sorted({line.split()[-1] for line in lines if marker in line and len(line.split()) >= 8})


@pytest.fixture
def worker(make_cluster):  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    w = c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
    paths = wait_until(lambda: channel_paths(w.pid), what="the daemon's channel socket listed")
    return c, w, paths


def test_channel_is_a_socket_file_in_a_0700_directory_removed_at_exit(worker) -> None:  # type: ignore[no-untyped-def]
    c, w, paths = worker
    assert not any(p.startswith("@") for p in paths), f"an abstract socket any uid can reach: {paths}"
    assert len(paths) == 1
    directory = Path(paths[0]).parent
    info = directory.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    w.terminate()
    w.wait(30)
    assert not directory.exists()


def test_another_uid_cannot_connect(worker) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("CI runs as root: this test must run there")
        pytest.skip("needs root, to connect as a second uid (nobody)")
    _c, _w, paths = worker

    # The check can fail: the same connect succeeds as the worker's own uid.
    assert connect_as(None, paths[0]) == 0
    assert connect_as(NOBODY, paths[0]) == errno.EACCES


def connect_as(uid: int | None, path: str) -> int:
    """Connect to ``path`` from a forked child running as ``uid``; 0 or the errno it got. (A fork, not
    a new interpreter: the second uid may not be able to read this Python's install.)"""
    pid = os.fork()
    if pid == 0:  # the child: plain syscalls only, then _exit
        code = 0
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            socket.socket(socket.AF_UNIX).connect(path)
        except OSError as exc:
            code = exc.errno or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_connection_posing_as_a_compute_process_gets_no_task(worker) -> None:  # type: ignore[no-untyped-def]
    """Even a peer that can connect (the same uid) cannot take over a process's routing id: each
    spawn has an id of its own and the socket has no ROUTER_HANDOVER."""
    c, _w, paths = worker
    ctx = zmq.Context()
    impostors = []
    try:
        for ident in (b"c0", b"c1", b"c0-0000000000000000"):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.ROUTING_ID, ident)
            sock.connect(f"ipc://{paths[0]}")
            sock.send_multipart([P.C_HELLO, str(os.getpid()).encode()])
            impostors.append(sock)
        with c.master() as m:
            futures = [m.submit("echo", i) for i in range(40)]
            assert [f.result(timeout=30) for f in futures] == list(range(40))
        assert not any(sock.poll(0) for sock in impostors)
    finally:
        for sock in impostors:
            sock.close(linger=0)
        ctx.term()
