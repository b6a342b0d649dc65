"""Resident services (issue 10, item 1): a class handler is built once per lane, with ``init`` from the
YAML, before that lane takes a task; a constructor that fails leaves the worker up, and a call the
service cannot get anywhere fails at once with the constructor's error, never a silent wait."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ndpipe.errors import ServiceUnavailable
from ndpipe.examples.handlers import mlp_forward
from tests.conftest import STEADY, wait_until

pytestmark = pytest.mark.timeout(120)


def builds(log_dir: str) -> dict[int, int]:
    """pid -> constructions recorded by chaos.handlers.Resident."""
    out = {}
    for name in os.listdir(log_dir):
        if name.endswith(".built"):
            with open(os.path.join(log_dir, name)) as f:
                out[int(name.split(".")[0])] = len(f.read().split())
    return out


def test_each_lane_builds_its_instance_once_and_keeps_it(make_cluster, tmp_short: Path) -> None:  # type: ignore[no-untyped-def]
    log_dir = str(tmp_short / "starts")  # the cluster's log_dir
    c = make_cluster(broker=STEADY, services={
        "res": {"handler": "ndpipe.chaos.handlers:Resident", "init": {"log_dir": log_dir, "scale": 2.0}},
        "mlp": {"handler": "ndpipe.examples.handlers:MLP", "init": {"d_in": 8, "seed": 3}}})
    assert c.log_dir == log_dir
    c.start_broker()
    worker = c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2, service="res")
        assert set(builds(c.log_dir)) == set(c.lane_pids(worker))  # built before the first task reached them
        answers = [m.call("res", (float(i),)).result(30) for i in range(40)]
        assert [a[0] for a in answers] == [2.0 * i for i in range(40)]
        per_pid: dict[int, list[int]] = {}
        for _, pid, calls in answers:
            per_pid.setdefault(pid, []).append(calls)
        assert all(calls == sorted(calls) and len(set(calls)) == len(calls) for calls in per_pid.values())
        assert builds(c.log_dir) == {pid: 1 for pid in c.lane_pids(worker)}  # once per lane, never per task
        x = np.random.default_rng(0).standard_normal((64, 8))
        y = m.scatter("mlp", x, 4)
        np.testing.assert_allclose(y, mlp_forward(x, seed=3), rtol=1e-12)


def test_a_failing_constructor_leaves_the_worker_up_and_callers_get_its_error(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY, services={"bad": {"handler": "ndpipe.chaos.handlers:BrokenInit",
                                                       "init": {"message": "weights file is corrupt"}}})
    c.start_broker()
    with c.master() as m:
        waiting = m.call("bad")  # queued before any worker: fails when the lanes report
        worker = c.start_worker(processes=2)
        with pytest.raises(ServiceUnavailable) as err:
            waiting.result(30)
        assert "'bad'" in str(err.value) and "ValueError: weights file is corrupt" in str(err.value)
        assert "chaos/handlers.py" in err.value.remote_traceback and "__init__" in err.value.remote_traceback
        c.wait_slots(m, 2)  # the lanes joined for the services they could build
        lanes = c.lane_pids(worker)
        with pytest.raises(ServiceUnavailable, match="constructor failed in lane"):
            m.call("bad").result(10)  # from the broker, within liveness × interval
        assert m.call("echo", (5,)).result(10) == 5  # the rest of the worker serves on
        status = m.status()
        assert status["services"]["bad"]["broken"] == 2 and status["services"]["bad"]["lanes"] == 0
        assert all(lane["broken"] == ["bad"] for lane in status["workers"][0]["lanes"])
        assert sorted(c.lane_pids(worker)) == sorted(lanes)  # no crash loop: the same lanes
    log = c.logs(100_000)
    assert log.count("service 'bad' is unavailable") == 1  # logged once, with its traceback, not per lane
    assert "weights file is corrupt" in log and "Traceback" in log


def test_a_constructor_over_the_memory_limit_is_a_clear_error(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY, worker={"memory_limit": 512 << 20},
                     services={"hog": {"handler": "ndpipe.chaos.handlers:Hog", "init": {"mib": 2048}}})
    c.start_broker()
    c.start_worker(processes=1)
    with c.master() as m:
        c.wait_slots(m, 1)
        with pytest.raises(ServiceUnavailable, match="exceeded worker.memory_limit = 536870912 bytes"):
            m.call("hog").result(10)
        assert m.call("echo", (1,)).result(10) == 1


def test_a_worker_where_the_constructor_works_serves_while_another_cannot(  # type: ignore[no-untyped-def]
        make_cluster, tmp_short: Path) -> None:
    good = {"handler": "ndpipe.chaos.handlers:Resident", "init": {"log_dir": str(tmp_short / "starts")}}
    c = make_cluster(broker=STEADY, services={"res": good})
    c.start_broker()
    c.start_worker(processes=1)
    bad = {**c.config["worker"]["services"], "res": {**good, "init": {"log_dir": "/nonexistent/dir"}}}
    c.start_worker(processes=1, overrides={"services": bad})
    with c.master() as m:
        c.wait_slots(m, 1, service="res")  # the good worker's lane
        wait_until(lambda: m.status()["services"].get("res", {}).get("broken") == 1, 30, "the bad worker's report")
        assert [m.call("res", (1.0,)).result(10)[0] for _ in range(20)] == [1.0] * 20  # none failed


def cli(tmp_path: Path, services: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"worker:\n  processes: 1\n  services:\n{services}")
    return subprocess.run([sys.executable, "-m", "ndpipe.cli", "worker", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("services, expected", [
    ('    x: {handler: "ndpipe.examples.handlers:echo", init: {a: 1}}\n', "init is for a class handler"),
    ('    x: {handler: "ndpipe.chaos.handlers:NotCallable"}\n', "has no __call__ method"),
    ('    x: {handler: "ndpipe.examples.handlers:MLP", init: [1, 2]}\n', "worker.services.x.init"),
    ('    x: {handler: "ndpipe.examples.handlers:MLP", init: {1: 2}}\n', "worker.services.x.init"),
])
def test_a_resident_service_the_daemon_can_tell_is_wrong_stops_it_at_start(
        tmp_path: Path, services: str, expected: str) -> None:
    done = cli(tmp_path, services)
    assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr
