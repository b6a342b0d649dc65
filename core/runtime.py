"""Process plumbing for the daemons: signal handling that wakes the poll loop.

Signal handlers live only in entry points (uvicorn's habit): they set a flag and write to a
self-pipe that the poll loop watches, so SIGTERM is acted on at once, not at the next timeout.
A second SIGINT forces exit. Handlers are restored when the daemon returns.
"""

from __future__ import annotations

import os
import signal
from types import FrameType, TracebackType
from typing import Any


class StopSignal:
    """Context manager: ``stop.requested`` turns True on SIGTERM/SIGINT; ``stop.fd`` is pollable."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), install: bool = True) -> None:
        self.signals = signals if install else ()
        self.requested = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._saved: dict[int, Any] = {}

    @property
    def fd(self) -> int:
        return self._rfd

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up on a graceful stop
        self.requested = True
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wfd, b"\0")
        except BlockingIOError:
            pass

    def clear(self) -> None:
        """Drain the self-pipe after a wake-up."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass

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
