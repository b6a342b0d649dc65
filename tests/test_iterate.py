"""Iterations (``Master.iterate``, PROTOCOL.md §5.7): the broker's routing and barrier, the lane's
partitions and the master's decisions without sockets; then end to end — answers bit-identical to
one process, a lane killed mid-run, a master killed mid-run, and every kind of bad step."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from ndpipe import protocol as P
from ndpipe import rounds as R
from ndpipe.broker.iterate import Runs
from ndpipe.broker.state import BrokerState
from ndpipe.codec import Limits, encode
from ndpipe.errors import EncodeError, IterationLost, NdpipeError, ProtocolError, ServiceUnavailable, TaskFailed
from ndpipe.examples import heat, pagerank
from ndpipe.examples.exchange import ring_local, ring_states, ring_step
from ndpipe.master.iterate import make_run
from ndpipe.worker.partitions import Partitions
from tests.conftest import STEADY, wait_until

pytestmark = pytest.mark.timeout(120)
RID = b"r" * 16


# ---- the broker: placement, routing, barrier (socket-free) -----------------------------------------
def broker(lanes: int = 2) -> tuple[BrokerState, Runs]:
    s = BrokerState()
    host = s.worker_ready(b"d", ["step"], 1, 0.0, lanes=lanes, name="w")
    for i in range(lanes):
        s.lane_ready(b"l%d" % i, host.key, i, 0.0, pid=100 + i)
    return s, Runs(s)


def place_all(runs: Runs, parts: int, epoch: int = 1) -> dict[int, bytes]:
    where = {}
    for part in range(parts):
        [(to_worker, wid, frames)] = runs.place(b"m", RID, {"service": "step", "parts": parts, "part": part,
                                                            "epoch": epoch, "round": 0, "state": 1}, [b"s"], 0.0)
        assert to_worker and frames[1] == P.W_PLACE
        where[part] = wid
    return where


def control(frames: list[Any]) -> dict[str, Any]:
    return msgpack.unpackb(frames[3], strict_map_key=False)


def test_partitions_are_spread_over_the_lanes_and_each_round_goes_to_the_lanes_holding_them() -> None:
    _, runs = broker(lanes=2)
    where = place_all(runs, 5)
    assert sorted(where.values()).count(b"l0") == 3 and sorted(where.values()).count(b"l1") == 2
    steps = runs.round(b"m", RID, {"epoch": 1, "round": 0})
    assert {wid: control(f)["parts"] for _, wid, f in steps} == {b"l0": [0, 2, 4], b"l1": [1, 3]}


def stepped(parts: list[int], out: list[list[int]], frames: list[Any], rnd: int = 0, epoch: int = 1) -> dict[str, Any]:
    return {"epoch": epoch, "round": rnd, "parts": [{"part": p, "metric": 0.5 * p, "bytes": 8} for p in parts],
            "out": out}


def test_messages_go_lane_to_lane_at_once_and_the_barrier_reports_every_partition() -> None:
    _, runs = broker(lanes=2)
    place_all(runs, 4)  # l0: 0, 2; l1: 1, 3
    runs.round(b"m", RID, {"epoch": 1, "round": 0})
    sends = runs.stepped(b"l0", RID, stepped([0, 2], [[0, 1, 1], [2, 3, 2]], []), [b"a", b"b1", b"b2"])
    [(to_worker, wid, inbox)] = sends  # one W_INBOX for l1 with both messages; no IT_DONE yet
    assert to_worker and wid == b"l1" and inbox[1] == P.W_INBOX and inbox[4:] == [b"a", b"b1", b"b2"]
    assert control(inbox)["msgs"] == [[0, 1, 1], [2, 3, 2]] and control(inbox)["round"] == 1
    [(to_worker, master, done)] = runs.stepped(b"l1", RID, stepped([1, 3], [], []), [])
    assert not to_worker and master == b"m" and done[1] == P.IT_DONE
    assert control(done)["parts"] == {0: [0.0, 8], 1: [0.5, 8], 2: [1.0, 8], 3: [1.5, 8]}
    nxt = {wid: control(f) for _, wid, f in runs.round(b"m", RID, {"epoch": 1, "round": 1})}
    assert nxt[b"l1"]["expect"] == {1: 1, 3: 1} and nxt[b"l0"]["expect"] == {0: 0, 2: 0}


def test_a_lane_that_lies_about_what_it_holds_is_refused_and_late_epochs_are_dropped() -> None:
    _, runs = broker(lanes=2)
    place_all(runs, 2)
    runs.round(b"m", RID, {"epoch": 1, "round": 0})
    with pytest.raises(ProtocolError, match="does not hold"):
        runs.stepped(b"l0", RID, stepped([1], [], []), [])
    with pytest.raises(ProtocolError, match="names 1 frames, 0 came"):
        runs.stepped(b"l0", RID, stepped([0], [[0, 1, 1]], []), [])
    assert runs.stepped(b"l0", RID, stepped([0], [], [], epoch=7), []) == []  # not this epoch: dropped
    assert runs.stepped(b"zz", RID, stepped([0], [], []), []) == []  # not a lane of the run


def test_a_lost_lane_fails_the_epoch_with_lost_and_the_other_lanes_drop_it() -> None:
    s, runs = broker(lanes=2)
    place_all(runs, 2)
    runs.round(b"m", RID, {"epoch": 1, "round": 0})
    s.lane_gone(b"l1", 0.0)
    sends = runs.check(0.0)
    kinds = [(to_worker, ident, f[1]) for to_worker, ident, f in sends]
    assert kinds == [(True, b"l0", P.W_END), (False, b"m", P.IT_FAIL)]
    assert control(sends[1][2])["code"] == P.LOST and control(sends[1][2])["parts"] == [1]
    assert runs.runs == {} and runs.resident == {}


def test_a_malformed_message_from_a_lane_of_the_run_fails_it_instead_of_stalling_the_round() -> None:
    _, runs = broker(lanes=2)
    place_all(runs, 2)
    runs.round(b"m", RID, {"epoch": 1, "round": 0})
    assert runs.malformed(b"zz", RID, "junk") == []  # not a lane of the run: only logged
    sends = runs.malformed(b"l0", RID, "the control map names 3 frames, 1 came")
    fail = control(sends[-1][2])
    assert sends[-1][2][1] == P.IT_FAIL and fail["code"] == P.BAD_REQUEST
    assert "lane w/0 sent a malformed message for this run: the control map names 3 frames" in fail["message"]


def test_placement_waits_for_a_lane_like_a_task_then_fails_naming_the_services_that_exist() -> None:
    s, runs = broker()
    place = {"service": "later", "parts": 2, "part": 0, "epoch": 1, "round": 0, "state": 1}
    assert runs.place(b"m", RID, place, [b"s"], 0.0) == []  # nobody serves it yet: it waits
    assert runs.place(b"m", RID, {**place, "part": 1}, [b"s"], 0.0) == []
    assert runs.round(b"m", RID, {"epoch": 1, "round": 0}) == []  # and so does the round
    host = s.worker_ready(b"d2", ["later"], 1, 1.0, lanes=1, name="v")
    s.lane_ready(b"v0", host.key, 0, 1.0, pid=7)
    sent = [(wid, f[1]) for _, wid, f in runs.check(1.0)]  # a lane joined: placed, then the held round
    assert sent == [(b"v0", P.W_PLACE), (b"v0", P.W_PLACE), (b"v0", P.W_STEP)]
    _, runs = broker()
    assert runs.place(b"m", RID, {**place, "service": "nosuch"}, [b"s"], 0.0) == []
    assert runs.check(s.unroutable_timeout - 0.1) == []
    [(_, _, fail)] = runs.check(s.unroutable_timeout)
    assert fail[1] == P.IT_FAIL and control(fail)["code"] == P.UNAVAILABLE
    assert "no live worker serves 'nosuch' (services offered: step)" in control(fail)["message"]


def test_bad_placements_are_refused() -> None:
    _, runs = broker()
    place = {"service": "step", "parts": 2, "part": 0, "epoch": 1, "round": 0, "state": 1}
    runs.place(b"m", RID, place, [b"s"], 0.0)
    with pytest.raises(ProtocolError, match="partition 0 of epoch 1 was placed already"):
        runs.place(b"m", RID, place, [b"s"], 0.0)
    with pytest.raises(ProtocolError, match="another master's"):
        runs.place(b"other", RID, place, [b"s"], 0.0)
    with pytest.raises(ProtocolError, match="names 2 frames, 1 came"):
        runs.place(b"m", b"x" * 16, {**place, "inbox": [[1, 1]]}, [b"s"], 0.0)
    with pytest.raises(ProtocolError, match="combine"):
        runs.place(b"m", b"y" * 16, {**place, "combine": "mean"}, [b"s"], 0.0)


def test_an_error_a_lane_reports_outside_a_round_fails_the_run() -> None:
    _, runs = broker(lanes=2)
    place_all(runs, 2)  # placed; no round yet: the lane could not take its partition
    bad = {"epoch": 1, "round": 0, "parts": [{"part": 0, "code": P.BAD_REQUEST, "error": {"message": "bad state"}}]}
    sends = runs.stepped(b"l0", RID, bad, [])
    assert sends[-1][2][1] == P.IT_FAIL and control(sends[-1][2])["code"] == P.BAD_REQUEST


def test_a_master_that_leaves_frees_its_partitions_on_every_lane() -> None:
    _, runs = broker(lanes=2)
    place_all(runs, 3)
    assert sorted((wid, f[1]) for _, wid, f in runs.master_gone(b"m")) == [(b"l0", P.W_END), (b"l1", P.W_END)]
    assert runs.snapshot() == []


# ---- the lane's partitions (socket-free) ---------------------------------------------------------
def lane_with(handler: Any, states: list[dict[str, Any]], parts: int | None = None) -> Partitions:
    lane = Partitions({"step": handler})
    for part, state in enumerate(states):
        frames = encode(state)
        lane.place(RID, {"service": "step", "parts": parts or len(states), "part": part, "epoch": 1, "round": 0,
                         "state": len(frames)}, frames)
    return lane


def one(replies: list[list[Any]]) -> list[Any]:
    """The W_STEPPED of a round that fits one message."""
    [reply] = replies
    return reply


def test_messages_between_partitions_of_one_lane_stay_in_it() -> None:
    lane = lane_with(ring_step, ring_states(3))
    reply = one(lane.step(RID, {"epoch": 1, "round": 0, "parts": [0, 1, 2], "expect": {}}))
    ctl = control(reply)
    assert ctl["out"] == [] and len(reply) == 4 and [p["part"] for p in ctl["parts"]] == [0, 1, 2]
    reply = one(lane.step(RID, {"epoch": 1, "round": 1, "parts": [0, 1, 2], "expect": {}}))
    assert all(p["metric"] > 0 for p in control(reply)["parts"])


def send_all(state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Any:
    return state, {d: np.full(2, float(state["i"] + 1)) if state.get("kind") != "dict" else {"a": 1}
                   for d in range(state["n"]) if d != state["i"]}, 0.0


def test_combine_folds_one_lanes_messages_per_destination_before_they_travel() -> None:
    lane = Partitions({"step": send_all})
    for part in range(3):  # of 4: partition 3 lives elsewhere
        frames = encode({"i": part, "n": 4})
        lane.place(RID, {"service": "step", "parts": 4, "part": part, "epoch": 1, "round": 0, "state": len(frames),
                         "combine": "sum"}, frames)
    reply = one(lane.step(RID, {"epoch": 1, "round": 0, "parts": [0, 1, 2], "expect": {}}))
    ctl = control(reply)
    assert ctl["out"] == [[0, 3, 1]]  # one message for partition 3: 1 + 2 + 3, labelled with source 0
    from ndpipe.codec import decode
    np.testing.assert_array_equal(decode(reply[4:]), [6.0, 6.0])
    assert [(src, decode(f).tolist()) for src, f in lane.held[(RID, 0)].inboxes[1]] == [(1, [5.0, 5.0])]  # 2 + 3
    assert sum(p["bytes"] for p in ctl["parts"]) > 0
    with pytest.raises(ProtocolError, match="combine must be one of"):
        lane.place(RID, {"service": "step", "parts": 4, "part": 3, "epoch": 1, "round": 0, "state": 1,
                         "combine": "mean"}, [b"x"])


class Reuser:
    """A resident step that sends the same buffer every time (and changes it for the next partition)."""

    def __init__(self) -> None:
        self.buf = np.zeros(2)

    def __call__(self, state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Any:
        self.buf[:] = state["i"] + 10
        return state, {2: self.buf}, 0.0


def test_combine_folds_what_each_step_sent_even_if_it_reuses_its_buffer() -> None:
    lane = Partitions({"step": Reuser()})
    for part in range(2):
        frames = encode({"i": part})
        lane.place(RID, {"service": "step", "parts": 3, "part": part, "epoch": 1, "round": 0, "state": len(frames),
                         "combine": "sum"}, frames)
    reply = one(lane.step(RID, {"epoch": 1, "round": 0, "parts": [0, 1], "expect": {}}))
    from ndpipe.codec import decode
    np.testing.assert_array_equal(decode(reply[4:]), [21.0, 21.0])  # 10 + 11, not 11 + 11


def test_combine_on_messages_it_cannot_fold_names_the_partition() -> None:
    lane = Partitions({"step": send_all})
    for part in range(2):
        frames = encode({"i": part, "n": 3, "kind": "dict"})
        lane.place(RID, {"service": "step", "parts": 3, "part": part, "epoch": 1, "round": 0, "state": len(frames),
                         "combine": "max"}, frames)
    [entry] = control(one(lane.step(RID, {"epoch": 1, "round": 0, "parts": [0, 1], "expect": {}})))["parts"]
    assert entry["part"] == 0 and "combine='max' cannot fold the messages for partition 2" in entry["error"]["message"]


@pytest.mark.parametrize(("how", "message"), [
    ("raise", r"partition 1, round 2: the step raised ValueError: bad data in round 2"),
    ("shape", r"partition 1, round 2: a step returns \(state: dict, messages: dict\[int, object\], metric: float\), "
              r"got a tuple of 2"),
    ("dest", r"partition 1, round 2: a message for partition 99, but partitions are 0..1"),
    ("metric", r"partition 1, round 2: the metric must be a number, got str"),
    ("message", r"partition 1, round 2: the message for partition 0 cannot be sent"),
    ("huge", r"partition 1, round 2: the metric 1000000000000000000000000000000000000000 is not a float"),
    ("long", r"partition 1, round 2: the step raised ValueError: xxxx"),
])
def test_a_bad_step_is_an_error_naming_the_partition_and_round(how: str, message: str) -> None:
    from ndpipe.chaos.handlers import bad_step

    lane = lane_with(bad_step, [{"i": i, "at": 2, "how": how} for i in range(2)])
    for rnd in range(2):
        ctl = control(one(lane.step(RID, {"epoch": 1, "round": rnd, "parts": [0, 1], "expect": {}})))
        assert "error" not in str(ctl)
    ctl = control(one(lane.step(RID, {"epoch": 1, "round": 2, "parts": [0, 1], "expect": {}})))
    [entry] = [p for p in ctl["parts"] if "error" in p]
    assert entry["part"] == 1 and entry["code"] == P.HANDLER_ERROR
    import re
    assert re.search(message, entry["error"]["message"]), entry["error"]["message"]
    if how == "raise":
        assert "bad data in round 2" in entry["error"]["traceback"] and "handlers.py" in entry["error"]["traceback"]
    assert len(entry["error"]["message"]) <= 2000 and len(entry["error"]["traceback"]) <= 16_000  # a control map


def fan_out(state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Any:
    """Each partition sends an array (one buffer frame each: 2 frames a message) to every other one."""
    return state, {d: np.arange(8000.0) + state["i"] for d in range(state["n"]) if d != state["i"]}, 0.0


def test_a_round_with_more_messages_than_max_frames_goes_in_pieces_and_the_broker_routes_them_all() -> None:
    lane = Partitions({"step": fan_out}, max_frames=16)
    for part in range(3):  # of 12: each sends 9 messages of 2 frames to partitions elsewhere
        frames = encode({"i": part, "n": 12})
        lane.place(RID, {"service": "step", "parts": 12, "part": part, "epoch": 1, "round": 0,
                         "state": len(frames)}, frames)
    replies = lane.step(RID, {"epoch": 1, "round": 0, "parts": [0, 1, 2], "expect": {}})
    assert len(replies) > 1 and all(len(r) - 4 <= 16 for r in replies)
    assert all(control(r).get("more") for r in replies[:-1]) and "parts" in control(replies[-1])
    s, runs = broker(lanes=4)
    for part in range(12):  # l0 holds 0, 4, 8: the lane above stands in for it with 0, 1, 2
        runs.place(b"m", RID, {"service": "step", "parts": 12, "part": part, "epoch": 1, "round": 0, "state": 1},
                   [b"s"], 0.0)
    runs.round(b"m", RID, {"epoch": 1, "round": 0})
    lane0 = Partitions({"step": fan_out}, max_frames=16)
    for part in (0, 4, 8):
        frames = encode({"i": part, "n": 12})
        lane0.place(RID, {"service": "step", "parts": 12, "part": part, "epoch": 1, "round": 0,
                          "state": len(frames)}, frames)
    routed = 0
    for reply in lane0.step(RID, {"epoch": 1, "round": 0, "parts": [0, 4, 8], "expect": {}}):
        sends = runs.stepped(b"l0", RID, control(reply), reply[4:])
        routed += sum(len(control(f)["msgs"]) for _, _, f in sends if f[1] == P.W_INBOX)
    assert routed == 3 * 9  # every message to the 9 partitions on other lanes, none lost in the cut
    assert runs.runs[RID].waiting == {b"l1", b"l2", b"l3"}  # l0's round complete, once


def test_a_round_with_messages_missing_is_lost_not_run() -> None:
    lane = lane_with(ring_step, ring_states(2), parts=3)
    one(lane.step(RID, {"epoch": 1, "round": 0, "parts": [0, 1], "expect": {}}))
    ctl = control(one(lane.step(RID, {"epoch": 1, "round": 1, "parts": [0, 1], "expect": {0: 1}})))
    assert ctl["parts"][0]["code"] == P.LOST and "0 messages from other lanes, 1 were sent" in \
        ctl["parts"][0]["error"]["message"]


# ---- the master's decisions (socket-free) -------------------------------------------------------
def master_run(parts: int = 2, **kw: Any) -> Any:
    args = {"max_rounds": 5, "tol": 0.0, "reduce": "max", "checkpoint": 2, "round_timeout": None,
            "max_recoveries": 2, **kw}
    return make_run("step", [{"i": i} for i in range(parts)], args.pop("max_rounds"), args.pop("tol"),
                    args.pop("reduce"), args.pop("checkpoint"), args.pop("round_timeout"), args.pop("max_recoveries"),
                    Limits())


def done(run: Any, metrics: list[float], now: float = 0.0) -> list[Any]:
    ctl = {"epoch": run.epoch, "round": run.round, "parts": {p: [m, 10] for p, m in enumerate(metrics)}}
    return run.on_message(P.IT_DONE, ctl, [], now)


def test_the_master_stops_at_tol_or_max_rounds_and_reports_each_round_once() -> None:
    run = master_run(max_rounds=3)
    start = run.start(0.0)
    assert [f[1] for f in start] == [P.IT_PLACE, P.IT_PLACE, P.IT_ROUND]
    assert [control(done(run, [1.0, 3.0])[0])["round"] for _ in range(1)] == [1]
    assert control(done(run, [0.5, 0.2])[0])["checkpoint"] is True  # round 2: every 2nd round
    assert done(run, [0.1, 0.1])[0][1] == P.IT_END  # round 2 was the last of 3
    infos = [run.infos.get_nowait() for _ in range(3)]
    assert [(i.round, i.metric, i.bytes) for i in infos] == [(0, 3.0, 20), (1, 0.5, 20), (2, 0.1, 20)]
    converged = master_run(tol=0.25, reduce="sum")
    converged.start(0.0)
    done(converged, [1.0, 1.0])
    assert done(converged, [0.1, 0.1])[0][1] == P.IT_END and converged.converged


def test_a_lost_epoch_replays_from_the_last_whole_checkpoint_then_gives_up() -> None:
    run = master_run(max_rounds=10, checkpoint=2)
    run.start(0.0)
    done(run, [1.0, 1.0])  # round 0
    done(run, [1.0, 1.0])  # round 1
    assert run.round == 2
    for part in range(2):  # round 2 is a checkpoint round: the lanes send state and inbox before IT_DONE
        run.on_message(P.IT_STATE, {"epoch": 1, "round": 2, "part": part, "kind": "checkpoint", "state": 1,
                                    "inbox": [[1 - part, 1]]}, [b"state%d" % part, b"msg"], 0.0)
    done(run, [1.0, 1.0])  # round 2 done: its checkpoint is whole
    assert run.checkpoint.round == 2 and run.checkpoint.states == [[b"state0"], [b"state1"]]
    replay = run.on_message(P.IT_FAIL, {"epoch": 1, "code": P.LOST, "message": "lane gone"}, [], 1.0)
    assert run.epoch == 2 and [f[1] for f in replay] == [P.IT_PLACE, P.IT_PLACE, P.IT_ROUND]
    assert control(replay[0])["round"] == 2 and replay[0][4:] == [b"state0", b"msg"]
    assert control(replay[-1])["checkpoint"] is False  # it has that one already
    assert run.on_message(P.IT_DONE, {"epoch": 1, "round": 2, "parts": {}}, [], 1.0) == []  # the old epoch's
    done(run, [1.0, 1.0])  # round 2 again: not reported twice
    assert [run.infos.get_nowait().round for _ in range(3)] == [0, 1, 2] and run.infos.empty()
    run.recover(2.0, "again")
    run.recover(3.0, "and again")
    with pytest.raises(IterationLost, match="lost partitions 3 times .* the last time: and again"):
        run.future.result(0)


def test_a_round_past_its_timeout_counts_as_lost() -> None:
    run = master_run(round_timeout=5.0, max_rounds=2)
    run.start(0.0)
    assert control(run.start(0.0)[-1])["timeout_ms"] == 5000  # the lanes stop a hung step at 5 s
    assert run.tick(5.5) == [] and run.deadline == 6.0  # the master waits 1 s more: the lane's kill says LOST
    assert [f[1] for f in run.tick(6.0)][-1] == P.IT_ROUND and run.epoch == 3 and run.recoveries == 1
    done(run, [1.0, 1.0], now=7.0)
    assert done(run, [1.0, 1.0], now=11.0)[0][1] == P.IT_END  # the gather gets its own 5 s from here
    assert run.deadline == 17.0


def test_the_metric_is_reduced_in_partition_order_and_a_nan_never_converges() -> None:
    for metrics in ([math.nan, 1e-9], [1e-9, math.nan]):
        run = master_run(tol=1e-3)
        run.start(0.0)
        assert control(done(run, metrics)[0])["round"] == 1 and not run.converged
        assert math.isnan(run.infos.get_nowait().metric)
    run = master_run(reduce="sum", tol=1e-3)
    run.start(0.0)
    done(run, [1e308, 1e308])  # the sum overflows: not converged, not a crash
    assert run.infos.get_nowait().metric == math.inf and not run.future.done()


def test_a_run_that_cannot_go_on_fails_instead_of_waiting() -> None:
    from concurrent.futures import Future

    from ndpipe.config import MasterConfig
    from ndpipe.master.state import MasterState

    state = MasterState(MasterConfig(), "ipc://x", 0.0)
    run = master_run()
    state.iter_start(run, 0.0)
    bad = R.frames(P.MASTER, P.IT_DONE, run.rid, {"epoch": 1, "round": 0, "parts": {0: [1.0, 0]}})  # a part short
    [end] = state.on_message(bad, 0.0)
    assert end[1] == P.IT_END and run.rid not in state.runs
    with pytest.raises(NdpipeError, match="cannot go on: IT_DONE must report every partition"):
        run.future.result(0)
    assert isinstance(run.future, Future)


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="max_rounds must be a positive int, got 0"):
        master_run(max_rounds=0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        master_run(reduce="mean")
    with pytest.raises(TypeError, match="partition 1: a state must be a dict, got list"):
        make_run("step", [{}, [1]], 5, 0.0, "max", 1, None, 1, Limits())
    with pytest.raises(EncodeError, match="partition 0: its state cannot be sent"):
        make_run("step", [{"s": {1, 2}}], 5, 0.0, "max", 1, None, 1, Limits())
    with pytest.raises(ProtocolError, match="run id is 16 octets"):
        R.parse([P.MASTER, P.IT_DONE, b"short", b"\x80"], P.MASTER)


# ---- end to end -------------------------------------------------------------------------------------
@pytest.fixture
def iterating(make_cluster):  # type: ignore[no-untyped-def]
    c = make_cluster(broker={**STEADY, "unroutable_timeout": 1.0}, services={
        "ring": "ndpipe.examples.exchange:ring_step", "slow_ring": "ndpipe.chaos.handlers:slow_ring_step",
        "bad": "ndpipe.chaos.handlers:bad_step", "pagerank": "ndpipe.examples.pagerank:step",
        "heat": "ndpipe.examples.heat:step",
        "weighted_ring": {"handler": "ndpipe.chaos.handlers:WeightedRing", "init": {"weight": 0.25}}})
    c.start_broker()
    c.workers = [c.start_worker(processes=2), c.start_worker(processes=2)]
    with c.master() as m:
        c.wait_slots(m, 4, service="ring")
    return c


def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return all(x["x"].dtype == y["x"].dtype and x["x"].tobytes() == y["x"].tobytes() for x, y in zip(a, b, strict=True))


def test_ring_pagerank_and_heat_match_one_process(iterating) -> None:  # type: ignore[no-untyped-def]
    with iterating.master() as m:
        run = m.iterate("ring", ring_states(7), max_rounds=500, tol=1e-13, checkpoint=25)
        infos = list(run)
        assert same(run.result(30), ring_local(ring_states(7), 500, 1e-13)) and run.converged
        assert [i.round for i in infos] == list(range(len(infos))) and infos[-1].metric <= 1e-13
        assert all(i.bytes > 0 for i in infos)
        nodes, src_dst = 20_000, pagerank.graph(20_000, 200_000, seed=3)
        before = m.status()["counters"]["iter_routed_bytes"]
        run = m.iterate("pagerank", pagerank.partition(*src_dst, nodes, 6), max_rounds=200, tol=1e-13)
        rounds = len(list(run))
        got, want = pagerank.ranks(run.result(60)), pagerank.reference(*src_dst, nodes, rounds - 1)
        plain = m.status()["counters"]["iter_routed_bytes"] - before
        assert np.max(np.abs(got - want)) <= 1e-10 and abs(got.sum() - 1.0) < 1e-9
        local, local_rounds = pagerank.local(pagerank.partition(*src_dst, nodes, 6), 200, 1e-13)
        assert local_rounds == rounds and got.tobytes() == pagerank.ranks(local).tobytes()  # the same bits
        before += plain
        run = m.iterate("pagerank", pagerank.partition(*src_dst, nodes, 6), max_rounds=rounds, tol=-1.0, combine="sum")
        combined = pagerank.ranks(run.result(60))  # each lane sums its partitions' contributions per destination
        folded = m.status()["counters"]["iter_routed_bytes"] - before
        assert np.max(np.abs(combined - got)) <= 1e-15 and folded < plain / 1.4, (folded, plain)
        grid = heat.plate(60, 40, seed=2)
        run = m.iterate("heat", heat.strips(grid, 5), max_rounds=41)
        assert len(list(run)) == 41  # round 0 sends the first halos; rounds 1..40 sweep
        assert np.array_equal(np.vstack([s["u"] for s in run.result(30)]), heat.reference(grid, 40))
        assert m.status()["iterations"] == []  # ended runs are forgotten everywhere


def test_a_resident_class_can_be_the_step(iterating) -> None:  # type: ignore[no-untyped-def]
    """The contract: `step` is a normal service, a function or a resident class built with its YAML init."""
    from ndpipe.chaos.handlers import WeightedRing
    from ndpipe.examples.rounds import run_local

    with iterating.master() as m:
        run = m.iterate("weighted_ring", ring_states(5), max_rounds=40, tol=0.0)
        assert len(list(run)) == 40
        assert same(run.result(30), run_local(WeightedRing(0.25), ring_states(5), 40, 0.0)[0])
        assert not same(run.result(30), ring_local(ring_states(5), 40, 0.0))  # the init's weight took effect


def test_a_lane_killed_mid_run_rolls_back_and_ends_bit_identical(iterating) -> None:  # type: ignore[no-untyped-def]
    states = [{**s, "delay": 0.02} for s in ring_states(6)]
    with iterating.master() as m:
        run = m.iterate("slow_ring", states, max_rounds=60, tol=0.0, checkpoint=5)
        for info in run:
            if info.round == 12:
                lanes = m.status()["iterations"][0]["lanes"]
                assert sum(len(parts) for parts in lanes.values()) == 6 and len(lanes) == 4  # spread over 4 lanes
                os.kill(iterating.lane_pids(iterating.workers[1])[0], signal.SIGKILL)
        final = run.result(60)
        assert run.recoveries >= 1
    assert same(final, ring_local([{**s, "delay": 0.02} for s in ring_states(6)], 60, 0.0))


def test_a_whole_worker_killed_mid_run_rolls_back_onto_the_other(iterating) -> None:  # type: ignore[no-untyped-def]
    states = [{**s, "delay": 0.01} for s in ring_states(6)]
    with iterating.master() as m:
        run = m.iterate("slow_ring", states, max_rounds=40, tol=-1.0, checkpoint=5)
        for info in run:
            if info.round == 9:
                os.kill(iterating.workers[0].pid, signal.SIGKILL)  # the daemon; its lanes die with it
        final = run.result(60)
        assert run.recoveries >= 1
    assert same(final, ring_local([{**s, "delay": 0.01} for s in ring_states(6)], 40, -1.0))


def test_the_only_lane_killed_mid_run_the_run_waits_for_its_replacement(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY, services={"slow_ring": "ndpipe.chaos.handlers:slow_ring_step"})
    c.start_broker()
    worker = c.start_worker(processes=1)
    states = [{**s, "delay": 0.01} for s in ring_states(3)]
    with c.master() as m:
        c.wait_slots(m, 1, service="slow_ring")
        run = m.iterate("slow_ring", states, max_rounds=30, tol=-1.0, checkpoint=5)
        for info in run:
            if info.round == 7:
                os.kill(c.lane_pids(worker)[0], signal.SIGKILL)  # no other lane: the rollback waits for the new one
        final = run.result(60)
        assert run.recoveries == 1
    assert same(final, ring_local([{**s, "delay": 0.01} for s in ring_states(3)], 30, -1.0))


@pytest.mark.parametrize("how", ["raise", "shape", "dest", "metric", "message", "state"])
def test_a_bad_step_fails_the_run_with_a_clear_error_and_the_cluster_serves_on(iterating, how: str) -> None:  # type: ignore[no-untyped-def]
    with iterating.master() as m:
        run = m.iterate("bad", [{"i": i, "at": 1, "how": how} for i in range(3)], max_rounds=2, checkpoint=1)
        with pytest.raises(TaskFailed, match="partition 1" if how == "state" else "partition 1, round 1") as err:
            run.result(30)
        if how == "raise":
            assert "ValueError: bad data in round 1" in err.value.remote_traceback
        with pytest.raises(TaskFailed):
            list(run)
        assert same(m.iterate("ring", ring_states(3), max_rounds=5).result(30), ring_local(ring_states(3), 5, 0.0))


def test_a_step_that_hangs_is_stopped_at_round_timeout_and_the_run_fails_after_max_recoveries(iterating) -> None:  # type: ignore[no-untyped-def]
    with iterating.master() as m:
        run = m.iterate("bad", [{"i": i, "at": 1, "how": "hang"} for i in range(3)], max_rounds=3,
                        round_timeout=1.0, max_recoveries=1)
        with pytest.raises(IterationLost, match="lost partitions 2 times"):
            run.result(30)
        assert run.recoveries == 2
        assert same(m.iterate("ring", ring_states(4), max_rounds=5).result(30), ring_local(ring_states(4), 5, 0.0))


def test_leaving_the_loop_early_or_closing_stops_the_run_and_frees_its_partitions(iterating) -> None:  # type: ignore[no-untyped-def]
    states = [{**s, "delay": 0.01} for s in ring_states(4)]
    with iterating.master() as m:
        for info in m.iterate("slow_ring", states, max_rounds=10**6):
            if info.round == 3:
                break  # the Iteration is dropped here
        wait_until(lambda: m.status()["iterations"] == [], 15, "the abandoned run freed")
        with m.iterate("slow_ring", states, max_rounds=10**6) as run:
            next(run)
        wait_until(lambda: m.status()["iterations"] == [], 15, "the closed run freed")
        with pytest.raises(CancelledError):
            run.result(1)


def test_an_unknown_service_fails_the_run_naming_it(iterating) -> None:  # type: ignore[no-untyped-def]
    with iterating.master() as m, pytest.raises(ServiceUnavailable, match="no live worker serves 'nosuch'"):
        m.iterate("nosuch", [{}], max_rounds=3).result(30)


MASTER_SCRIPT = """
import sys, time
from ndpipe.config import MasterConfig
from ndpipe.master import Master
from ndpipe.examples.exchange import ring_states
m = Master(sys.argv[1], config=MasterConfig(heartbeat_interval=0.5, liveness=6))
run = m.iterate("slow_ring", [{**s, "delay": 0.05} for s in ring_states(4)], max_rounds=100000)
for info in run:
    print(info.round, flush=True)
"""


def test_a_master_killed_mid_run_frees_its_partitions(iterating, tmp_short: Path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_short / "iter_master.py"
    script.write_text(MASTER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), iterating.frontend], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "0"
        shown = subprocess.run([sys.executable, "-m", "ndpipe.cli", "status", "--config", str(iterating.config_path)],
                               capture_output=True, text=True, timeout=60)
        lines = shown.stdout.splitlines()
        row = lines[next(i for i, line in enumerate(lines) if line.startswith("iteration")) + 1]  # run, round, where
        assert "slow_ring" in row
        assert shown.returncode == 0 and row.count("/") == 4, shown.stdout  # 4 partitions, one per lane
        with iterating.master() as m:
            assert len(m.status()["iterations"]) == 1
            proc.kill()
            wait_until(lambda: m.status()["iterations"] == [], 15, "the broker to free the dead master's run")
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
