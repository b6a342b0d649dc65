"""sd_notify for the daemons: the notifier against a fake NOTIFY_SOCKET, then a real broker and worker
started through the CLI with NOTIFY_SOCKET and WATCHDOG_USEC set, as systemd starts them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from ndpipe.runtime import PARENT_ENV
from ndpipe.sdnotify import Notifier, Rate

pytestmark = pytest.mark.timeout(60)


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound AF_UNIX datagram socket, read with a timeout."""

    def __init__(self, address: str) -> None:
        self.env = address  # what NOTIFY_SOCKET says
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = 10.0) -> dict[str, str]:
        """The next datagram as a map; TimeoutError (socket.timeout) if none comes in time."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        fields = dict(line.partition("=")[::2] for line in data.split("\n") if line)
        self.seen.append(fields)
        return fields

    def until(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """Read datagrams until one carries ``key``; fail naming what came instead."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} within {timeout} s; got {self.seen}")
            try:
                fields = self.next(left)
            except TimeoutError:
                continue
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def fake_systemd(request: pytest.FixtureRequest, tmp_short: Path) -> Iterator[FakeSystemd]:
    address = str(tmp_short / "notify") if request.param == "path" else f"@ndpipe-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(address)
    yield fake
    fake.close()


# ---- the notifier alone ---------------------------------------------------------------------------
def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    # Given an environment systemd did not prepare
    notifier = Notifier.from_environ({})
    # Then every message is a no-op and the loop is never woken for it
    assert not notifier.enabled and notifier.due == float("inf")
    assert not notifier.ready() and not notifier.watchdog(0.0) and not notifier.stopping()
    notifier.tick(0.0, lambda now: pytest.fail("describe called with nobody to tell"))


