"""Stage pipelines routed by the broker (issue 10, item 3): each stage's result frames become the next
stage's input at the broker, never a round trip to the master; each stage retried on its own; the
final result delivered once; errors name the stage."""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from ndpipe import protocol as P
from ndpipe.broker.records import task_key
from ndpipe.broker.state import QUEUED, BrokerState
from ndpipe.config import MasterConfig
from ndpipe.errors import ServiceUnavailable, TaskFailed, TaskTimeout
from ndpipe.master.state import MasterState, Pending
from tests.conftest import STEADY, wait_until

T = task_key(b"m", b"t")  # the broker's id for master m's task t: what lanes see and answer to

pytestmark = pytest.mark.timeout(120)
OPTS = P.OPTIONS.pack(0, 0, P.FLAG_PIPELINE)


# ---- the protocol and the broker's state -----------------------------------------------------------
def submit_frames(stages: Any, flags: int = P.FLAG_PIPELINE) -> list[Any]:
    frame = stages if isinstance(stages, bytes) else msgpack.packb(stages)
    return [P.MASTER, P.SUBMIT, frame, b"t1", P.OPTIONS.pack(0, 0, flags), b"\x92\x91\x01\x80"]


def test_a_pipeline_submit_names_its_stages_and_bad_ones_get_bad_request() -> None:
    sub = P.parse_submit(submit_frames(["a", "b", "c"]), 16)
    assert sub.service == "a" and sub.stages == ("a", "b", "c")
    for bad in (["a"], ["a"] * 17, ["a", ""], ["a", 3], b"\xc1", msgpack.packb({"a": "b"})):
        with pytest.raises(P.BadSubmit):
            P.parse_submit(submit_frames(bad), 16)
    with pytest.raises(P.BadSubmit, match="at most one of a batch, a pipeline and a stream"):
        P.parse_submit(submit_frames(["a", "b"], P.FLAG_PIPELINE | P.FLAG_BATCH), 16)
    with pytest.raises(P.BadSubmit, match="unknown task flags"):
        P.parse_submit(submit_frames(["a", "b"], P.FLAG_CHAINED), 16)  # the broker's flag, not a master's


def lane(s: BrokerState, wid: bytes, services: list[str]) -> None:
    host = s.worker_ready(wid, services, 1, 0.0, name=wid.decode())
    assert s.lane_ready(wid, host.key, 0, 0.0, pid=1) is not None


def test_each_stage_result_is_the_next_stage_input_and_only_the_last_is_delivered() -> None:
    s = BrokerState()
    lane(s, b"wa", ["a"])
    lane(s, b"wb", ["b"])
    s.submit(b"m", b"t", "a", [b"x0"], 0.0, stages=("a", "b"), flags=P.FLAG_PIPELINE)
    [(task, rec)] = list(s.dispatch(0.0))
    assert rec.wid == b"wa" and task.payload == [b"x0"] and task.flags == P.FLAG_PIPELINE
    assert s.complete(b"wa", T, [b"r1", b"buf"]) is None  # not for the master: the next stage's input
    assert task.state == QUEUED and task.service == "b" and task.payload == [b"r1", b"buf"]
    assert task.flags == P.FLAG_CHAINED and task.attempt == 0
    [(again, rec)] = list(s.dispatch(0.0))
    assert again is task and rec.wid == b"wb" and task.attempt == 1
    assert s.complete(b"wb", T, [b"r2"]) is task and T not in s.tasks
    assert s.counters["staged"] == 1 and s.counters["completed"] == 1


@pytest.mark.parametrize("names", [("a", "b", "c"), ("c", "b", "a"), ("x", "a", "m")])
def test_a_free_lane_serves_a_pipelines_later_stage_before_new_pipelines(names: tuple[str, ...]) -> None:
    """Whatever the services are called (the broker once took them in set order, which follows the
    hash seed): a stage hand-off waits for one lane slot, not for the queue of new pipelines."""
    s = BrokerState()
    lane(s, b"w", list(names))  # one slot serving every stage
    for i in range(50):
        s.submit(b"m", b"t%d" % i, names[0], [b"x"], 0.0, stages=names, flags=P.FLAG_PIPELINE)
    order = []
    for _ in range(3 * 50):
        [(task, rec)] = list(s.dispatch(0.0))
        order.append((task.master_tid, task.stage))
        s.complete(rec.wid, task.tid, [b"r"])
    assert order[:6] == [(b"t0", 0), (b"t0", 1), (b"t0", 2), (b"t1", 0), (b"t1", 1), (b"t1", 2)]
    assert s.counters["completed"] == 50 and not s.tasks


