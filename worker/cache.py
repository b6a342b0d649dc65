"""One host's copy of the arrays sent once (``Master.put``, PROTOCOL.md §5.4): the daemon's cache.

The daemon fetches an array's bytes once per host (W_FETCH → broker → the task's master → W_DATA),
checks that they hash to the digest, and keeps them in a sealed memfd. A lane that needs them gets
the descriptor over its pipe (SCM_RIGHTS) and maps it read-only: every lane of the host reads the
same pages, nobody can change them, and no other process can open them (a memfd has no name).
Bounded by ``worker.cache_bytes``, least recently used out first; an evicted array stays mapped in
the lanes that use it until they drop it (L_EVICT, between tasks).

Socket-free: the daemon asks :class:`RefCache` and :class:`Fetches` what to do, and does it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ndpipe import protocol as P
from ndpipe.refs import digest_of

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


@dataclass(slots=True)
class Entry:
    fd: int  # a sealed memfd holding the bytes
    size: int
    meta: bytes  # the array's description (dtype, shape, order), hashed with the bytes


class RefCache:
    """digest -> :class:`Entry`, at most ``limit`` bytes, least recently used evicted first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()

    def get(self, digest: bytes) -> Entry | None:
        entry = self.entries.get(digest)
        if entry is not None:
            self.entries.move_to_end(digest)
        return entry

    def admit(self, digest: bytes, meta: bytes, data: Any) -> str | tuple[Entry, list[bytes]]:
        """Check fetched bytes and keep them: (entry, digests evicted to make room), or why not."""
        size = memoryview(data).nbytes
        if size > self.limit:
            return f"the array's {size} bytes exceed worker.cache_bytes = {self.limit} on this host"
        if digest_of(meta, data) != digest:
            return "the bytes received do not hash to the ref's digest (refused)"
        evicted = []
        while self.used + size > self.limit and self.entries:
            old, entry = self.entries.popitem(last=False)
            self._drop(entry)
            evicted.append(old)
        entry = Entry(sealed_memfd(digest, data, size), size, meta)
        self.entries[digest] = entry
        self.used += size
        return entry, evicted

    def _drop(self, entry: Entry) -> None:
        os.close(entry.fd)
        self.used -= entry.size

    def close(self) -> None:
        for entry in self.entries.values():
            self._drop(entry)
        self.entries.clear()


def sealed_memfd(digest: bytes, data: Any, size: int) -> int:
    """An anonymous file holding ``data``, sealed so that neither size nor content can change."""
    fd = os.memfd_create(f"ndpipe-ref-{digest.hex()[:16]}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if size:
            with mmap.mmap(fd, size) as mm:
                mm[:] = memoryview(data).cast("B")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # F_SEAL_WRITE: the writable map is gone by now
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(slots=True)
class Fetch:
    """One W_FETCH in flight and the lanes waiting for its answer."""

    tid: bytes
    expires: float
    waiters: list[Any] = field(default_factory=list)


class Fetches:
    """At most one fetch per digest in flight per host; lanes asking meanwhile wait for that one."""

    def __init__(self, timeout: float = P.FETCH_TIMEOUT) -> None:
        self.timeout = timeout
        self.inflight: dict[bytes, Fetch] = {}

    def want(self, digest: bytes, tid: bytes, waiter: Any, now: float) -> bool:
        """Add ``waiter``; True if a W_FETCH must go out (none in flight for that digest)."""
        fetch = self.inflight.get(digest)
        if fetch is None:
            self.inflight[digest] = Fetch(tid, now + self.timeout, [waiter])
            return True
        fetch.waiters.append(waiter)
        return False

    def done(self, digest: bytes) -> list[Any]:
        """The waiters of the fetch W_DATA answers ([] for an answer nobody waits for)."""
        fetch = self.inflight.pop(digest, None)
        return fetch.waiters if fetch is not None else []

    def expired(self, now: float) -> list[tuple[bytes, list[Any]]]:
        gone = [digest for digest, fetch in self.inflight.items() if fetch.expires <= now]
        return [(digest, self.inflight.pop(digest).waiters) for digest in gone]

    def next_expiry(self) -> float:
        return min((f.expires for f in self.inflight.values()), default=float("inf"))
