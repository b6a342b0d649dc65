"""What the worker daemon tells about its lanes: CPU and RSS per process (heartbeats, ``ndpipe
status``, metrics), and the tasks that lanes which have since ended had run (its STATUS line and the
summary it logs at shutdown; a respawned lane's shared slot counts from 0)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from ndpipe.worker.lane import RUNNING, SlotView


@dataclass
class Totals:
    """Tasks the lanes ran, for the shutdown line: answered (failed among them), and the ones the daemon
    reported because their lane died running them."""

    done: int = 0
    failed: int = 0
    timed_out: int = 0
    crashed: int = 0

    def plus(self, views: Iterable[SlotView]) -> Totals:
        """These totals with what the live lanes' slots say so far."""
        out = Totals(self.done, self.failed, self.timed_out, self.crashed)
        for view in views:
            out.done += view.done
            out.failed += view.failed
        return out


class Usage:
    """psutil handles kept per pid: cpu_percent() measures since the previous call on the same handle."""

    def __init__(self) -> None:
        self._ps: dict[int, psutil.Process] = {}

    def process(self, pid: int) -> psutil.Process | None:
        """The kept handle of ``pid`` (heartbeats and metrics share it), or None for one that is gone."""
        try:
            return self._ps.get(pid) or self._ps.setdefault(pid, psutil.Process(pid))
        except psutil.Error:
            return None

    def sample(self, pid: int) -> tuple[float, int]:
        """(CPU %, RSS bytes) of ``pid``; (0, 0) for one that is gone."""
        proc = self.process(pid)
        try:
            return (proc.cpu_percent(None), proc.memory_info().rss) if proc is not None else (0.0, 0)
        except psutil.Error:
            self._ps.pop(pid, None)
            return 0.0, 0

    def stats(self, own_pid: int, nlanes: int, lanes: list[tuple[int, int, SlotView]]) -> dict[str, Any]:
        """The heartbeat's stats map: the host's totals and one entry per lane (index, pid, view)."""
        cpu, rss = self.sample(own_pid)
        entries = []
        for index, pid, view in lanes:
            lane_cpu, lane_rss = self.sample(pid)
            cpu, rss = cpu + lane_cpu, rss + lane_rss
            entries.append({"lane": index, "pid": pid, "cpu": round(lane_cpu, 1), "rss": lane_rss,
                            "running": view.state == RUNNING, "done": view.done})
        for pid in set(self._ps) - {own_pid, *(pid for _, pid, _ in lanes)}:  # replaced lanes
            del self._ps[pid]
        return {"cpu": round(cpu, 1), "rss": int(rss), "running": sum(1 for entry in entries if entry["running"]),
                "processes": nlanes, "lanes": entries}