def test_services_sharing_lanes_take_turns() -> None:
    """Two deep queues on one lane: each free slot goes to the service served longest ago."""
    s = BrokerState()
    lane(s, b"w", ["a", "b"])
    for i in range(20):
        s.submit(b"m", b"a%d" % i, "a", [b"x"], 0.0)
        s.submit(b"m", b"b%d" % i, "b", [b"x"], 0.0)
    served = []
    for _ in range(40):
        [(task, rec)] = list(s.dispatch(0.0))
        served.append(task.service)
        s.complete(rec.wid, task.tid, [b"r"])
    assert served.count("a") == served.count("b") == 20
    assert all(x != y for x, y in itertools.pairwise(served)), served


def test_a_stage_lost_with_its_lane_reruns_alone_from_its_own_input() -> None:
    s = BrokerState(max_attempts=2)
    lane(s, b"wa", ["a"])
    lane(s, b"wb", ["b"])
    s.submit(b"m", b"t", "a", [b"x0"], 0.0, stages=("a", "b"), flags=P.FLAG_PIPELINE)
    list(s.dispatch(0.0))
    s.complete(b"wa", T, [b"r1"])
    list(s.dispatch(0.0))
    s.fail(b"wb", T, P.CRASHED, 0.0)  # stage b's lane died
    task = s.tasks[T]
    assert task.service == "b" and task.payload == [b"r1"] and task.state == QUEUED  # not back to stage a
    [(again, rec)] = list(s.dispatch(0.0))
    assert rec.wid == b"wb" and again.attempt == 2
    s.fail(b"wb", T, P.CRASHED, 0.0)
    [failure] = s.take_failures()
    assert failure.code == P.MAX_ATTEMPTS and failure.task.stage == 1


def test_the_master_names_the_stage_an_error_comes_from() -> None:
    from concurrent.futures import Future

    state = MasterState(MasterConfig(), "ipc://x", 0.0)
    future: Future[Any] = Future()
    state.submit(Pending(b"t", b"", OPTS, [b""], future, None, stages=("embed", "block0")), 0.0)
    body = msgpack.packb({"message": "boom", "type": "builtins.ValueError", "traceback": "tb"})
    state.on_message([P.MASTER, P.ERROR, b"t", b"HANDLER_ERROR", body, (1).to_bytes(2, "big")], 0.0)
    err = future.exception()
    assert isinstance(err, TaskFailed) and "pipeline stage 1 ('block0'): boom" in str(err)
    assert err.details["stage"] == 1 and err.details["service"] == "block0"


# ---- end to end ----------------------------------------------------------------------------------
def tally(log_dir: str, name: str, add: float = 1.0, seconds: float = 0.0) -> dict[str, Any]:
    return {"handler": "ndpipe.chaos.handlers:Tally",
            "init": {"log_dir": log_dir, "name": name, "add": add, "seconds": seconds}}


def calls(log_dir: str, name: str) -> list[int]:
    path = Path(log_dir) / f"{name}.calls"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.fixture
def stages(make_cluster, tmp_short: Path):  # type: ignore[no-untyped-def]
    log_dir = str(tmp_short / "starts")
    c = make_cluster(broker={**STEADY, "unroutable_timeout": 1.0}, services={
        "s0": tally(log_dir, "s0", 1.0), "s1": tally(log_dir, "s1", 10.0), "s2": tally(log_dir, "s2", 100.0),
        "slow": tally(log_dir, "slow", 1000.0, seconds=1.5)})
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2, service="s0")
    return c


def test_a_pipeline_runs_each_stage_once_with_no_round_trip_to_the_master(stages) -> None:  # type: ignore[no-untyped-def]
    with stages.master() as m:
        assert m.pipeline(["s0", "s1", "s2"], 0.5).result(30) == 111.5
        x = np.arange(4.0)
        np.testing.assert_array_equal(m.pipeline(["s0", "s1", "s2", "s0"], x).result(30), x + 112)
        assert [len(calls(stages.log_dir, s)) for s in ("s0", "s1", "s2")] == [3, 2, 2]
        counters = m.status()["counters"]
        assert counters["staged"] == 5 and counters["completed"] == 2  # the master got 2 results, not 7
        assert m.counters["late_answers"] == 0


