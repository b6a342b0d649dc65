"""``Master.map``'s engine: calls batched into few messages, results in input order, and the batches
that fail as a whole resubmitted call by call so only the culprit fails (README, "map sends its
calls in batches"). One :class:`Mapper` per Master; it submits through the master's own ``call`` and
``_enqueue``, and keeps no socket or thread of its own.
"""

from __future__ import annotations

import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from itertools import islice
from typing import TYPE_CHECKING, Any

from ndpipe import protocol as P
from ndpipe.codec import encode_batch, encode_call
from ndpipe.config import MAX_TIMEOUT
from ndpipe.errors import DecodeError, NdpipeError, TaskCrashed, TaskFailed, TaskTimeout, error_from_code

if TYPE_CHECKING:
    from ndpipe.master.client import Master

log = logging.getLogger("ndpipe.master")
MAX_CHUNK = 1024  # calls per batch chosen automatically by map()
CHUNK_BYTES = 8 << 20  # a batch larger than this when encoded is split (memory and latency per message)
SLOTS_TTL = 1.0  # seconds map() reuses a service's slot count from STATUS
AHEAD_BYTES = 256 << 20  # map(): encoded calls submitted and not yet yielded, at most


def size_of(frames: list[Any]) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


class Mapper:
    """Batching and ordering for one Master's ``map`` (and the ordering for ``pipeline_map``)."""

    def __init__(self, master: Master) -> None:
        self.m = master
        self.slots_cache: dict[str, tuple[float, int]] = {}  # service -> (when, slots) from STATUS

    def run(self, service: str, iterables: tuple[Iterable[Any], ...], timeout: float | None,
             chunksize: int | None) -> Iterator[Any]:
        size = chunksize or self.auto_chunksize(service, iterables)  # lazily: at the first next()
        calls = zip(*iterables, strict=False)
        if size == 1:
            yield from self.single(service, calls, timeout)
        else:
            yield from self.batched(service, calls, timeout, size)

    def single(self, service: str, calls: Iterator[tuple[Any, ...]], timeout: float | None) -> Iterator[Any]:
        return self.in_order(lambda args: self.m.call(service, args, timeout=timeout), calls)

    def in_order(self, start: Callable[[Any], Future[Any]], items: Iterable[Any]) -> Iterator[Any]:
        """Start one task per item, at most ``window`` ahead of the consumer; results in item order.
        The first error raises; the tasks not yet answered are then cancelled."""
        futures: deque[Future[Any]] = deque()
        try:
            for item in items:
                futures.append(start(item))
                while futures and (futures[0].done() or len(futures) >= self.m.window):
                    yield futures.popleft().result()
            while futures:
                yield futures.popleft().result()
        finally:
            for future in futures:
                future.cancel()

    def batched(
        self, service: str, calls: Iterator[tuple[Any, ...]], timeout: float | None, size: int
    ) -> Iterator[Any]:
        # (future, calls, index of its first call, encoded bytes) per batch submitted, in order
        batches: deque[tuple[Future[Any], list[tuple[Any, ...]], int, int]] = deque()
        # Calls submitted and not yet yielded: the window, or enough batches to fill every slot twice
        # (a batch is one task), and at most AHEAD_BYTES encoded so large calls cannot pile up.
        ahead = max(self.m.window, 2 * size * max(1, self.slots_cache.get(service, (0.0, 1))[1]))
        outstanding = submitted = ahead_bytes = 0
        try:
            for chunk in iter(lambda: list(islice(calls, size)), []):
                for part, payload in self.split_to_fit(chunk):
                    nbytes = size_of(payload)
                    batches.append((self.submit_part(service, part, payload, timeout), part, submitted, nbytes))
                    outstanding, submitted = outstanding + len(part), submitted + len(part)
                    ahead_bytes += nbytes
                while batches and (outstanding >= ahead or ahead_bytes > AHEAD_BYTES or batches[0][0].done()):
                    future, part, first, nbytes = batches.popleft()
                    outstanding, ahead_bytes = outstanding - len(part), ahead_bytes - nbytes
                    yield from self.part_results(service, future, part, first, timeout)
            while batches:
                future, part, first, _nb = batches.popleft()
                yield from self.part_results(service, future, part, first, timeout)
        finally:
            for future, _part, _first, _nb in batches:
                future.cancel()

    def auto_chunksize(self, service: str, iterables: tuple[Iterable[Any], ...]) -> int:
        """About four batches per slot (like Pool.map), bounded by the window and MAX_CHUNK."""
        n = min((operator.length_hint(it, -1) for it in iterables), default=-1)
        if n <= 1:
            return 1
        slots = max(1, self.service_slots(service))
        return max(1, min(-(-n // (4 * slots)), MAX_CHUNK))

    def service_slots(self, service: str) -> int:
        """The service's slot count from STATUS, cached for SLOTS_TTL so map() in a loop stays cheap."""
        now = time.monotonic()
        cached = self.slots_cache.get(service)
        if cached is not None and now - cached[0] < SLOTS_TTL:
            return cached[1]
        try:
            slots = int(self.m.status(timeout=2.0)["services"].get(service, {}).get("slots", 0))
        except NdpipeError:
            return 0
        self.slots_cache[service] = (now, slots)
        return slots

    def split_to_fit(self, chunk: list[tuple[Any, ...]]) -> list[tuple[list[tuple[Any, ...]], list[Any]]]:
        """(calls, encoded payload) parts: a batch over CHUNK_BYTES or the frame limits is cut into
        parts sized from its average call, each encoded once more (twice only if still too big)."""
        if len(chunk) == 1:
            return [(chunk, encode_call(list(chunk[0]), {}))]
        payload = encode_batch(chunk)
        sizes = [size_of([f]) for f in payload]
        total, frames = sum(sizes), len(payload) - 1
        if total <= CHUNK_BYTES and frames <= self.m.cfg.max_frames and max(sizes) <= self.m.cfg.max_frame_bytes:
            return [(chunk, payload)]
        parts = max(2, -(-total // CHUNK_BYTES), -(-frames // max(1, self.m.cfg.max_frames)))
        step = -(-len(chunk) // parts)
        return [piece for i in range(0, len(chunk), step) for piece in self.split_to_fit(chunk[i:i + step])]

    def submit_part(
        self, service: str, part: list[tuple[Any, ...]], payload: list[Any], timeout: float | None
    ) -> Future[Any]:
        """A plain task for one call, a FLAG_BATCH task (timeout × its size) for several."""
        timeout = self.m.timeout if timeout is None else timeout
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout!r}")
        self.m._check_open()
        if len(part) == 1:
            return self.m._enqueue(service, payload, timeout, self.m.cfg.max_attempts)
        total = min(MAX_TIMEOUT, timeout * len(part)) if timeout else None
        return self.m._enqueue(service, payload, total, self.m.cfg.max_attempts, P.FLAG_BATCH, len(part))

    def part_results(
        self, service: str, future: Future[Any], part: list[tuple[Any, ...]], first: int, timeout: float | None
    ) -> Iterator[Any]:
        if len(part) == 1:
            yield future.result()
            return
        try:
            values, errors = future.result()
        except (TaskTimeout, TaskCrashed, TaskFailed, DecodeError) as exc:
            log.info("batch of %d calls to %r failed as a whole (%s): resubmitting them one by one",
                     len(part), service, type(exc).__name__)
            yield from self.single(service, iter(part), timeout)
            return
        if errors:
            bad = min(errors)
            yield from values[:bad]
            code, details = errors[bad]
            raise error_from_code(code, f"map item {first + bad}", details)
        yield from values