def test_messages_reach_the_socket_and_the_environment_is_cleared(fake_systemd: FakeSystemd) -> None:
    # Given NOTIFY_SOCKET (a path or an @abstract name) and a watchdog for this pid
    env = {"NOTIFY_SOCKET": fake_systemd.env, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    notifier = Notifier.from_environ(env)
    # Then the variables are gone from what children would inherit, and the watchdog pings every 2 s
    assert env == {"OTHER": "kept"}
    assert notifier.watchdog_every == 2.0
    # When the daemon reports
    assert notifier.ready("bound")
    assert notifier.status("queued 3\nsecond line")
    assert notifier.stopping()
    notifier.close()
    # Then systemd reads each as one datagram of KEY=VALUE lines (a STATUS stays one line)
    assert fake_systemd.next() == {"READY": "1", "STATUS": "bound"}
    assert fake_systemd.next() == {"STATUS": "queued 3 second line"}
    assert fake_systemd.next() == {"STOPPING": "1"}


def test_watchdog_is_paced_at_half_its_timeout(fake_systemd: FakeSystemd) -> None:
    # Given WatchdogSec=10 (WATCHDOG_USEC 10 s): a ping at most every 5 s
    notifier = Notifier(fake_systemd.env, watchdog_usec=10_000_000)
    # When the loop calls it on every pass (injected time)
    sent = [now for now in (100.0, 101.0, 104.9, 105.0, 105.1, 109.9, 110.0) if notifier.watchdog(now)]
    notifier.close()
    # Then only these passes sent WATCHDOG=1
    assert sent == [100.0, 105.0, 110.0]
    assert [fake_systemd.next() for _ in sent] == [{"WATCHDOG": "1"}] * 3


def test_watchdog_of_another_pid_or_none_is_off(fake_systemd: FakeSystemd) -> None:
    # Given a watchdog meant for another process, and a service without WatchdogSec=
    other = Notifier.from_environ({"NOTIFY_SOCKET": fake_systemd.env, "WATCHDOG_USEC": "1000000",
                                   "WATCHDOG_PID": str(os.getpid() + 1)})
    none = Notifier.from_environ({"NOTIFY_SOCKET": fake_systemd.env})
    # Then neither pings, though both still report
    assert not other.watchdog(0.0) and not none.watchdog(0.0)
    assert other.due == none.due == float("-inf")  # the first STATUS line is due at once
    other.close()
    none.close()


def test_tick_sends_status_every_few_seconds_and_survives_a_bad_describe(fake_systemd: FakeSystemd) -> None:
    # Given a notifier with a watchdog of 2 s (pings every 1 s) and STATUS every 5 s
    notifier = Notifier(fake_systemd.env, watchdog_usec=2_000_000, status_every=5.0)
    calls: list[float] = []

    def describe(now: float) -> str:
        calls.append(now)
        if len(calls) == 2:
            raise RuntimeError("bug in a status line")
        return f"at {now:g}"

    # When the loop ticks at these times
    for now in (0.0, 0.5, 1.0, 5.0, 10.0):
        notifier.tick(now, describe)
    notifier.close()
    # Then STATUS went at 0 and 10 (5's describe failed, the loop went on), WATCHDOG at 0, 1, 5, 10
    assert calls == [0.0, 5.0, 10.0]
    got = [fake_systemd.next() for _ in range(6)]
    assert [g for g in got if "STATUS" in g] == [{"STATUS": "at 0"}, {"STATUS": "at 10"}]
    assert sum(1 for g in got if "WATCHDOG" in g) == 4
    assert notifier.due == 11.0


def test_a_vanished_socket_never_raises(tmp_short: Path) -> None:
    # Given NOTIFY_SOCKET naming nothing (systemd restarted, or a stale variable)
    notifier = Notifier(str(tmp_short / "gone"), watchdog_usec=1_000_000)
    # Then sending reports failure instead of raising into the loop
    assert not notifier.ready()
    assert not notifier.watchdog(0.0)
    notifier.tick(5.0, lambda now: "still serving")
    notifier.close()


def test_rate_counts_per_second_between_readings() -> None:
    rate = Rate()
    assert rate.update(100, 10.0) == 0.0
    assert rate.update(400, 12.0) == 150.0
    assert rate.update(400, 12.0) == 0.0  # no time passed: no division by zero


# ---- real daemons, started as systemd would start them ------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def config(tmp_short: Path) -> Path:
    """A broker on two free loopback ports and a one-lane worker that reconnects fast."""
    front, back = free_port(), free_port()
    data = {"broker": {"frontend": f"tcp://127.0.0.1:{front}", "backend": f"tcp://127.0.0.1:{back}",
                       "heartbeat_interval": 0.5, "liveness": 6},
            "worker": {"broker": f"tcp://127.0.0.1:{back}", "processes": 1, "reconnect_min": 0.1,
                       "reconnect_max": 0.5, "drain_timeout": 2.0},
            "master": {"broker": f"tcp://127.0.0.1:{front}"}}
    path = tmp_short / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def start(tmp_short: Path) -> Iterator[Any]:
    """``start(role, config, **env)``: an ndpipe daemon through the CLI; every one is stopped by pid
    at teardown (TERM, then KILL), and dies with this process if it is killed outright."""
    procs: list[subprocess.Popen[bytes]] = []

    def launch(role: str, config: Path, **env: str) -> subprocess.Popen[bytes]:
        log = open(tmp_short / f"{role}-{len(procs)}.log", "wb")
        with log:
            proc = subprocess.Popen([sys.executable, "-m", "ndpipe.cli", role, "--config", str(config)],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, PARENT_ENV: str(os.getpid()), **env})
        procs.append(proc)
        return proc

    yield launch
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for path in sorted(tmp_short.glob("*.log")):  # shown by pytest when the test failed
        print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")


def notify_env(fake: FakeSystemd) -> dict[str, str]:
    """What systemd sets for Type=notify with WatchdogSec=1 (pings every 0.5 s)."""
    return {"NOTIFY_SOCKET": fake.env, "WATCHDOG_USEC": "1000000"}


def test_broker_is_ready_once_bound_reports_pings_and_says_stopping(fake_systemd: FakeSystemd, config: Path,
                                                                    start: Any) -> None:
    # Given a broker started with NOTIFY_SOCKET and a 1 s watchdog
    broker = start("broker", config, **notify_env(fake_systemd))
    # Then READY=1 comes once both sockets are bound, naming them
    ready = fake_systemd.until("READY")
    assert ready["READY"] == "1" and "masters on tcp://127.0.0.1:" in ready["STATUS"]
    # And the loop reports its state and pings the watchdog
    status = fake_systemd.until("STATUS")
    assert status["STATUS"].startswith("masters 0, workers 0 (0 lanes), queued 0, in flight 0, ")
    assert fake_systemd.until("WATCHDOG") == {"WATCHDOG": "1"}
    # When systemd stops it
    broker.send_signal(signal.SIGTERM)
    # Then it says STOPPING=1 and exits 0
    fake_systemd.until("STOPPING")
    assert broker.wait(20) == 0


