"""CurveZMQ and who may do what (issue 12; PROTOCOL.md §13): each attack of the issue's list, made
against a real broker and worker, now does no harm.

Waits are on events: a handshake the broker refused shows on the client socket's monitor
(HANDSHAKE_FAILED_AUTH), a reload in the broker's log. Where a test shows that nothing arrived, it
first proves that something sent after the refused attempt did arrive, so "nothing" is not "not yet".
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from ndpipe import protocol as P
from ndpipe.broker.guard import Guard
from ndpipe.broker.records import task_key
from ndpipe.codec import decode, encode, encode_call
from ndpipe.config import SecurityConfig
from ndpipe.errors import BadRequest, BrokerUnreachable, ConfigError
from ndpipe.keys import generate, load
from ndpipe.security import MASTERS, WORKERS, AllowLists, exposed, insecure_binds, zap_reply
from tests.conftest import STEADY, wait_until

pytestmark = pytest.mark.timeout(120)


# ---- socket-free rules -----------------------------------------------------------------------------
def test_exposed_is_any_tcp_address_but_loopback() -> None:
    for endpoint in ("tcp://*:5555", "tcp://0.0.0.0:1", "tcp://10.0.0.7:5", "tcp://[::]:5", "tcp://eth0:5",
                     "tcp://broker.example:5"):
        assert exposed(endpoint), endpoint
    for endpoint in ("tcp://127.0.0.1:5555", "tcp://127.8.9.1:5", "tcp://localhost:5", "tcp://[::1]:5",
                     "ipc:///run/ndpipe/b", "inproc://x"):
        assert not exposed(endpoint), endpoint
    plain = {"frontend": "tcp://*:5555", "backend": "tcp://127.0.0.1:5556"}
    assert insecure_binds(SecurityConfig(), plain) == ["broker.frontend: tcp://*:5555"]
    assert insecure_binds(SecurityConfig(insecure=True), plain) == []
    assert insecure_binds(SecurityConfig(curve=True), plain) == []


def _request(domain: str, key: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"7", domain.encode(), b"10.0.0.9", b"", mechanism, zmq.utils.z85.decode(key)]


def test_zap_admits_each_key_only_on_its_own_socket() -> None:
    m, w, a, x = (zmq.curve_keypair()[0] for _ in range(4))
    lists = AllowLists(frozenset({m}), frozenset({w}), frozenset({a}))
    assert zap_reply(lists, _request(MASTERS, m)) == ([b"1.0", b"7", b"200", b"OK", m, b""], None)
    assert zap_reply(lists, _request(MASTERS, a))[0][2] == b"200"  # an admin reads STATUS on the frontend
    assert zap_reply(lists, _request(WORKERS, w))[0][2] == b"200"
    for domain, key in ((MASTERS, w), (WORKERS, m), (WORKERS, a), (MASTERS, x), (WORKERS, x), ("other", m)):
        reply, why = zap_reply(lists, _request(domain, key))
        assert reply[2] == b"400" and why and key.decode() in why
    assert zap_reply(lists, _request(MASTERS, m, b"NULL")[:6])[0][2] == b"400"
    assert zap_reply(lists, [b"1.0"])[0][2] == b"500"  # malformed: answered, not a crash


def test_a_routing_id_belongs_to_the_first_key_that_used_it(tmp_path: Path) -> None:
    sec = _lists_on_disk(tmp_path)
    ctx = zmq.Context()
    guard = Guard(ctx, sec)
    try:
        alice, mallory = (load(tmp_path / "pairs" / f"{name}.key")[0] for name in ("alice", "mallory"))
        assert guard.admits(b"M1", alice, front=True)
        assert not guard.admits(b"M1", mallory, front=True)  # took over alice's id: refused
        assert guard.admits(b"M2", mallory, front=True)
        assert not guard.admits(b"W1", alice, front=False)  # a master key on the backend
        worker = next(iter(guard.lists.workers))
        assert guard.admits(b"M1", worker, front=False)  # the backend names its peers apart
        guard.forget({b"M2"}, {b"M1"})
        assert guard.admits(b"M1", mallory, front=True)  # alice's id forgotten with her
        for name in ("mallory.key", "w.key"):
            (tmp_path / ("masters" if name.startswith("m") else "workers") / name).unlink()
        assert sorted(guard.reload()) == [(False, b"M1"), (True, b"M1"), (True, b"M2")]  # now to forget
        assert guard.key_of(b"M1", front=True) is None and not guard.admits(b"M9", mallory, front=True)
    finally:
        guard.close()
        ctx.term()


def _lists_on_disk(root: Path) -> SecurityConfig:
    for role, names in (("masters", ("alice", "mallory")), ("workers", ("w",)), ("admins", ())):
        (root / role).mkdir()
        for name in names:
            generate(name, root / "pairs")
            shutil.copy(root / "pairs" / f"{name}.key", root / role)
    return SecurityConfig(curve=True, masters=str(root / "masters"), workers=str(root / "workers"),
                          admins=str(root / "admins"))


def test_allow_lists_name_the_key_and_file_of_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"security.masters: .*not a directory"):
        AllowLists.load(SecurityConfig(curve=True, masters=str(tmp_path / "no"), workers=str(tmp_path)))
    (tmp_path / "bad.key").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"security.workers: .*bad.key"):
        (tmp_path / "empty").mkdir()
        AllowLists.load(SecurityConfig(curve=True, masters=str(tmp_path / "empty"), workers=str(tmp_path)))
    with pytest.raises(ConfigError, match="security.masters: required"):
        AllowLists.load(SecurityConfig(curve=True))


# ---- a broker with curve on ----------------------------------------------------------------------
@pytest.fixture
def secure(make_cluster: Any) -> Any:
    c = make_cluster(broker=STEADY, curve=True)
    c.start(workers=1, processes=1)
    return c


def _dealer(ctx: zmq.Context[Any], endpoint: str, pair: tuple[bytes, bytes] | None, server: bytes | None,
            ident: bytes | None = None) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A raw DEALER (CURVE client of ``server`` with ``pair``, or plaintext) and its monitor."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if pair is not None:
        sock.curve_publickey, sock.curve_secretkey = pair
        sock.curve_serverkey = server
    if ident is not None:
        sock.routing_id = ident
    monitor = sock.get_monitor_socket()
    sock.connect(endpoint)
    return sock, monitor


def _await_event(monitor: zmq.Socket[Any], wanted: set[int], timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        event = recv_monitor_message(monitor)["event"]
        if event in wanted:
            return int(event)
    raise AssertionError(f"none of {wanted} within {timeout} s")


def _pair(c: Any, name: str) -> tuple[bytes, bytes]:
    generate(name, c.keys / "extra")
    public, secret = load(c.keys / "extra" / f"{name}.key_secret")
    assert secret is not None
    return public, secret


def _broker_key(c: Any) -> bytes:
    return load(c.keys / "broker.key")[0]


def _submit(tid: bytes, service: str = "echo", *args: Any) -> list[bytes]:
    return [P.MASTER, P.SUBMIT, service.encode(), tid, P.OPTIONS.pack(0, 0, 0), *encode_call(list(args), {})]


def test_keys_refused_where_they_do_not_belong(secure: Any) -> None:
    """An unknown key, a worker key on the frontend and a master key on the backend fail the handshake
    (the client's monitor says so), and a plaintext client never gets a reply; none of them reached
    the broker's state (its counters, read with the harness's admin key, show nothing submitted)."""
    ctx = zmq.Context()
    worker_pair = load(secure.keys / "worker.key_secret")
    harness_pair = load(secure.keys / "harness.key_secret")
    server = _broker_key(secure)
    opened: list[zmq.Socket[Any]] = []
    try:
        with secure.master() as m:  # the harness's key is an admin's too: it reads the broker's counters
            for n, (endpoint, pair) in enumerate(((secure.frontend, _pair(secure, "stranger")),
                                                  (secure.frontend, worker_pair), (secure.backend, harness_pair))):
                sock, monitor = _dealer(ctx, endpoint, pair, server)  # type: ignore[arg-type]
                opened += [sock, monitor]
                ready = {"services": ["echo"], "lanes": 1, "credit": 100000}
                try:  # NOBLOCK: after a refused handshake the socket may have no pipe to queue into
                    sock.send_multipart(_submit(b"x1") if endpoint == secure.frontend else
                                        [P.WORKER, P.READY, msgpack.packb(ready)], zmq.NOBLOCK)
                except zmq.Again:
                    pass
                wait_until(lambda n=n: m.status()["counters"]["handshakes_refused"] > n, what="a refused handshake")
                sock.close(linger=0)  # no more attempts from it: the next count is the next key's
            plain, monitor = _dealer(ctx, secure.frontend, None, None)
            opened += [plain, monitor]
            try:
                plain.send_multipart(_submit(b"x2"), zmq.NOBLOCK)
            except zmq.Again:  # its refused handshake already tore the pipe down
                pass
            assert m.submit("echo", 5).result(timeout=30) == 5  # sent after every attempt above
            status = m.status()
        assert status["counters"]["submitted"] == 1 and status["services"]["echo"]["slots"] == 1
        assert not plain.poll(100)
        assert "not an allowed master or admin key" in secure.logs(tail=10**6)
    finally:
        for sock in opened:
            sock.close(linger=0)
        ctx.term()


def test_a_master_refuses_a_broker_with_another_key(make_cluster: Any) -> None:
    """A fake broker at the broker's address (its own key pair) fails every handshake and never sees
    a message; the master's task fails as the broker being unreachable."""
    c = make_cluster(broker=STEADY, master={"broker_timeout": 3.0}, curve=True)  # keys only: nothing started
    fake_public, fake_secret = zmq.curve_keypair()
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.linger = 0
    fake.curve_server, fake.curve_publickey, fake.curve_secretkey = True, fake_public, fake_secret
    monitor = fake.get_monitor_socket()
    fake.bind(c.frontend)
    try:
        with c.master() as m:
            future = m.submit("echo", 1)
            _await_event(monitor, {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                                   zmq.EVENT_HANDSHAKE_FAILED_AUTH})
            with pytest.raises(BrokerUnreachable, match="handshake failed.*check security.broker_key"):
                future.result(timeout=30)
        assert not fake.poll(0)
    finally:
        monitor.close(linger=0)
        fake.close(linger=0)
        ctx.term()