def test_pipeline_map_streams_items_through_in_input_order(stages) -> None:  # type: ignore[no-untyped-def]
    with stages.master() as m:
        assert list(m.pipeline_map(["s0", "s1"], range(60))) == [i + 11.0 for i in range(60)]


def test_a_stage_that_raises_fails_the_pipeline_naming_the_stage(stages) -> None:  # type: ignore[no-untyped-def]
    with stages.master() as m:
        with pytest.raises(TaskFailed, match=r"pipeline stage 1 \('fail'\)") as err:
            m.pipeline(["s0", "fail"], 1).result(30)  # fail(2) raises Exception(2)
        assert "examples/handlers.py" in err.value.remote_traceback
        # the master's own timer and the broker's deadline race: either names the stage or the pipeline
        with pytest.raises(TaskTimeout, match=r"pipeline (stage 1 \('nosuch'\)|\['s0', 'nosuch'\])"):
            m.pipeline(["s0", "nosuch"], 1, timeout=0.5).result(30)
        with pytest.raises(ServiceUnavailable, match=r"pipeline stage 1 \('nosuch'\): no live worker serves 'nosuch'"):
            m.pipeline(["s0", "nosuch"], 1).result(30)  # after broker.unroutable_timeout (1 s here)
        with pytest.raises(ValueError, match="2..16 stages"):
            m.pipeline(["s0"], 1)


def test_a_lane_killed_in_a_stage_reruns_that_stage_only(stages) -> None:  # type: ignore[no-untyped-def]
    with stages.master() as m:
        future = m.pipeline(["s0", "slow", "s1"], 0.0)
        victim = wait_until(lambda: calls(stages.log_dir, "slow"), 30, "the slow stage to start")[0]
        os.kill(victim, signal.SIGKILL)
        assert future.result(60) == 1011.0
        assert len(calls(stages.log_dir, "s0")) == 1  # the first stage ran once
        assert len(calls(stages.log_dir, "slow")) == 2 and calls(stages.log_dir, "slow")[1] != victim
        assert len(calls(stages.log_dir, "s1")) == 1


def test_a_stale_crash_report_for_an_earlier_stage_does_not_hit_the_next() -> None:
    s = BrokerState(max_attempts=1)
    host = s.worker_ready(b"d", ["a", "b"], 1, 0.0, lanes=2, name="w")
    s.lane_ready(b"l0", host.key, 0, 0.0, pid=10)
    s.lane_ready(b"l1", host.key, 1, 0.0, pid=11)
    s.submit(b"m", b"t", "a", [b"x"], 0.0, stages=("a", "b"), flags=P.FLAG_PIPELINE)
    [(_, first)] = list(s.dispatch(0.0))
    s.complete(first.wid, T, [b"r"])
    [(task, second)] = list(s.dispatch(0.0))
    assert second.wid != first.wid  # stage b at the sibling lane (a tie goes to the lane that waited longest)
    # the daemon reports its first lane's link loss for the last task it answered: stage a's, same id
    assert s.fail(b"d", T, P.CRASHED, 0.0, "LinkLost", pid=first.pid) is None
    assert s.tasks[T].state == "inflight" and s.take_failures() == []
    s.fail(b"d", T, P.CRASHED, 0.0, "died", pid=second.pid)  # a report about the holder counts
    assert [f.code for f in s.take_failures()] == [P.MAX_ATTEMPTS]


def test_a_pipeline_whose_master_left_ends_at_its_current_stage() -> None:
    s = BrokerState()
    lane(s, b"wa", ["a"])
    lane(s, b"wb", ["b"])
    s.submit(b"m", b"t", "a", [b"x0"], 0.0, stages=("a", "b"), flags=P.FLAG_PIPELINE)
    list(s.dispatch(0.0))
    s.master_gone(b"m")
    assert s.complete(b"wa", T, [b"r1"]) is None and T not in s.tasks and list(s.dispatch(0.0)) == []
