"""Socket-free bookkeeping of a worker daemon's compute slots: who runs what, what waits, deadlines.

The daemon's poll loop feeds events in (task arrived, child ready, child answered, child died) and
asks what to start and what has overrun its deadline; every time method takes ``now``.

Pipelining: a slot holds up to ``depth`` jobs. The head runs; the others already sit in the child's
socket, so the child starts the next one without waiting for a round trip through the daemon (with
tiny tasks that round trip, not the work, was the bound). A compute process handles its messages
in order, so the answer for a slot is always its head's; a job's deadline starts when it becomes
the head. When a child dies only the head is reported CRASHED: the jobs queued behind it never ran
and go back to the front of ``pending`` without an attempt counted.
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
    deadline: float | None = None  # set when it starts running (becomes the head of its slot)
    flags: int = 0  # from the TASK meta (FLAG_BATCH: the payload is a batch of calls)
    cancelled: bool = False  # cancelled while queued in a child: its answer is dropped


@dataclass(slots=True)
class Slot:
    index: int
    ready: bool = False  # said HELLO since it was (re)started
    queue: deque[Job] = field(default_factory=deque)  # sent to the child; the head is running
    reported: bool = False  # the head's outcome was already sent (timeout/cancel): the child is being killed

    @property
    def job(self) -> Job | None:
        """The running job."""
        return self.queue[0] if self.queue else None


@dataclass
class Pool:
    """N compute slots of up to ``depth`` jobs each, and the queue of jobs waiting for one."""

    size: int
    depth: int = 1
    slots: list[Slot] = field(init=False)
    pending: deque[Job] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.size)]
        self.depth = max(1, self.depth)

    @property
    def running(self) -> int:
        """Jobs handed to compute processes (running or queued in their sockets)."""
        return sum(len(s.queue) for s in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.pending) or self.running > 0

    def add(self, job: Job) -> None:
        self.pending.append(job)

    def child_ready(self, index: int) -> None:
        self.slots[index].ready = True

    def next_start(self, now: float) -> tuple[Slot, Job] | None:
        """The next (slot, job) to send: an idle child first, else the shortest queue below ``depth``."""
        if not self.pending:
            return None
        best: Slot | None = None
        for slot in self.slots:
            if slot.ready and not slot.reported and len(slot.queue) < self.depth:
                if best is None or len(slot.queue) < len(best.queue):
                    best = slot
                    if not slot.queue:
                        break
        if best is None:
            return None
        job = self.pending.popleft()
        if not best.queue:
            job.deadline = now + job.timeout if job.timeout else None
            best.reported = False
        best.queue.append(job)
        return best, job

    def finished(self, index: int, tid: bytes, now: float = 0.0) -> Job | None:
        """A child answered; return its job if the answer is still wanted.

        A slot whose head was already reported (timeout, cancel) stays occupied: its process is
        being killed, and only :meth:`died` frees it, so no new job is sent to a dying process.
        """
        slot = self.slots[index]
        job = slot.job
        if job is None or job.tid != tid or slot.reported:
            return None
        slot.queue.popleft()
        head = slot.job
        if head is not None:
            head.deadline = now + head.timeout if head.timeout else None
        return None if job.cancelled else job

    def requeue(self, index: int, alive: bool = False) -> None:
        """The newest job could not be handed to its process: put it back at the front. Unless the
        process is known ``alive`` (a full pipe), the slot waits for a new HELLO."""
        slot = self.slots[index]
        if slot.queue:
            job = slot.queue.pop()
            job.deadline = None
            self.pending.appendleft(job)
        slot.ready = slot.ready and alive

    def died(self, index: int) -> Job | None:
        """A child died; return the job it was running unless its outcome was already reported.
        Jobs queued behind it never ran: they go back to the front of ``pending``."""
        slot = self.slots[index]
        head, reported = slot.job, slot.reported
        behind = list(slot.queue)[1:]
        slot.queue.clear()
        slot.ready, slot.reported = False, False
        for job in reversed(behind):
            if not job.cancelled:
                job.deadline = None
                self.pending.appendleft(job)
        if head is None or reported or head.cancelled:
            return None
        return head

    def overdue(self, now: float) -> list[Slot]:
        """Slots whose running job passed its deadline and has not been reported yet."""
        return [
            s for s in self.slots
            if s.job is not None and not s.reported and s.job.deadline is not None and s.job.deadline <= now
        ]

    def next_deadline(self) -> float | None:
        deadlines = [s.job.deadline for s in self.slots
                     if s.job is not None and not s.reported and s.job.deadline is not None]
        return min(deadlines) if deadlines else None

    def cancel(self, tid: bytes) -> Slot | None:
        """Drop a waiting job; return the slot running it (the caller kills that child); a job queued
        in a child is marked, and its answer dropped when it comes."""
        for job in self.pending:
            if job.tid == tid:
                self.pending.remove(job)
                return None
        for slot in self.slots:
            for i, job in enumerate(slot.queue):
                if job.tid == tid:
                    if i == 0:
                        slot.reported = True
                        return slot
                    job.cancelled = True
                    return None
        return None

    def drop_pending(self) -> int:
        """The broker forgot us (and requeued our tasks): drop what has not started, including jobs
        waiting in a process's socket (marked, so their answers are dropped)."""
        n = len(self.pending)
        self.pending.clear()
        for slot in self.slots:
            for job in list(slot.queue)[1:]:
                if not job.cancelled:
                    job.cancelled = True
                    n += 1
        return n
