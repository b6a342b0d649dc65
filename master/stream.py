"""Streamed results (``Master.stream``, PROTOCOL.md §5.6): the parts a generator handler yields,
delivered in order, each once, as they are made.

The I/O thread hands each part to :meth:`Stream.part` (a part it already has — a rerun after the
broker restarted — is refused and acknowledged at once, so the rerun is not held up); the consuming
thread takes them in :meth:`Stream.__next__`, and each one taken is acknowledged (ACK), which is
what lets the lane send more: at most ``STREAM_WINDOW`` parts are ever on their way. The end comes
as the task's result (the number of parts) or its error, after the last part.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from typing import Any

_END = object()


class Stream(Iterator[Any]):
    """Iterate for the parts; leaving early (``break``, :meth:`close`, the ``with`` block's end, or
    dropping the object) cancels the stream, and its generator is stopped on the worker."""

    def __init__(self, future: Future[Any], ack: Callable[[int], None]) -> None:
        self.future = future
        self._ack = ack
        self._parts: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._received = 0  # I/O thread: the next part it accepts
        self._taken = 0  # consumer: parts handed out
        self._finished = False
        parts = self._parts  # not self: the future must not keep this object alive (leaving early = dropping it)
        future.add_done_callback(lambda f: parts.put(_END))

    # ---- the I/O thread ---------------------------------------------------------------------------
    def part(self, seq: int, value: Any) -> bool | None:
        """Take part ``seq``: True; False for a part it already has (a rerun's: the caller acknowledges
        it at once); None for a gap (a part lost on the way, e.g. in a dropped link): the caller ends
        the stream with an error rather than deliver it with a part missing."""
        if seq < self._received:
            return False
        if seq > self._received:
            return None
        self._received += 1
        self._parts.put(value)
        return True

    @property
    def received(self) -> int:
        """Parts received so far (the I/O thread's count)."""
        return self._received

    # ---- the consumer -----------------------------------------------------------------------------
    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        value = self._parts.get()
        if value is _END:
            self._finished = True
            if self.future.cancelled():
                raise StopIteration
            error = self.future.exception()
            if error is not None:
                raise error
            raise StopIteration
        self._ack(self._taken)
        self._taken += 1
        return value

    def close(self) -> None:
        """Stop the stream (the worker's generator is closed); parts not yet taken are dropped."""
        self._finished = True
        self.future.cancel()

    @property
    def parts(self) -> int:
        """Parts taken so far."""
        return self._taken

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self.future.done():
                self.future.cancel()
        except (CancelledError, RuntimeError):
            pass