def test_payload_bytes_are_not_in_the_clear_on_the_wire(make_cluster: Any) -> None:
    """A TCP relay between the master and the broker keeps every byte; with curve on the payload's
    marker is not among them, with curve off (the control) it is."""
    marker = np.frombuffer(b"NDPIPE-SECRET-PAYLOAD-MARKER" * 8, dtype=np.uint8)
    for curve in (False, True):
        c = make_cluster(broker={**STEADY, "frontend": f"tcp://127.0.0.1:{_free_port()}"}, curve=curve)
        c.start(workers=1, processes=1)
        relay = Relay(c.frontend)
        try:
            with c.master(endpoint=relay.endpoint) as m:
                assert np.array_equal(m.submit("echo", marker).result(timeout=30), marker)
        finally:
            seen = relay.close()
            c.close()
        assert (marker.tobytes()[:40] in seen) is not curve, f"curve={curve}"
        assert len(seen) > marker.nbytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Relay:
    """Listen on a free loopback port and copy one connection both ways to ``target``, keeping
    everything that passed (what an eavesdropper on the link would read)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(self.target)
        self.socks += [client, upstream]
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    return
                with self.lock:
                    self.seen += data
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> bytes:
        self.listener.close()
        for sock in self.socks:
            sock.close()
        with self.lock:
            return bytes(self.seen)


def test_an_admin_only_key_reads_status_but_cannot_submit_and_a_master_sees_only_its_own(secure: Any) -> None:
    admin_pair = _pair(secure, "ops")
    shutil.copy(secure.keys / "extra" / "ops.key", secure.keys / "admins")
    bob_pair = _pair(secure, "bob")
    shutil.copy(secure.keys / "extra" / "bob.key", secure.keys / "masters")
    _reload(secure, 1)
    ops = SecurityConfig(curve=True, secret_key=str(secure.keys / "extra" / "ops.key_secret"),
                         broker_key=str(secure.keys / "broker.key"))
    bob = ops.model_copy(update={"secret_key": str(secure.keys / "extra" / "bob.key_secret")})
    assert admin_pair and bob_pair
    with secure.master(security=ops) as m:
        workers = m.status()["workers"]  # the whole picture, routing ids included: random ones, not a counter
        assert workers and all(w["conn"].startswith(b"D".hex()) and len(w["conn"]) == 32 for w in workers)
        with pytest.raises(BadRequest, match="not in security.masters"):
            m.submit("echo", 1).result(timeout=30)
    with secure.master(security=bob) as m, secure.master() as other:
        blocker = other.submit("sleep", 2.0)
        wait_until(lambda: other.status()["services"]["sleep"]["inflight"] == 1, what="the lane busy")
        mine = m.submit("echo", 2)
        status = m.status()
        assert status["restricted"] and status["workers"] == [] and status["tasks"] == 1
        assert set(status["services"]) == {"echo"}
        assert "conn" not in repr(status) and other._ident.hex() not in repr(status)
        assert mine.result(timeout=30) == 2
        blocker.result(timeout=30)


def _reload(c: Any, times: int) -> None:
    c.broker.send_signal(signal.SIGHUP)
    wait_until(lambda: c.logs(tail=10**6).count("allow-lists reloaded") >= times, what="the allow-lists reloaded")


def test_sighup_admits_new_keys_and_revokes_removed_ones_without_dropping_the_others(make_cluster: Any) -> None:
    c = make_cluster(broker=STEADY, master={"broker_timeout": 3.0}, curve=True)
    c.start(workers=1, processes=1)
    _pair(c, "carol")
    carol = SecurityConfig(curve=True, secret_key=str(c.keys / "extra" / "carol.key_secret"),
                           broker_key=str(c.keys / "broker.key"))
    with c.master() as harness:
        assert harness.submit("echo", 0).result(timeout=30) == 0
        shutil.copy(c.keys / "extra" / "carol.key", c.keys / "masters")
        _reload(c, 1)
        with c.master(security=carol) as m:
            assert m.submit("echo", 1).result(timeout=30) == 1
            (c.keys / "masters" / "carol.key").unlink()
            _reload(c, 2)
            late = m.submit("echo", 2)
            with pytest.raises(BrokerUnreachable):  # refused: never answered, while ...
                late.result(timeout=30)
            # (its connection was accepted before the reload: nothing failed a handshake)
            assert harness.submit("echo", 3).result(timeout=30) == 3  # ... the same old connection is served
        assert "no longer in security.masters" in c.logs(tail=10**6)
        (c.keys / "masters" / "junk.key").write_text("garbage")
        c.broker.send_signal(signal.SIGHUP)
        wait_until(lambda: "allow-lists not reloaded" in c.logs(tail=10**6), what="a bad reload refused")
        assert harness.submit("echo", 4).result(timeout=30) == 4  # the old lists stay
        (c.keys / "masters" / "junk.key").unlink()
        (c.keys / "workers" / "worker.key").unlink()  # the worker's key revoked: its lanes go at once
        _reload(c, 3)
        wait_until(lambda: harness.status()["services"].get("echo", {}).get("slots", 0) == 0,
                   what="the revoked worker forgotten", timeout=10)


def test_a_broker_refuses_plaintext_on_a_non_loopback_address_unless_told_insecure(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    endpoints = f"broker: {{frontend: 'tcp://0.0.0.0:{_free_port()}', backend: 'ipc://{tmp_path}/b'}}\n"
    config.write_text(endpoints)
    run = [sys.executable, "-m", "ndpipe.cli"]
    done = subprocess.run([*run, "broker", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "broker.frontend: tcp://0.0.0.0:" in done.stderr and "ndpipe keys generate" in done.stderr
    check = subprocess.run([*run, "config", "check", "--config", str(config)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0 and "warning: broker.frontend" in check.stderr
    config.write_text(endpoints + "security: {insecure: true}\n")
    broker = subprocess.Popen([*run, "broker", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        assert broker.stderr is not None
        for line in broker.stderr:  # bounded by the test's timeout
            if "masters on tcp://0.0.0.0" in line:
                break
    finally:
        broker.terminate()
        assert broker.wait(timeout=30) == 0
        broker.stderr.close()  # type: ignore[union-attr]


def _recv(sock: zmq.Socket[Any], timeout: float = 30.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), f"no message within {timeout} s"
    return sock.recv_multipart()


def test_answers_count_only_from_the_lane_holding_the_task(secure: Any) -> None:
    """A stranger on the backend (a worker key that never registered) and a registered rogue lane
    both answer a task they do not hold, naming it by the broker's id (which only the holder is
    told; the test computes it): the master's first and only answer is the genuine one."""
    ctx = zmq.Context()
    server = _broker_key(secure)
    worker_pair = load(secure.keys / "worker.key_secret")
    opened: list[zmq.Socket[Any]] = []

    def dealer(endpoint: str, pair: Any, ident: bytes | None = None) -> zmq.Socket[Any]:
        sock, monitor = _dealer(ctx, endpoint, pair, server, ident)
        opened.extend((sock, monitor))
        return sock

    try:
        victim = dealer(secure.frontend, load(secure.keys / "harness.key_secret"), b"M-victim-0000001")
        victim.send_multipart(_submit(b"T1", "sleep", 1.0, "genuine"))
        with secure.master() as m:
            wait_until(lambda: m.status()["services"]["sleep"]["inflight"] == 1, what="the task at its lane")
        tid = task_key(b"M-victim-0000001", b"T1")
        forged = [P.WORKER, P.W_RESULT, tid, *encode("forged")]
        failed = [P.WORKER, P.W_ERROR, tid, P.HANDLER_ERROR.encode(), msgpack.packb({"message": "forged"})]
        stranger = dealer(secure.backend, worker_pair)
        stranger.send_multipart(forged)
        assert _recv(stranger)[:2] == [P.WORKER, P.DISCONNECT]
        rogue = dealer(secure.backend, worker_pair)
        rogue.send_multipart([P.WORKER, P.READY, msgpack.packb({"services": ["echo"], "lanes": 1, "credit": 1,
                                                                "id": "rogue"})])
        welcome = _recv(rogue)
        assert welcome[1] == P.WELCOME
        key = msgpack.unpackb(welcome[2])["key"]
        rogue.send_multipart([P.WORKER, P.LANE, msgpack.packb({"key": key, "lane": 0, "pid": 1})])
        rogue.send_multipart(forged)
        rogue.send_multipart(failed)
        answer = _recv(victim)
        assert answer[:3] == [P.MASTER, P.RESULT, b"T1"] and decode(answer[3:]) == "genuine"
        assert not victim.poll(300)
    finally:
        for sock in opened:
            sock.close(linger=0)
        ctx.term()


