"""The one cluster harness (``ndpipe.cluster``): it starts what it says, fails fast with the log of a
process that exited, and leaves nothing behind — even when the process that started it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ndpipe import runtime
from ndpipe.cluster import Cluster, process_gone
from ndpipe.runtime import PARENT_ENV, follow_parent
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)
ECHO = {"echo": "ndpipe.examples.handlers:echo"}


def test_start_waits_for_every_slot_and_close_stops_every_process(tmp_short: Path) -> None:
    with Cluster(ECHO, root=str(tmp_short)).start(workers=2, processes=1) as c:
        pids = c.pids()
        assert len(pids["workers"]) == 2 and len(pids["compute"]) == 2
        with c.master() as m:
            assert m.status()["services"]["echo"]["slots"] == 2  # all registered when start() returned
            assert m.call("echo", (7,)).result(10) == 7
    for pid in [pids["broker"], *pids["workers"], *pids["compute"]]:
        assert process_gone(pid)


def test_start_fails_at_once_with_the_log_of_a_process_that_exited(tmp_short: Path) -> None:
    c = Cluster(ECHO, root=str(tmp_short), broker={"heartbeat_intervall": 1.0}, start_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 2") as err:
        c.start(workers=1)
    assert "heartbeat_intervall" in str(err.value)  # the broker's own config error, from its log
    assert time.monotonic() - t0 < 30  # not the 60 s deadline
    assert c.procs == [] and all(process_gone(w.pid) for w in c.workers)


HARNESS = """
import json, sys, time
from ndpipe.cluster import Cluster
c = Cluster({"echo": "ndpipe.examples.handlers:echo"}, root=sys.argv[1]).start(workers=1, processes=2)
print(json.dumps(c.pids()), flush=True)
time.sleep(120)
"""


def test_a_harness_killed_outright_takes_its_daemons_with_it(tmp_short: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, str(tmp_short)], stdout=subprocess.PIPE)
    everything: list[int] = []
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())
        assert pids["broker"] and pids["workers"] and len(pids["compute"]) == 2
        everything = [pids["broker"], *pids["workers"], *pids["compute"]]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: all(process_gone(pid) for pid in everything), 15, "every daemon and lane gone")
    finally:
        for pid in everything:  # when the check fails: stop the orphans, by pid
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_follow_parent_acts_only_when_asked_and_refuses_an_orphan(monkeypatch: pytest.MonkeyPatch) -> None:
    armed: list[bool] = []
    monkeypatch.setattr(runtime, "die_with_parent", lambda: armed.append(True))  # not on pytest itself
    environ = {"PATH": "/bin"}
    follow_parent(environ)  # not asked: nothing happens
    assert environ == {"PATH": "/bin"} and not armed
    environ = {PARENT_ENV: str(os.getppid())}
    follow_parent(environ)  # our real parent: armed, and the variable is not inherited further
    assert PARENT_ENV not in environ and armed
    with pytest.raises(SystemExit, match="is gone"):
        follow_parent({PARENT_ENV: "1" if os.getppid() != 1 else "2"})
