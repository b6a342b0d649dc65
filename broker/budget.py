"""Byte budgets: the payload bytes the broker holds, bounded globally, per master and per service.

Why bytes and not only tasks: ``max_queued`` counts tasks, so one master sending 1,500 SUBMITs of
1 MiB over 50 service names took the broker from 39 to 1,019 MiB in 3.4 s (issue 12). A task's
payload stays in the broker's memory from SUBMIT until it is answered (it must be there to requeue),
so what is counted is what is **held**, queued or in flight. A SUBMIT that would pass a bound is
answered QUEUE_FULL naming that bound; a pipeline's later stages are accounted but never refused
(the work is under way, and refusing it would lose it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ndpipe.broker.records import Task


def payload_bytes(payload: list[Any]) -> int:
    return sum(map(len, payload))


@dataclass
class ByteBudget:
    """Held payload bytes, and the three bounds (0 = none)."""

    total_max: int = 0
    master_max: int = 0
    service_max: int = 0
    held: int = 0
    by_master: dict[bytes, int] = field(default_factory=dict)
    by_service: dict[str, int] = field(default_factory=dict)

    def refusal(self, account: bytes, service: str, nbytes: int) -> str | None:
        """Why a new task of ``nbytes`` cannot be taken now (naming the bound; what others hold is not
        told), or None."""
        if self.total_max and self.held + nbytes > self.total_max:
            return (f"{nbytes} more bytes of payload would pass broker.max_queued_bytes = {self.total_max} "
                    "(what the broker holds for all masters)")
        mine = self.by_master.get(account, 0)
        if self.master_max and mine + nbytes > self.master_max:
            return (f"this master has {mine} bytes of payloads at the broker; {nbytes} more would pass "
                    f"broker.max_queued_bytes_per_master = {self.master_max}")
        if self.service_max and self.by_service.get(service, 0) + nbytes > self.service_max:
            return (f"{nbytes} more bytes of payload for service {service!r} would pass "
                    f"broker.max_queued_bytes_per_service = {self.service_max}")
        return None

    def add(self, task: Task, nbytes: int) -> None:
        task.nbytes = nbytes
        self.held += nbytes
        account = task.account or task.master
        self.by_master[account] = self.by_master.get(account, 0) + nbytes
        self.by_service[task.service] = self.by_service.get(task.service, 0) + nbytes

    def remove(self, task: Task) -> None:
        nbytes, task.nbytes = task.nbytes, 0
        if not nbytes:
            return
        self.held -= nbytes
        _less(self.by_master, task.account or task.master, nbytes)
        _less(self.by_service, task.service, nbytes)


def _less(table: dict[Any, int], key: Any, nbytes: int) -> None:
    left = table[key] - nbytes
    if left:
        table[key] = left
    else:
        del table[key]  # no entry per master or service that holds nothing