def test_two_masters_may_use_the_same_task_id(secure: Any) -> None:
    """Before, the second SUBMIT of an id was taken for a resend of the first: its master never heard."""
    ctx = zmq.Context()
    server, pair = _broker_key(secure), load(secure.keys / "harness.key_secret")
    opened: list[zmq.Socket[Any]] = []
    try:
        for n in range(2):
            sock, monitor = _dealer(ctx, secure.frontend, pair, server)  # type: ignore[arg-type]
            opened.extend((sock, monitor))
            sock.send_multipart(_submit(b"same-id", "echo", f"from {n}"))
        for n in range(2):
            answer = _recv(opened[2 * n])
            assert answer[:3] == [P.MASTER, P.RESULT, b"same-id"] and decode(answer[3:]) == f"from {n}"
    finally:
        for sock in opened:
            sock.close(linger=0)
        ctx.term()


def test_the_cli_speaks_curve_from_the_yaml(secure: Any, tmp_path: Path) -> None:
    """`ndpipe status` with an admin key sees the worker; with a master-only key, its own tasks only;
    with no key at all it cannot reach the broker (exit 3)."""
    bob = _pair(secure, "bob")
    assert bob
    shutil.copy(secure.keys / "extra" / "bob.key", secure.keys / "masters")
    _reload(secure, 1)
    run = [sys.executable, "-m", "ndpipe.cli", "status", "--timeout", "5", "--config"]
    outputs = {}
    keys = secure.keys
    for who, secret in (("admin", keys / "harness.key_secret"), ("bob", keys / "extra" / "bob.key_secret")):
        config = tmp_path / f"{who}.yaml"
        config.write_text(f"master: {{broker: '{secure.frontend}'}}\nsecurity: {{curve: true, secret_key: '{secret}', "
                          f"broker_key: '{secure.keys / 'broker.key'}'}}\n")
        done = subprocess.run([*run, str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs[who] = done.stdout
    assert "/0" in outputs["admin"] and "your own tasks only" not in outputs["admin"]  # a lane address
    assert "your own tasks only" in outputs["bob"] and "/0" not in outputs["bob"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"master: {{broker: '{secure.frontend}'}}\n")
    done = subprocess.run([*run, str(plain)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr


def test_a_routing_id_taken_over_by_another_key_speaks_for_nobody(secure: Any) -> None:
    """Mallory, a listed master key, connects under the routing id Alice used (ROUTER_HANDOVER gives
    her the connection; such ids are random and shown to no one but admins, but the test knows it):
    what she sends under it is refused, so she can neither submit nor cancel in Alice's name."""
    mallory = _pair(secure, "mallory")
    shutil.copy(secure.keys / "extra" / "mallory.key", secure.keys / "masters")
    _reload(secure, 1)
    ctx = zmq.Context()
    server, alice_pair = _broker_key(secure), load(secure.keys / "harness.key_secret")
    opened: list[zmq.Socket[Any]] = []
    try:
        alice, monitor = _dealer(ctx, secure.frontend, alice_pair, server, b"M-alice-00000001")  # type: ignore[arg-type]
        opened += [alice, monitor]
        alice.send_multipart(_submit(b"A1", "echo", 1))
        assert _recv(alice)[:3] == [P.MASTER, P.RESULT, b"A1"]
        thief, monitor = _dealer(ctx, secure.frontend, mallory, server, b"M-alice-00000001")
        opened += [thief, monitor]
        thief.send_multipart(_submit(b"A2", "echo", 2))
        thief.send_multipart([P.MASTER, P.CANCEL, b"A1"])
        wait_until(lambda: "its routing id belongs to key" in secure.logs(tail=10**6), what="the refusal")
        with secure.master() as m:
            assert m.status()["counters"]["submitted"] == 1  # Alice's only
    finally:
        for sock in opened:
            sock.close(linger=0)
        ctx.term()


def test_one_worker_key_registers_at_most_max_slots_per_key(make_cluster: Any) -> None:
    """Attack 1 with a listed key: a READY claiming very many slots drew 497 of 500 tasks. One key's
    daemons now register at most broker.max_slots_per_key slots in all; a READY past it is refused
    (unanswered) and the work keeps going to the workers that are within it."""
    c = make_cluster(broker={**STEADY, "max_slots_per_key": 4}, curve=True)
    c.start(workers=1, processes=1)  # the harness's worker key: 1 lane × 1 credit
    rogue = _pair(c, "rogue")
    shutil.copy(c.keys / "extra" / "rogue.key", c.keys / "workers")
    _reload(c, 1)
    ctx = zmq.Context()
    opened: list[zmq.Socket[Any]] = []

    def ready(name: str, lanes: int) -> zmq.Socket[Any]:
        sock, monitor = _dealer(ctx, c.backend, rogue, _broker_key(c))
        opened.extend((sock, monitor))
        sock.send_multipart([P.WORKER, P.READY, msgpack.packb({"services": ["echo"], "lanes": lanes, "credit": 1,
                                                               "id": name})])
        return sock

    try:
        with c.master() as m:
            greedy = ready("greedy", 5)  # 5 slots > 4
            wait_until(lambda: "slots would pass broker.max_slots_per_key = 4" in c.logs(tail=10**6),
                       what="the greedy READY refused")
            assert not greedy.poll(500)  # no WELCOME
            assert [w["id"] for w in m.status()["workers"]] != ["greedy"] and m.status()["services"]["echo"][
                "slots"] == 1
            assert [m.submit("echo", i).result(timeout=30) for i in range(20)] == list(range(20))
            modest = ready("modest", 4)  # exactly the bound: taken
            assert modest.poll(20_000) and modest.recv_multipart()[1] == P.WELCOME
            refused = m.status()["counters"]["messages_refused"]
            more = ready("more", 1)  # the same key past the bound, while "modest" is alive (3 s without a heartbeat)
            wait_until(lambda: m.status()["counters"]["messages_refused"] == refused + 1, what="the next READY refused")
            assert not more.poll(0)  # and never welcomed
    finally:
        for sock in opened:
            sock.close(linger=0)
        ctx.term()


def test_a_socket_presenting_a_connected_workers_id_gets_nothing(secure: Any) -> None:
    """Attack 3 as the issue ran it: a new socket under a worker's routing id (an admin's STATUS shows
    a daemon's) received the messages meant for it. With curve on the workers' socket hands no id over:
    libzmq leaves the impostor's connection unread and unwritten, the worker keeps its link and work."""
    rogue = _pair(secure, "rogue")
    shutil.copy(secure.keys / "extra" / "rogue.key", secure.keys / "workers")
    _reload(secure, 1)
    ctx = zmq.Context()
    opened: list[zmq.Socket[Any]] = []
    try:
        with secure.master() as m:
            [worker] = m.status()["workers"]
            thief, monitor = _dealer(ctx, secure.backend, rogue, _broker_key(secure), bytes.fromhex(worker["conn"]))
            opened += [thief, monitor]
            _await_event(monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED})  # its key is listed: the handshake passes
            thief.send_multipart([P.WORKER, P.HEARTBEAT])  # and what it says under that id is not read
            assert [m.submit("echo", i).result(timeout=30) for i in range(20)] == list(range(20))
            [after] = m.status()["workers"]
            assert after["conn"] == worker["conn"] and m.status()["counters"]["requeued"] == 0
            # The broker heartbeats that id every 0.5 s: with the id handed over, the impostor got them
            # (and the worker lost its link). Three intervals, not one message:
            assert not thief.poll(1500)
    finally:
        for sock in opened:
            sock.close(linger=0)
        ctx.term()


def test_a_worker_key_cannot_take_over_another_keys_worker_by_its_name(secure: Any) -> None:
    """A READY under a registered name replaces that worker (how a daemon re-registers); with curve on
    only the key that registered it may do so."""
    rogue = _pair(secure, "rogue")
    shutil.copy(secure.keys / "extra" / "rogue.key", secure.keys / "workers")
    _reload(secure, 1)
    with secure.master() as m:
        [worker] = m.status()["workers"]
        ctx = zmq.Context()
        sock, monitor = _dealer(ctx, secure.backend, rogue, _broker_key(secure))
        try:
            sock.send_multipart([P.WORKER, P.READY, msgpack.packb({"services": ["echo"], "lanes": 1, "credit": 1,
                                                                   "id": worker["id"]})])
            wait_until(lambda: "is another key's worker" in secure.logs(tail=10**6), what="the READY refused")
            assert [w["id"] for w in m.status()["workers"]] == [worker["id"]]
            assert m.submit("echo", 7).result(timeout=30) == 7
        finally:
            sock.close(linger=0)
            monitor.close(linger=0)
            ctx.term()


def test_missing_or_wrong_key_files_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    from ndpipe.security import client_curve, server_curve

    public, secret = generate("me", tmp_path)
    cases = [(SecurityConfig(curve=True), "security.secret_key: required"),
             (SecurityConfig(curve=True, secret_key=str(public)), "holds only a public key"),
             (SecurityConfig(curve=True, secret_key=str(secret)), "security.broker_key: required"),
             (SecurityConfig(curve=True, secret_key=str(secret), broker_key=str(tmp_path / "nope.key")),
              "security.broker_key: .*no such key file")]
    for sec, message in cases:
        with pytest.raises(ConfigError, match=message):
            client_curve(sec)
    assert server_curve(SecurityConfig(curve=True, secret_key=str(secret))) is not None
    assert client_curve(SecurityConfig()) is None and server_curve(SecurityConfig()) is None
    config = tmp_path / "w.yaml"
    config.write_text(f"security: {{curve: true, secret_key: '{secret}'}}\n")
    done = subprocess.run([sys.executable, "-m", "ndpipe.cli", "worker", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "security.broker_key: required" in done.stderr


def test_a_master_with_an_unlisted_key_is_told_why_it_cannot_reach_the_broker(secure: Any) -> None:
    from ndpipe.config import MasterConfig
    from ndpipe.master import Master

    _pair(secure, "stranger")
    sec = SecurityConfig(curve=True, secret_key=str(secure.keys / "extra" / "stranger.key_secret"),
                         broker_key=str(secure.keys / "broker.key"))
    cfg = MasterConfig(broker=secure.frontend, broker_timeout=2.0, heartbeat_interval=0.5)
    with Master(secure.frontend, config=cfg, security=sec) as m:
        with pytest.raises(BrokerUnreachable, match="the broker refused this program's key"):
            m.submit("echo", 1).result(timeout=30)


def test_with_curve_on_a_killed_lane_and_a_restarted_broker_are_recovered_from(make_cluster: Any) -> None:
    """The reliability paths over CURVE: a lane killed mid-task is replaced (new connection, new random
    routing id, a new handshake) and its task rerun; after a broker restart (same key) the daemon
    registers again and the master's resend is answered."""
    c = make_cluster(broker=STEADY, curve=True)
    c.start(workers=1, processes=1)
    with c.master() as m:
        pid = m.submit("pid").result(timeout=30)
        slow = m.submit("sleep", 1.0, "done")
        wait_until(lambda: m.status()["services"]["sleep"]["inflight"] == 1, what="the sleep at its lane")
        os.kill(pid, signal.SIGKILL)
        assert slow.result(timeout=60) == "done"
        assert m.submit("pid").result(timeout=30) != pid  # a new lane answers
        c.kill_broker()
        after = m.submit("echo", "again")
        c.start_broker()
        assert after.result(timeout=60) == "again"
