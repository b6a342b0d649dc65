"""STATUS_REPLY bodies: the whole picture (curve off, or an admin key) and a master's own view.

Why a master key sees only its own tasks (PROTOCOL.md §13): the full picture names every worker,
lane and routing id, and knowing a connected peer's routing id is what taking over its connection
needs.
"""

from __future__ import annotations

from typing import Any

from ndpipe.broker.iterate import Runs
from ndpipe.broker.state import INFLIGHT, BrokerState
from ndpipe.errors import ProtocolError
from ndpipe.transport import unpack_map

_ROW = ("queued", "inflight", "workers", "lanes", "slots", "broken")


def full(state: BrokerState, runs: Runs, now: float) -> dict[str, Any]:
    """The state's snapshot, iterations included, with each worker's stats frame decoded (an
    undecodable one shows as {})."""
    snap = state.snapshot(now)
    snap["iterations"] = runs.snapshot()
    snap["counters"] = {**snap["counters"], **{f"iter_{k}": v for k, v in runs.counters.items()}}
    for w in snap["workers"]:
        try:
            w["stats"] = unpack_map(w["stats"]) if w["stats"] else {}
        except ProtocolError:
            w["stats"] = {}
    return snap


def own(state: BrokerState, master: bytes) -> dict[str, Any]:
    """A master's own tasks by service; nothing about workers, other masters or routing ids. Scans the
    tasks held (16 ms at 500,000)."""
    services: dict[str, dict[str, int]] = {}
    mine = [t for t in state.tasks.values() if t.master == master]
    for task in mine:
        row = services.setdefault(task.service, dict.fromkeys(_ROW, 0))
        row["inflight" if task.state == INFLIGHT else "queued"] += 1
    return {"broker_id": state.broker_id.hex(), "heartbeat_interval": state.heartbeat_interval,
            "liveness": state.liveness, "masters": 1, "tasks": len(mine), "services": services,
            "workers": [], "iterations": [], "counters": {}, "restricted": True}


def line(state: BrokerState, rate: float) -> str:
    """One line for systemd's STATUS= (``systemctl status ndpipe-broker``); O(services + lanes)."""
    queued = sum(len(q) for q in state.queues.values())
    inflight = sum(len(lane.inflight) for lane in state.lanes.values())
    return (f"masters {len(state.masters)}, workers {len(state.hosts)} ({len(state.lanes)} lanes), "
            f"queued {queued}, in flight {inflight}, {rate:.0f} tasks/s")
