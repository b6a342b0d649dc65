"""sd_notify for the daemons: the notifier against a fake NOTIFY_SOCKET, then a real broker and worker
started through the CLI with NOTIFY_SOCKET and WATCHDOG_USEC set, as systemd starts them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

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
