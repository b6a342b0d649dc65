"""The broker's records: a task, a worker daemon (host) and its lanes, the fair queue of a service.

Plain data with the few rules that belong to each (a lane's free credit, the queue's round robin);
:class:`~ndpipe.broker.state.BrokerState` ties them together.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

QUEUED = "queued"
INFLIGHT = "inflight"
DONE = "done"


@dataclass(slots=True, eq=False)
class Task:
    """One submission as the broker holds it."""

    tid: bytes  # the broker's id for it (task_key): what lanes see and answer to
    service: str
    master: bytes
    payload: list[Any]
    max_attempts: int
    timeout_ms: int = 0
    deadline: float | None = None  # absolute monotonic time; None = no timeout
    attempt: int = 0  # dispatches that counted (handed-back tasks do not count)
    worker: bytes | None = None
    state: str = QUEUED
    flags: int = 0  # OPTIONS flags, passed on to the worker in META (e.g. FLAG_BATCH)
    stages: tuple[str, ...] = ()  # a pipeline's services; ``service`` is stages[stage]
    stage: int = 0
    parts: int = 0  # FLAG_STREAM: parts forwarded to the master so far
    master_tid: bytes = b""  # the id its master gave it: what the master's replies carry
    nbytes: int = 0  # payload bytes counted in the broker's byte budget (ndpipe.broker.budget)
    account: bytes = b""  # whom they count against: the master's key with curve on, else its routing id
    born: float = 0.0  # monotonic time of its SUBMIT: the latency histogram times it to its result


def task_key(master: bytes, tid: bytes) -> bytes:
    """The broker's id for a master's task id: scoped by the master (PROTOCOL.md §5 rule 6), so one
    master's id can never name, answer or shadow another master's task. 16 bytes, whatever the id's
    length, so it fits a TASK's id frame."""
    return hashlib.blake2b(len(master).to_bytes(1, "big") + master + tid, digest_size=16).digest()


@dataclass(slots=True, eq=False)
class HostRecord:
    """A registered worker daemon: the liveness, services and per-lane credit of all its lanes."""

    hid: bytes  # routing id of the daemon's connection
    name: str  # the worker's id: lane addresses are "name/index"
    services: tuple[str, ...]
    nlanes: int
    credit: int  # tasks in flight per lane
    key: bytes  # what its lanes present to join it (random, sent only in WELCOME)
    expires: float
    info: dict[str, Any] = field(default_factory=dict)
    stats: bytes = b""  # its last HEARTBEAT stats frame, decoded only for STATUS (heartbeats stay cheap)
    draining: bool = False
    lanes: dict[int, LaneRecord] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class LaneRecord:
    """One compute process of a worker, on its own connection: the unit of dispatch and credit."""

    wid: bytes  # routing id of the lane's connection (a task's ``worker``)
    host: HostRecord
    index: int
    pid: int
    slots: int
    inflight: set[bytes] = field(default_factory=set)
    stalled: bool = False  # its link was full: no TASK until it next speaks
    last_dispatch: float = 0.0
    version: int = 0  # bumped on every change of credit or load: older heap entries are stale
    broken: dict[str, dict[str, Any]] = field(default_factory=dict)  # service -> why its constructor failed here
    services: tuple[str, ...] = ()  # what it serves: its host's services but the broken ones

    def __post_init__(self) -> None:
        self.services = tuple(s for s in self.host.services if s not in self.broken)

    @property
    def address(self) -> str:
        return f"{self.host.name}/{self.index}"

    @property
    def free(self) -> int:
        return 0 if self.host.draining or self.stalled else self.slots - len(self.inflight)


class ServiceQueue:
    """FIFO per master, round robin between masters, so one big job cannot starve a small one.

    Removal is lazy: a task whose state is no longer QUEUED is skipped when popped; ``size`` counts
    only live tasks.
    """

    def __init__(self) -> None:
        self._lanes: OrderedDict[bytes, deque[Task]] = OrderedDict()
        self.size = 0
        self.dead = 0  # entries still in a lane whose task left by another path

    def __len__(self) -> int:
        return self.size

    def push(self, task: Task, front: bool = False) -> None:
        lane = self._lanes.get(task.master)
        if lane is None:
            lane = self._lanes[task.master] = deque()
        if front:
            lane.appendleft(task)
            self._lanes.move_to_end(task.master, last=False)
        else:
            lane.append(task)
        self.size += 1

    def head_stage(self) -> int:
        """The pipeline stage of the task next in line (0: a fresh task, or a dead entry): the broker
        serves later stages first, so a pipeline under way finishes before new ones start."""
        for lane in self._lanes.values():
            return lane[0].stage if lane and lane[0].state == QUEUED else 0
        return 0

    def discard(self) -> None:
        """Account for a task that left the queue by a path other than ``pop``; compact the lanes
        when dead entries outnumber live ones, so memory follows the live queue."""
        self.size -= 1
        self.dead += 1
        if self.dead > self.size + 1024:
            for master, lane in list(self._lanes.items()):
                live = deque(t for t in lane if t.state == QUEUED)
                if live:
                    self._lanes[master] = live
                else:
                    del self._lanes[master]
            self.dead = 0

    def pop(self) -> Task | None:
        while self._lanes:
            master, lane = next(iter(self._lanes.items()))
            task = lane.popleft() if lane else None
            if lane:
                self._lanes.move_to_end(master)
            else:
                del self._lanes[master]
            if task is not None and task.state == QUEUED:
                self.size -= 1
                return task
            if task is not None:
                self.dead = max(0, self.dead - 1)
        return None

    def drop_master(self, master: bytes) -> list[Task]:
        lane = self._lanes.pop(master, None) or deque()
        live = [t for t in lane if t.state == QUEUED]
        self.size -= len(live)
        self.dead = max(0, self.dead - (len(lane) - len(live)))
        return live


@dataclass(slots=True)
class Failure:
    """An error the loop must send to a task's master."""

    task: Task
    code: str
    details: dict[str, Any]
