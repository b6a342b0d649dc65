"""Iterations at the broker (``Master.iterate``, PROTOCOL.md §5.7), without a socket: :class:`Runs`.

The broker places each partition on a lane and remembers where; routes the messages partitions
send each other, lane to lane, as they come (the frames untouched); keeps the barrier of each round
(every partition has reported) and tells the master, who decides what comes next: another round,
the end, or a rollback. The broker holds no state and no checkpoint of a run — a lane's partitions
live in that lane, checkpoints at the master — so a broker restart or a lost lane costs a rollback
to the master's last checkpoint, never a wrong answer.

Every message carries the run's **epoch**: the master starts a new one at each (re)placement, and
whatever belongs to an older epoch (a late W_STEPPED, messages on their way) is dropped.

Methods return the messages to send as ``(to_worker, routing id, frames)``; the server sends them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ndpipe import protocol as P
from ndpipe import rounds as R
from ndpipe.broker.records import LaneRecord
from ndpipe.broker.state import BrokerState
from ndpipe.errors import ProtocolError
from ndpipe.security import tag

log = logging.getLogger("ndpipe.broker")
Send = tuple[bool, bytes, R.Frames]  # (to a worker?, routing id, frames)


@dataclass(slots=True, eq=False)
class Run:
    """One iteration of one master, in its current epoch."""

    master: bytes
    rid: bytes
    service: str
    parts: int
    epoch: int
    placed: dict[int, LaneRecord] = field(default_factory=dict)  # partition -> the lane holding it
    round: int = -1  # the round under way (-1: placing)
    waiting: set[bytes] = field(default_factory=set)  # lanes (routing ids) yet to report this round
    done: dict[int, list[Any]] = field(default_factory=dict)  # partition -> [metric, bytes] this round
    expect: dict[int, int] = field(default_factory=dict)  # partition -> messages it gets next round from other lanes
    gathering: set[int] = field(default_factory=set)  # partitions whose final state is still to come
    unplaced: list[tuple[int, dict[str, Any], list[Any]]] = field(default_factory=list)  # waiting for a lane
    unplaced_since: float | None = None  # since when a partition has waited (UNAVAILABLE after unroutable_timeout)
    held_round: dict[str, Any] | None = None  # an IT_ROUND that came while partitions waited for a lane

    def lanes(self) -> dict[bytes, list[int]]:
        """Routing id -> the partitions that lane holds, in partition order."""
        out: dict[bytes, list[int]] = {}
        for part in sorted(self.placed):
            out.setdefault(self.placed[part].wid, []).append(part)
        return out


class Runs:
    """Every iteration the broker routes, by run id (each id belongs to the master that placed it)."""

    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.runs: dict[bytes, Run] = {}  # by run id: lanes know a run by its id alone, so one master owns each
        self.resident: dict[bytes, int] = {}  # lane routing id -> partitions it holds (all runs): placement load
        self.counters = {"rounds": 0, "routed_bytes": 0, "placed": 0, "lost": 0}

    # ---- from masters ---------------------------------------------------------------------------
    def place(self, master: bytes, rid: bytes, ctl: dict[str, Any], payload: list[Any], now: float) -> list[Send]:
        """IT_PLACE: choose a lane for the partition (a new epoch drops the old one's placement). With no
        live lane for the service it waits, as a task does, up to ``unroutable_timeout`` (the lanes may
        be respawning: a rollback right after a lane died, a broker restart)."""
        service = ctl.get("service")
        if not isinstance(service, str) or not 0 < len(service.encode()) <= P.MAX_SERVICE:
            raise ProtocolError(f"IT_PLACE needs service (str), got {service!r:.80}")
        parts = R.num(ctl, "parts", 1, P.MAX_PARTITIONS)
        part, epoch = R.part_of(ctl, parts), R.num(ctl, "epoch", 1, 1 << 31)
        if ctl.get("combine") not in (None, "sum", "min", "max"):
            raise ProtocolError(f"IT_PLACE combine must be sum, min or max, got {ctl.get('combine')!r:.40}")
        R.split(payload, [R.num(ctl, "state", 1, P.MAX_FRAMES), *(n for _, n in R.index(ctl, "inbox", 2, parts))])
        run = self.runs.get(rid)
        if run is not None and run.master != master:
            raise ProtocolError("IT_PLACE: that run id is another master's")
        out: list[Send] = []
        if run is not None and run.epoch > epoch:
            return []  # a late placement of an epoch the master already left behind
        if run is None or run.epoch < epoch:
            if run is not None:
                out += self._drop(run)
            run = self.runs[rid] = Run(master, rid, service, parts, epoch)
        if part in run.placed or any(p == part for p, _, _ in run.unplaced):
            raise ProtocolError(f"IT_PLACE: partition {part} of epoch {epoch} was placed already")
        run.unplaced.append((part, ctl, payload))
        return out + self._place_waiting(run, now)

    def _place_waiting(self, run: Run, now: float) -> list[Send]:
        """Put the run's waiting partitions on lanes; then the round that waited for them starts."""
        out: list[Send] = []
        while run.unplaced:
            lane = self._choose(run)
            if lane is None:
                if run.unplaced_since is None:
                    run.unplaced_since = now
                return out
            part, ctl, payload = run.unplaced.pop(0)
            run.placed[part] = lane
            self.resident[lane.wid] = self.resident.get(lane.wid, 0) + 1
            self.counters["placed"] += 1
            body = {**ctl, "master": tag(run.master)}
            out.append((True, lane.wid, R.frames(P.WORKER, P.W_PLACE, run.rid, body, payload)))
        run.unplaced_since = None
        if run.held_round is not None:
            held, run.held_round = run.held_round, None
            out += self.round(run.master, run.rid, held)
        return out

    def round(self, master: bytes, rid: bytes, ctl: dict[str, Any]) -> list[Send]:
        """IT_ROUND: every lane holding partitions runs the round (each W_STEP says how many messages
        from other lanes each of its partitions must have: they were sent before it, on the same pipe)."""
        run = self._owned(master, rid)
        epoch, rnd = R.num(ctl, "epoch", 1, 1 << 31), R.num(ctl, "round", 0, 1 << 31)
        if run is None or run.epoch != epoch:
            return [] if run is not None and run.epoch > epoch else self._lost_unknown(master, rid, epoch)
        if run.unplaced:  # partitions wait for a lane: the round starts when they have one
            run.held_round = ctl
            return []
        if len(run.placed) != run.parts:
            return self._fail(run, P.BAD_REQUEST, {"message": f"round {rnd} before all {run.parts} partitions "
                                                              f"were placed ({len(run.placed)} are)"})
        if (lost := self._lost_lanes(run)):
            return lost
        run.round, run.done = rnd, {}
        by_lane = run.lanes()
        run.waiting = set(by_lane)
        expect, run.expect = run.expect, {}
        self.counters["rounds"] += 1
        timeout_ms = R.num(ctl, "timeout_ms", 0, 1 << 32) if "timeout_ms" in ctl else 0
        checkpoint = bool(ctl.get("checkpoint"))
        return [(True, wid, R.frames(P.WORKER, P.W_STEP, rid, {
            "epoch": epoch, "round": rnd, "parts": parts, "checkpoint": checkpoint, "timeout_ms": timeout_ms,
            "expect": {p: expect.get(p, 0) for p in parts}})) for wid, parts in by_lane.items()]

    def end(self, master: bytes, rid: bytes, ctl: dict[str, Any]) -> list[Send]:
        """IT_END: the lanes send their partitions' final states (``gather``) and drop the run."""
        run = self._owned(master, rid)
        if run is None:
            return self._lost_unknown(master, rid, R.num(ctl, "epoch", 1, 1 << 31)) if ctl.get("gather") else []
        if not ctl.get("gather"):
            return self._drop(run)
        if (lost := self._lost_lanes(run)):
            return lost
        run.gathering = set(run.placed)
        return [(True, wid, R.frames(P.WORKER, P.W_END, rid, {"epoch": run.epoch, "gather": True}))
                for wid in run.lanes()]

    def master_gone(self, master: bytes) -> list[Send]:
        """A master left or expired: its runs' partitions are freed on every lane."""
        out: list[Send] = []
        for run in [r for r in self.runs.values() if r.master == master]:
            out += self._drop(run)
        return out

    # ---- from lanes -----------------------------------------------------------------------------
    def stepped(self, sender: bytes, rid: bytes, ctl: dict[str, Any], payload: list[Any]) -> list[Send]:
        """W_STEPPED from a lane: forward its messages to the lanes of their destinations now (grouped per
        lane), its checkpoint parts to the master, and report the round when the last lane has. A
        W_STEPPED cut in pieces (``more``) completes the lane's round with its last piece."""
        run = self._run_at(sender, rid, ctl)
        if run is None:
            return []
        mine = {p for p, lane in run.placed.items() if lane.wid == sender}
        if run.round != ctl.get("round") or sender not in run.waiting:
            # outside the round, only an error counts (a placement the lane could not take): the run fails
            errors = [e for e in ctl.get("parts") or [] if isinstance(e, dict) and "error" in e]
            return self._results(run, errors[:1], mine) if errors else []
        out_idx = R.index(ctl, "out", 3, run.parts)
        ckpt = ctl.get("ckpt", [])
        if not isinstance(ckpt, list) or not all(isinstance(c, dict) for c in ckpt):
            raise ProtocolError("W_STEPPED ckpt must be a list of maps")
        ckpt_counts = [(c, R.num(c, "state", 1, P.MAX_FRAMES + 1), R.index(c, "inbox", 2, run.parts)) for c in ckpt]
        chunks = R.split(payload, [n for *_, n in out_idx]
                         + [s + sum(n for _, n in inbox) for _, s, inbox in ckpt_counts])
        more = bool(ctl.get("more"))  # a piece of a W_STEPPED cut at max_frames: its metrics come with the last
        failed = [] if more else self._results(run, ctl.get("parts"), mine)
        if failed:
            return failed
        sends: list[Send] = []
        by_lane = self._route(run, sender, mine, out_idx, chunks)
        for wid, (index, frames) in by_lane.items():
            body = {"epoch": run.epoch, "round": run.round + 1, "msgs": index}
            sends.append((True, wid, R.frames(P.WORKER, P.W_INBOX, rid, body, frames)))
        for (c, s, inbox), chunk in zip(ckpt_counts, chunks[len(out_idx):], strict=True):
            body = {"epoch": run.epoch, "round": run.round, "part": R.part_of(c, run.parts), "kind": "checkpoint",
                    "state": s, "inbox": [list(e) for e in inbox]}
            sends.append((False, run.master, R.frames(P.MASTER, P.IT_STATE, rid, body, chunk)))
        if more:
            return sends
        run.waiting.discard(sender)
        if not run.waiting:
            if len(run.done) != run.parts:
                return sends + self._fail(run, P.LOST, {"message": f"round {run.round}: {run.parts - len(run.done)} "
                                                                   "partitions did not report"})
            body = {"epoch": run.epoch, "round": run.round, "parts": run.done}
            sends.append((False, run.master, R.frames(P.MASTER, P.IT_DONE, rid, body)))
        return sends

    def _results(self, run: Run, results: Any, mine: set[int]) -> list[Send]:
        """Take a lane's metrics into the round; an error entry fails the run (the IT_FAIL to send)."""
        if not isinstance(results, list):
            raise ProtocolError("W_STEPPED parts must be a list")
        for entry in results:
            if not isinstance(entry, dict):
                raise ProtocolError("W_STEPPED parts entries must be maps")
            part = R.part_of(entry, run.parts)
            if part not in mine:
                raise ProtocolError(f"W_STEPPED reports partition {part}, which this lane does not hold")
            if "error" in entry:  # the step raised, or returned what a step must not: the run fails
                details = entry["error"] if isinstance(entry["error"], dict) else {"message": str(entry["error"])}
                code = str(entry.get("code", P.HANDLER_ERROR))
                return self._fail(run, code if code in P.ERROR_CODES else P.HANDLER_ERROR,
                                  {**details, "part": part, "round": run.round})
            run.done[part] = [entry.get("metric"), entry.get("bytes", 0)]
        return []

    def _route(self, run: Run, sender: bytes, mine: set[int], out_idx: list[tuple[int, ...]],
               chunks: list[list[Any]]) -> dict[bytes, tuple[list[list[int]], list[Any]]]:
        """Group a lane's outgoing messages by the lane of their destination: (index, frames) per lane."""
        by_lane: dict[bytes, tuple[list[list[int]], list[Any]]] = {}
        for (src, dst, _n), chunk in zip(out_idx, chunks, strict=False):
            if src not in mine:
                raise ProtocolError(f"W_STEPPED carries a message from partition {src}, which this lane does not hold")
            lane = run.placed[dst]
            if lane.wid == sender:
                raise ProtocolError(f"W_STEPPED routes a message to partition {dst} on the sender's own lane")
            index, frames = by_lane.setdefault(lane.wid, ([], []))
            index.append([src, dst, len(chunk)])
            frames += chunk
            run.expect[dst] = run.expect.get(dst, 0) + 1
            self.counters["routed_bytes"] += sum(len(f) for f in chunk)
        return by_lane

    def state_of(self, sender: bytes, rid: bytes, ctl: dict[str, Any], payload: list[Any]) -> list[Send]:
        """W_STATE: a partition's final state, on to the master; the run ends with its last one."""
        run = self._run_at(sender, rid, ctl)
        if run is None or not run.gathering:
            return []
        part = R.part_of(ctl, run.parts)
        if part not in run.gathering or run.placed[part].wid != sender:
            return []
        if "error" in ctl:  # its final state cannot travel
            details = ctl["error"] if isinstance(ctl["error"], dict) else {"message": str(ctl["error"])}
            return self._fail(run, P.HANDLER_ERROR, {**details, "part": part})
        R.split(payload, [R.num(ctl, "state", 1, P.MAX_FRAMES + 1)])
        run.gathering.discard(part)
        body: dict[str, Any] = {"epoch": run.epoch, "round": ctl.get("round"), "part": part, "kind": "final",
                "state": len(payload), "inbox": []}
        sends: list[Send] = [(False, run.master, R.frames(P.MASTER, P.IT_STATE, rid, body, payload))]
        if not run.gathering:
            self._forget(run)
        return sends

    def malformed(self, sender: bytes, rid: bytes, why: str) -> list[Send]:
        """A lane holding partitions of the run sent something malformed for it: the round could never
        finish, so the run fails (BAD_REQUEST naming the problem) instead of waiting for ever."""
        run = self.runs.get(rid)
        lane = next((lane for lane in run.placed.values() if lane.wid == sender), None) if run else None
        if run is None or lane is None:
            return []
        return self._fail(run, P.BAD_REQUEST, {"message": f"lane {lane.address} sent a malformed message for "
                                                          f"this run: {why}"})

    # ---- time and lanes ---------------------------------------------------------------------------
    def check(self, now: float) -> list[Send]:
        """Runs with a partition on a lane that is gone: LOST to their master (who rolls back). Partitions
        waiting for a lane get one if one joined, or fail UNAVAILABLE after ``unroutable_timeout``."""
        out: list[Send] = []
        for run in list(self.runs.values()):
            out += self._lost_lanes(run)
            if run.unplaced and self.runs.get(run.rid) is run:
                out += self._place_waiting(run, now)
                if run.unplaced_since is not None and now - run.unplaced_since >= self.state.unroutable_timeout:
                    out += self._fail(run, P.UNAVAILABLE, self._unavailable(run.service))
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        """For STATUS: each run's round and where its partitions sit."""
        return [{"master": tag(run.master), "run": run.rid.hex(), "service": run.service, "epoch": run.epoch,
                 "round": run.round, "partitions": run.parts,
                 "lanes": {lane.address: parts for lane, parts in self._by_address(run).items()}}
                for run in self.runs.values()]

    # ---- helpers --------------------------------------------------------------------------------
    def _owned(self, master: bytes, rid: bytes) -> Run | None:
        """The run ``rid`` if it is ``master``'s (another master's id names nothing of this one's)."""
        run = self.runs.get(rid)
        return run if run is not None and run.master == master else None

    def _run_at(self, sender: bytes, rid: bytes, ctl: dict[str, Any]) -> Run | None:
        """The run a lane's message belongs to, if it is of the current epoch (else a late one: dropped)."""
        epoch = R.num(ctl, "epoch", 1, 1 << 31)
        run = self.runs.get(rid)
        if run is None or run.epoch != epoch or not any(lane.wid == sender for lane in run.placed.values()):
            return None
        return run

    def _choose(self, run: Run) -> LaneRecord | None:
        """The lane for the next partition: fewest of this run's partitions, then fewest partitions of
        any run, then fewest tasks in flight, then address (the same cluster places the same way)."""
        lanes = [lane for lane in self.state.by_service.get(run.service, ())
                 if not lane.host.draining and self.state.lanes.get(lane.wid) is lane]
        if not lanes:
            return None
        mine: dict[bytes, int] = {}
        for lane in run.placed.values():
            mine[lane.wid] = mine.get(lane.wid, 0) + 1
        return min(lanes, key=lambda lane: (mine.get(lane.wid, 0), self.resident.get(lane.wid, 0),
                                            len(lane.inflight), lane.address))

    def _unavailable(self, service: str) -> dict[str, Any]:
        if self.state.broken_by.get(service):
            return self.state._unservable(service)
        offered = sorted(s for s, lanes in self.state.by_service.items() if lanes)
        return {"message": f"no live worker serves {service!r} (services offered: {', '.join(offered) or 'none'})"}

    def _lost_lanes(self, run: Run) -> list[Send]:
        gone = sorted(p for p, lane in run.placed.items() if self.state.lanes.get(lane.wid) is not lane)
        if not gone:
            return []
        self.counters["lost"] += 1
        where = sorted({run.placed[p].address for p in gone})
        return self._fail(run, P.LOST, {"message": f"partitions {gone} were lost with lane(s) {', '.join(where)}",
                                        "parts": gone})

    def _lost_unknown(self, master: bytes, rid: bytes, epoch: int) -> list[Send]:
        """A round or gather for a run this broker does not know (it restarted): the master rolls back."""
        body = {"epoch": epoch, "code": P.LOST, "message": "the broker does not know this run (it restarted?)"}
        return [(False, master, R.frames(P.MASTER, P.IT_FAIL, rid, body))]

    def _fail(self, run: Run, code: str, details: dict[str, Any]) -> list[Send]:
        """IT_FAIL to the master; the lanes drop this epoch (the master places a new one, or ends)."""
        out = self._drop(run)
        body = {**details, "epoch": run.epoch, "code": code}
        return out + [(False, run.master, R.frames(P.MASTER, P.IT_FAIL, run.rid, body))]

    def _drop(self, run: Run) -> list[Send]:
        out: list[Send] = [(True, wid, R.frames(P.WORKER, P.W_END, run.rid, {"epoch": run.epoch, "gather": False}))
                           for wid in run.lanes() if wid in self.state.lanes]
        self._forget(run)
        return out

    def _forget(self, run: Run) -> None:
        for lane in run.placed.values():
            left = self.resident.get(lane.wid, 0) - 1
            if left > 0:
                self.resident[lane.wid] = left
            else:
                self.resident.pop(lane.wid, None)
        run.placed = {}
        if self.runs.get(run.rid) is run:
            del self.runs[run.rid]

    @staticmethod
    def _by_address(run: Run) -> dict[LaneRecord, list[int]]:
        out: dict[LaneRecord, list[int]] = {}
        for part in sorted(run.placed):
            out.setdefault(run.placed[part], []).append(part)
        return out
