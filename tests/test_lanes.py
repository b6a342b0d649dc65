"""Lanes end to end: each compute process on its own broker connection, supervised by its daemon.

Deadlines are the lane's own kernel timer (a handler holding the GIL is stopped on time) with the
daemon's kill as a backstop; a dead lane is reported and replaced at the same address; a dead daemon
takes its lanes with it; the daemon's heartbeats keep a busy lane alive.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from ndpipe.cluster import process_gone
from ndpipe.errors import TaskTimeout
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(90)


def lanes_of(status: dict[str, Any]) -> dict[str, int]:
    """address -> pid of every registered lane."""
    return {lane["address"]: lane["pid"] for w in status["workers"] for lane in w["lanes"]}


def test_a_handler_holding_the_gil_is_stopped_by_its_lanes_own_timer(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2, service="spin_limited")
        with pytest.raises(TaskTimeout, match="timeout of 0.5 s") as err:
            m.submit("spin_limited", 1).result(timeout=30)
        assert err.value.details["exitcode"] == -signal.SIGALRM  # the kernel timer, not the backstop's kill
        cluster.wait_slots(m, 2, service="spin_limited")  # replaced and joined again
        assert m.submit("echo", 7).result(timeout=30) == 7


def test_a_handler_that_silences_the_timer_is_killed_by_the_daemon(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2, service="deaf")
        with pytest.raises(TaskTimeout, match="timeout of 0.5 s") as err:
            m.submit("deaf", 1).result(timeout=30)
        assert err.value.details["exitcode"] == -signal.SIGKILL
        cluster.wait_slots(m, 2, service="deaf")
        assert list(m.map("echo", range(20))) == list(range(20))


def test_a_killed_lane_is_replaced_at_the_same_address(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        before = lanes_of(m.status())
        address, pid = sorted(before.items())[0]
        os.kill(pid, signal.SIGKILL)
        after = wait_until(lambda: (lanes := lanes_of(m.status())).get(address, pid) != pid and len(lanes) == 2
                           and lanes, what="a new process at the killed lane's address")
        assert set(after) == set(before) and after[address] in cluster.lane_pids(cluster.workers[0])
        assert list(m.map("echo", range(50))) == list(range(50))
        assert m.status()["counters"]["failed"] == 0


def test_a_dead_daemon_takes_its_lanes_with_it(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        lanes = list(lanes_of(m.status()).values())
    daemon = cluster.workers[0]
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(10)
    for pid in lanes:  # PR_SET_PDEATHSIG: no orphan keeps computing (or holding a broker connection)
        wait_until(lambda pid=pid: process_gone(pid), 10, f"lane {pid} gone with its daemon")


def test_each_lane_answers_on_its_own_connection(cluster) -> None:  # type: ignore[no-untyped-def]
    """The broker's STATUS shows a task in flight at the lane that runs it: its own connection holds it."""
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        slow = [m.call("slow_pid", (2.0,)) for _ in range(2)]
        busy = wait_until(lambda: [lane for w in m.status()["workers"] for lane in w["lanes"] if lane["inflight"]]
                          if sum(lane["inflight"] for w in m.status()["workers"] for lane in w["lanes"]) == 2
                          else None, what="both lanes busy")
        ran = {f.result(timeout=30) for f in slow}
        assert {lane["pid"] for lane in busy} == ran  # each task ran in the lane the broker sent it to
