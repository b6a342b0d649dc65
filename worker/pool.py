"""Socket-free bookkeeping of a worker daemon's compute slots: who runs what, what waits, deadlines.

The daemon's poll loop feeds events in (task arrived, child ready, child answered, child died) and
asks what to start and what has overrun its deadline; every time method takes ``now``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class Job:
    """A task as the worker holds it."""

    tid: bytes
    service: str
    payload: list[Any]
    timeout: float | None  # seconds, from the TASK meta or the service default
    deadline: float | None = None  # set when started
    flags: int = 0  # from the TASK meta (FLAG_BATCH: the payload is a batch of calls)


@dataclass(slots=True)
class Slot:
    index: int
    ready: bool = False  # said HELLO since it was (re)started
    job: Job | None = None
    reported: bool = False  # the job's outcome was already sent (timeout/cancel)


@dataclass
class Pool:
    """N compute slots and the queue of jobs waiting for one."""

    size: int
    slots: list[Slot] = field(init=False)
    pending: deque[Job] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.size)]

    @property
    def running(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def busy(self) -> bool:
        return bool(self.pending) or self.running > 0

    def add(self, job: Job) -> None:
        self.pending.append(job)

    def child_ready(self, index: int) -> None:
        self.slots[index].ready = True

    def next_start(self, now: float) -> tuple[Slot, Job] | None:
        """The next (slot, job) to start, with the job's deadline set; None if nothing fits."""
        if not self.pending:
            return None
        for slot in self.slots:
            if slot.ready and slot.job is None:
                job = self.pending.popleft()
                job.deadline = now + job.timeout if job.timeout else None
                slot.job, slot.reported = job, False
                return slot, job
        return None

    def finished(self, index: int, tid: bytes) -> Job | None:
        """A child answered; return its job if the answer is still wanted.

        A slot whose job was already reported (timeout, cancel) stays occupied: its process is
        being killed, and only :meth:`died` frees it, so no new job is sent to a dying process.
        """
        slot = self.slots[index]
        job = slot.job
        if job is None or job.tid != tid or slot.reported:
            return None
        slot.job = None
        return job

    def requeue(self, index: int, alive: bool = False) -> None:
        """The job could not be handed to its process: put it back at the front. Unless the
        process is known ``alive`` (a full pipe), the slot waits for a new HELLO."""
        slot = self.slots[index]
        if slot.job is not None:
            self.pending.appendleft(slot.job)
        slot.job = None
        slot.ready = slot.ready and alive

    def died(self, index: int) -> Job | None:
        """A child died; return the job it was running unless its outcome was already reported."""
        slot = self.slots[index]
        job, reported = slot.job, slot.reported
        slot.job, slot.ready, slot.reported = None, False, False
        return None if reported else job

    def overdue(self, now: float) -> list[Slot]:
        """Slots whose job passed its deadline and has not been reported yet."""
        return [
            s for s in self.slots
            if s.job is not None and not s.reported and s.job.deadline is not None and s.job.deadline <= now
        ]

    def next_deadline(self) -> float | None:
        deadlines = [s.job.deadline for s in self.slots
                     if s.job is not None and not s.reported and s.job.deadline is not None]
        return min(deadlines) if deadlines else None

    def cancel(self, tid: bytes) -> Slot | None:
        """Drop a waiting job, or return the slot running it (the caller kills that child)."""
        for job in self.pending:
            if job.tid == tid:
                self.pending.remove(job)
                return None
        for slot in self.slots:
            if slot.job is not None and slot.job.tid == tid:
                slot.reported = True
                return slot
        return None

    def drop_pending(self) -> int:
        n = len(self.pending)
        self.pending.clear()
        return n
