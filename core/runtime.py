"""Process plumbing for the daemons: signal handling that wakes the poll loop.

Signal handlers live only in entry points (uvicorn's habit): they set a flag and write to a
self-pipe that the poll loop watches, so SIGTERM is acted on at once, not at the next timeout.
A second SIGINT forces exit. Handlers are restored when the daemon returns.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import MutableMapping
from types import FrameType, TracebackType
from typing import Any


class StopSignal:
    """Context manager: ``stop.requested`` turns True on SIGTERM/SIGINT; ``stop.fd`` is pollable."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), install: bool = True,
                 reload: tuple[int, ...] = ()) -> None:
        self.signals = (*signals, *reload) if install else ()
        self.reload_signals = reload
        self.requested = False
        self.reload_requested = False  # SIGHUP (where asked for): re-read what can be re-read
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._saved: dict[int, Any] = {}

    @property
    def fd(self) -> int:
        return self._rfd

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum in self.reload_signals:
            self.reload_requested = True
            self.wake()
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up on a graceful stop
        self.requested = True
        self.wake()

    def wake(self) -> None:
        ring_pipe(self._wfd)

    def clear(self) -> None:
        """Drain the self-pipe after a wake-up."""
        drain_pipe(self._rfd)

    def request(self) -> None:
        """Ask for a stop from code (tests, embedding)."""
        self.requested = True
        self.wake()

    def __enter__(self) -> StopSignal:
        for sig in self.signals:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        os.close(self._rfd)
        os.close(self._wfd)


M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would) before any thread starts.

    libzmq's I/O thread allocates every received message; under a flood glibc gives that thread
    arenas of its own that keep their high-water mark, so the broker's RSS grew ~90 MB under
    100,000 garbage messages with no leak behind it (docs/RELIABILITY.md, garbage). Two arenas
    keep it near what the broker actually holds. Returns False where there is no glibc mallopt.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return True  # the operator chose; glibc read it at start
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


_LIBC: Any = None


def trim_heap() -> None:
    """Give freed heap pages back to the kernel (glibc ``malloc_trim``).

    Bursts of messages leave the heap fragmented: libzmq's buffers and Python objects interleave,
    and glibc returns memory to the kernel only from the top of the heap, so RSS keeps the peak of
    a burst long after everything was freed. malloc_trim releases the free pages inside it too.
    """
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None)
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def ring_pipe(fd: int) -> None:
    """Write one wake-up byte to a non-blocking pipe; a full pipe already holds wake-ups enough."""
    try:
        os.write(fd, b"\0")
    except BlockingIOError:
        pass


def drain_pipe(fd: int) -> None:
    """Read a non-blocking wake-up pipe until it is empty."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


PARENT_ENV = "NDPIPE_PARENT_PID"


def die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our parent dies, so no orphan keeps computing or holding sockets."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def follow_parent(environ: MutableMapping[str, str]) -> None:
    """Die with the launcher when it asks for it by setting ``NDPIPE_PARENT_PID`` to its own pid
    (the local cluster harness does: tests, benchmarks, ``ndpipe demo``). Removed from ``environ``
    so lanes and handlers' own children do not inherit it. A launcher already gone is an exit."""
    pid = environ.pop(PARENT_ENV, "")
    if not pid:
        return
    die_with_parent()
    if str(os.getppid()) != pid.strip():  # it died before prctl() took effect
        raise SystemExit(f"ndpipe: the process that started this one ({pid}) is gone")
