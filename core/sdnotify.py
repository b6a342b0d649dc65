"""systemd's notify protocol (sd_notify(3)): READY=1, STATUS=, STOPPING=1 and WATCHDOG=1 for the daemons.

Why our own few lines and not libsystemd bindings: the protocol is one datagram of ``KEY=VALUE``
lines sent to the AF_UNIX socket named in ``$NOTIFY_SOCKET`` (a path, or an abstract name written
with a leading ``@``), and a Python binding would be a compiled dependency on every worker host.

A :class:`Notifier` built without ``$NOTIFY_SOCKET`` (a terminal, the tests' cluster, docker) does
nothing, so the loops call it unconditionally. Sending never raises: a daemon must not stop serving
because systemd's socket went away; the first failure is logged, later ones are not. Sends are
non-blocking: a full notify queue drops the datagram rather than stall the poll loop (which is what
the watchdog would then kill). Time methods take ``now`` (``time.monotonic()``), so pacing is tested
without sleeping.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, MutableMapping

log = logging.getLogger("ndpipe.sdnotify")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
STATUS_EVERY = 5.0  # seconds between STATUS= lines: what `systemctl status` shows, not a metrics feed


def _address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address: ``@name`` is Linux's abstract namespace (a leading NUL)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # unset, or a vsock address (vsock:CID:PORT) that a daemon in a unit never gets


class Notifier:
    """Messages to the service manager; every method is a no-op when it did not ask for them."""

    address: str | bytes | None
    watchdog_every: float  # seconds between WATCHDOG=1: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) says; 0 off
    status_every: float
    next_watchdog: float
    next_status: float

    def __init__(self, address: str = "", watchdog_usec: int = 0, status_every: float = STATUS_EVERY) -> None:
        self.address = _address(address)
        self.watchdog_every = watchdog_usec / 2e6 if self.address is not None and watchdog_usec > 0 else 0.0
        self.status_every = status_every
        self.next_watchdog = self.next_status = float("-inf")  # the first tick sends both
        self._sock: socket.socket | None = None
        self._failed = False  # a send failed already: later failures are logged at DEBUG only
        self._describe_failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str], pid: int | None = None) -> Notifier:
        """The notifier systemd asked for in ``environ``, whose variables are then removed (as
        sd_notify's ``unset_environment``) so that lanes, handlers and their children cannot speak for
        the service. WATCHDOG_PID naming another process turns the watchdog off for this one."""
        address = environ.pop(NOTIFY_SOCKET, "")
        usec_text = environ.pop(WATCHDOG_USEC, "")
        watchdog_pid = environ.pop(WATCHDOG_PID, "")
        try:
            usec = int(usec_text) if usec_text else 0
        except ValueError:
            usec = 0
        if watchdog_pid.strip() and watchdog_pid.strip() != str(os.getpid() if pid is None else pid):
            usec = 0
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def due(self) -> float:
        """When :meth:`tick` next has something to send (monotonic; +inf when disabled): a loop that
        may sleep longer bounds its poll timeout by this."""
        if not self.enabled:
            return float("inf")
        return min(self.next_status, self.next_watchdog if self.watchdog_every else float("inf"))

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; False (logged the first time) if it could not go."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket.MSG_DONTWAIT, self.address)
            return True
        except OSError as exc:
            level = logging.DEBUG if self._failed else logging.WARNING
            log.log(level, "cannot notify systemd at %s: %s", self._shown(), exc)
            self._failed = True
            return False

    def _shown(self) -> str:
        address = self.address
        return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else str(address)

    def ready(self, status: str = "") -> bool:
        """Start-up is done (the broker bound, the worker registered): systemd starts ordered units."""
        return self.send("READY=1", *([f"STATUS={_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """The one line ``systemctl status`` shows under the unit."""
        return self.send(f"STATUS={_line(text)}")

    def stopping(self, status: str = "") -> bool:
        """Stopping began (the watchdog no longer applies; TimeoutStopSec= does)."""
        return self.send("STOPPING=1", *([f"STATUS={_line(status)}"] if status else []))

    def watchdog(self, now: float) -> bool:
        """WATCHDOG=1, at most every ``watchdog_every`` seconds: the loop calls this on every pass."""
        if not self.watchdog_every or now < self.next_watchdog:
            return False
        self.next_watchdog = now + self.watchdog_every
        return self.send("WATCHDOG=1")

    def tick(self, now: float, describe: Callable[[float], str]) -> None:
        """Once per loop pass: the watchdog ping when due, and every ``status_every`` seconds the
        STATUS line ``describe(now)`` builds (not called at all when systemd did not ask)."""
        self.watchdog(now)
        if not self.enabled or now < self.next_status:
            return
        self.next_status = now + self.status_every
        try:
            text = describe(now)
        except Exception:  # a bug in a status line must not stop the loop it reports on
            log.log(logging.DEBUG if self._describe_failed else logging.WARNING, "cannot build the STATUS line",
                    exc_info=True)
            self._describe_failed = True
            return
        self.status(text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Rate:
    """Events per second of a growing counter, between two readings (the first reading gives 0)."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None

    def update(self, count: int, now: float) -> float:
        last, self._last = self._last, (now, count)
        if last is None or now <= last[0]:
            return 0.0
        return max(0, count - last[1]) / (now - last[0])


def _line(text: str) -> str:
    """STATUS= takes one line: a newline would start another KEY=VALUE field."""
    return " ".join(text.split("\n"))