def test_a_second_broker_on_the_same_ports_exits_75(fake_systemd: FakeSystemd, config: Path, start: Any) -> None:
    # Given a broker that is bound (it said READY=1)
    start("broker", config, **notify_env(fake_systemd))
    fake_systemd.until("READY")
    # When another starts on the same ports
    second = subprocess.run([sys.executable, "-m", "ndpipe.cli", "broker", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    # Then it exits 75 (EX_TEMPFAIL: the units restart on it), naming the endpoint
    assert second.returncode == 75, second.stderr
    assert "broker.frontend: cannot bind tcp://127.0.0.1:" in second.stderr


def test_worker_is_ready_only_once_registered(fake_systemd: FakeSystemd, config: Path, start: Any,
                                              tmp_short: Path) -> None:
    # Given worker instance 7 started before any broker, as ndpipe-worker@7 with NOTIFY_SOCKET
    worker = start("worker", config, NDPIPE_WORKER_INSTANCE="7", **notify_env(fake_systemd))
    # Then it says what it waits for and pings its watchdog, but is not READY
    waiting = fake_systemd.until("STATUS")
    while "waiting for broker" not in waiting["STATUS"]:
        waiting = fake_systemd.until("STATUS")
    assert waiting["STATUS"].startswith("worker instance 7: waiting for broker tcp://127.0.0.1:")
    fake_systemd.until("WATCHDOG")
    assert not any("READY" in fields for fields in fake_systemd.seen)
    # And its lane did not inherit NOTIFY_SOCKET (only the main process speaks for the unit)
    lanes = psutil.Process(worker.pid).children()
    assert lanes and all("NOTIFY_SOCKET" not in lane.environ() for lane in lanes)
    # When the broker comes up
    start("broker", config)
    # Then the worker registers and says READY=1 with its state
    ready = fake_systemd.until("READY")
    assert ready["STATUS"].startswith("worker instance 7: registered with tcp://127.0.0.1:")
    assert "lanes 1/1" in ready["STATUS"]
    # And `ndpipe status` shows its instance
    shown = subprocess.run([sys.executable, "-m", "ndpipe.cli", "status", "--config", str(config)],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "instance 7" in shown.stdout, shown.stdout + shown.stderr
    # When systemd stops it
    worker.send_signal(signal.SIGTERM)
    # Then it says STOPPING=1 as draining begins, and exits 0
    stopping = fake_systemd.until("STOPPING")
    assert "draining" in stopping["STATUS"]
    assert worker.wait(20) == 0
    log = (tmp_short / "worker-0.log").read_text()
    assert re.search(r"worker instance 7 \S+ \(ndpipe [^)]+\) starting: broker ", log), log


def test_spool_is_ready_once_recovered_pings_and_says_stopping(fake_systemd: FakeSystemd, config: Path,
                                                              start: Any, tmp_short: Path) -> None:
    # Given a spool daemon (no broker needed to recover its journal) under a 1 s watchdog
    data = yaml.safe_load(config.read_text())
    data["spool"] = {"dir": str(tmp_short / "spool"), "poll_interval": 0.1}
    config.write_text(yaml.safe_dump(data))
    spool = start("spool", config, **notify_env(fake_systemd))
    # Then READY=1 once its directories and journal are in order, naming the inbox
    ready = fake_systemd.until("READY")
    assert ready["READY"] == "1" and ready["STATUS"] == f"watching {tmp_short / 'spool' / 'inbox'}"
    assert fake_systemd.until("WATCHDOG") == {"WATCHDOG": "1"}
    assert fake_systemd.until("STATUS")["STATUS"].startswith("0 jobs running, 0 done, 0 failed")
    # When systemd stops it: STOPPING=1 and exit 0
    spool.send_signal(signal.SIGTERM)
    assert fake_systemd.until("STOPPING")["STATUS"] == "finishing 0 jobs (up to 30 s)"
    assert spool.wait(20) == 0
