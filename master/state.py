"""The master's decisions, without a socket: :class:`MasterState`.

It keeps every outstanding task (:class:`Pending`) until it resolves, exactly once, and decides
everything time or the broker changes: local deadlines, PING and the broker's liveness, when to
give up on a socket, when to resend. Methods take ``now`` (monotonic seconds) and return the
messages to send, so the whole life cycle is unit-tested without sockets or sleeps
(``tests/test_master_state.py``). The I/O loop (``ioloop.py``) owns the socket and carries out
what the state returns.

Resends (PROTOCOL.md §6.2 rule 7). Every outstanding task and status request is resent **once per
event** that may have lost messages, at the first PONG after the event:

* the link dropped and came back (the socket monitor) — :meth:`MasterState.link_came_back`;
* the broker was silent for liveness × interval, so the loop opens a new socket — :meth:`tick`;
* a PONG carries a session other than the last one: the broker restarted or forgot us.

The first PONG of all is none of these: tasks submitted before it went out once already, and a
broker that lost them unseen shows as one of the events above.
"""

from __future__ import annotations

import heapq
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ndpipe import protocol as P
from ndpipe import rounds as R
from ndpipe.codec import Limits, decode, decode_outcomes
from ndpipe.config import MasterConfig
from ndpipe.errors import BrokerUnreachable, DecodeError, NdpipeError, ProtocolError, error_from_code
from ndpipe.link import BrokerLink
from ndpipe.master.iterate import IterRun, resolve
from ndpipe.refs import raw_bytes
from ndpipe.transport import unpack_map, unresolved

log = logging.getLogger("ndpipe.master")
Frames = list[Any]
STATUS_REPLY_MAX = 64 << 20  # bytes of a STATUS_REPLY body the master decodes
ERROR_DETAILS_MAX = 16 << 20  # bytes of ERROR details (a remote traceback can be long)


@dataclass(slots=True, eq=False)
class Pending:
    """A task the master sent (or will send) and has no answer for yet."""

    tid: bytes
    service: bytes
    options: bytes
    payload: list[Any]
    future: Future[Any]
    deadline: float | None
    batch: int = 0  # FLAG_BATCH tasks: number of calls (the result is that many outcomes)
    stages: tuple[str, ...] = ()  # a pipeline's services (errors name the stage that failed)
    stream: Any = None  # FLAG_STREAM: a weak reference to the master.stream.Stream its parts go to


@dataclass(slots=True)
class Tick:
    """What :meth:`MasterState.tick` asks of the loop: open a new socket first, then send these."""

    send: list[Frames] = field(default_factory=list)
    reconnect: bool = False


class MasterState:
    """Outstanding tasks, status requests, deadlines, the broker session and link liveness."""

    def __init__(self, cfg: MasterConfig, endpoint: str, now: float) -> None:
        self.cfg = cfg
        self.endpoint = endpoint
        self.pending: dict[bytes, Pending] = {}
        self.deadlines: list[tuple[float, bytes]] = []  # heap; entries of answered tasks are skipped
        self.status_waiters: dict[bytes, Future[dict[str, Any]]] = {}
        self.link = BrokerLink(cfg.heartbeat_interval, cfg.liveness, now)  # PING and the broker's liveness
        self.session: bytes | None = None
        self.resend_due = False  # an event may have lost messages: resend at the next PONG
        self.lost_since: float | None = None
        self.refused = ""  # why the last CURVE handshake failed (the I/O loop's link monitor), if it did
        self.unresolved = ""  # why the broker's host name does not resolve, if it does not (at the last silence)
        self.limits = Limits(max_frames=cfg.max_frames)
        self.counters = {"late_answers": 0, "resends": 0, "fetches": 0}
        self.refs: dict[bytes, tuple[bytes, Any, int]] = {}  # put(): digest -> (description, array, puts)
        self.runs: dict[bytes, IterRun] = {}  # iterations under way, by run id

    def next_wake(self) -> float:
        """When :meth:`tick` next has something to do."""
        wake = min(self.link.next_beat, self.deadlines[0][0]) if self.deadlines else self.link.next_beat
        for run in self.runs.values():
            deadline = run.deadline
            if deadline is not None:
                wake = min(wake, deadline)
        return wake

    # ---- iterations (master/iterate.py decides; this keeps them and routes their messages) ---------
    def iter_start(self, run: IterRun, now: float) -> list[Frames]:
        if run.future.done():
            return []
        self.runs[run.rid] = run
        return run.start(now)

    def iter_stop(self, rid: bytes) -> list[Frames]:
        run = self.runs.pop(rid, None)
        return run.cancel() if run is not None else []

    def _on_iteration(self, command: bytes, frames: Frames, now: float) -> list[Frames]:
        rid, ctl, payload = R.parse(frames, P.MASTER)
        run = self.runs.get(rid)
        if run is None:
            return []
        try:
            out = run.on_message(command, ctl, payload, now)
        except Exception as exc:  # a run that cannot go on must end with an error, never wait for ever
            log.warning("iteration %s: %s", rid.hex()[:8], exc)
            run.fail(NdpipeError(f"iteration {rid.hex()}: cannot go on: {exc}"))
            out = [R.frames(P.MASTER, P.IT_END, rid, {"epoch": run.epoch, "gather": False})]
        if run.future.done():
            del self.runs[rid]
        return out

    # ---- from user threads --------------------------------------------------------------------
    def submit(self, p: Pending, now: float) -> list[Frames]:
        if p.future.done():  # cancelled by the user before the I/O thread saw it
            return []
        self.pending[p.tid] = p
        if p.deadline is not None:
            heapq.heappush(self.deadlines, (p.deadline, p.tid))
        return [self._submit_frames(p, now)]

    def cancel(self, tid: bytes) -> list[Frames]:
        return [[P.MASTER, P.CANCEL, tid]] if self.pending.pop(tid, None) is not None else []

    def status(self, request: bytes, future: Future[dict[str, Any]]) -> list[Frames]:
        self.status_waiters[request] = future
        return [[P.MASTER, P.STATUS, request]]

    def status_withdrawn(self, request: bytes) -> None:
        self.status_waiters.pop(request, None)

    def put(self, digest: bytes, meta: bytes, array: Any) -> None:
        """Hold an array for the workers that fetch it, until as many :meth:`release` as ``put`` of
        that content (two puts of equal arrays give one ref) or the master closes."""
        held = self.refs.get(digest)
        self.refs[digest] = (meta, array, held[2] + 1 if held else 1)

    def release(self, digest: bytes) -> None:
        held = self.refs.get(digest)
        if held is not None and held[2] > 1:
            self.refs[digest] = (held[0], held[1], held[2] - 1)
        else:
            self.refs.pop(digest, None)

    # ---- from the broker ----------------------------------------------------------------------
    def on_message(self, frames: Frames, now: float) -> list[Frames]:
        """One message from the broker (without routing id). Raises ProtocolError if malformed."""
        command = P.check_header(frames, P.MASTER, 2)
        self.link.heard(now)
        if self.lost_since is not None:
            log.info("broker %s reachable again", self.endpoint)
            self.lost_since = None
        if command == P.RESULT:
            self._on_result(*P.parse_result(frames))
        elif command == P.ERROR:
            self._on_error(*P.parse_error(frames))
        elif command == P.PONG:
            return self._on_pong(*P.parse_pong(frames), now)
        elif command == P.PART:
            return self._on_part(*P.parse_part(frames, P.MASTER))
        elif command == P.FETCH:
            request, digest = P.parse_fetch(frames)
            held = self.refs.get(digest)
            self.counters["fetches"] += 1
            if held is None:
                why = "its master does not hold it (released, or put() by another master)"
                return [[P.MASTER, P.DATA, request, digest, b"", why.encode()]]
            return [[P.MASTER, P.DATA, request, digest, held[0], raw_bytes(held[1])]]
        elif command in (P.IT_DONE, P.IT_STATE, P.IT_FAIL):
            return self._on_iteration(command, frames, now)
        elif command == P.STATUS_REPLY:
            body, request = P.parse_status_reply(frames)
            future = self.status_waiters.pop(request, None)
            if future is not None:
                resolve(future, value=unpack_map(body, STATUS_REPLY_MAX))
        else:
            raise ProtocolError(f"unknown broker command {command!r}")
        return []

    def _on_result(self, tid: bytes, payload: list[Any]) -> None:
        p = self.pending.pop(tid, None)
        if p is None:  # an answer already delivered (the task ran twice), or for a cancelled task
            self.counters["late_answers"] += 1
            return
        try:
            value = decode_outcomes(payload, p.batch, self.limits) if p.batch else decode(payload, self.limits)
        except DecodeError as exc:
            resolve(p.future, error=exc)
            return
        sink = p.stream() if p.stream is not None else None
        if sink is not None and value != sink.received:  # the last parts never came: say so, not a clean end
            resolve(p.future, error=error_from_code(P.STREAM_BROKEN, tid.hex(), {
                "message": f"the stream made {value} parts but {sink.received} arrived", "parts": sink.received}))
            return
        resolve(p.future, value=value)

    def _on_part(self, tid: bytes, seq: int, payload: list[Any]) -> list[Frames]:
        p = self.pending.get(tid)
        if p is None or p.stream is None:  # a stream closed, or already answered
            return []
        sink = p.stream()
        if sink is None:  # its consumer dropped it without closing it: stop it
            del self.pending[tid]
            p.future.cancel()
            return [[P.MASTER, P.CANCEL, tid]]
        try:
            value = decode(payload, self.limits)
        except DecodeError as exc:
            del self.pending[tid]
            resolve(p.future, error=exc)
            return [[P.MASTER, P.CANCEL, tid]]
        taken = sink.part(seq, value)
        if taken is None:  # a part went missing on the way: never deliver the stream with a hole in it
            del self.pending[tid]
            error = error_from_code(P.STREAM_BROKEN, tid.hex(), {
                "message": f"part {sink.received} of the stream was lost on the way (part {seq} came next); "
                           f"{sink.received} parts were delivered", "parts": sink.received})
            resolve(p.future, error=error)
            return [[P.MASTER, P.CANCEL, tid]]
        if not taken:  # a rerun's part this stream already has: let the lane go on
            return self.ack(tid, seq)
        return []

    def ack(self, tid: bytes, seq: int) -> list[Frames]:
        """The consumer took part ``seq`` of a stream: the lane may send more."""
        return [[P.MASTER, P.ACK, tid, seq.to_bytes(4, "big")]] if tid in self.pending else []

    def _on_error(self, tid: bytes, code: str, body: bytes, stage: int | None) -> None:
        p = self.pending.pop(tid, None)
        if p is None:
            self.counters["late_answers"] += 1
            return
        try:
            details = unpack_map(body, ERROR_DETAILS_MAX)
        except ProtocolError as exc:
            details = {"message": f"undecodable error details: {exc}"}
        if stage is not None and stage < len(p.stages):
            name = p.stages[stage]
            details = {**details, "stage": stage, "service": name,
                       "message": f"pipeline stage {stage} ({name!r}): {details.get('message', code)}"}
        resolve(p.future, error=error_from_code(code, p.tid.hex(), details))

    def _on_pong(self, session: bytes, broker_interval: float, now: float) -> list[Frames]:
        self.link.adopt(min(self.cfg.heartbeat_interval, broker_interval), self.cfg.liveness, now)
        restarted = self.session is not None and session != self.session
        if restarted:
            log.warning("broker restarted or forgot this master: resending %d tasks", len(self.pending))
        resend = self.resend_due or restarted
        self.resend_due = False
        self.session = session
        return self._resend_all(now) if resend else []

    def _resend_all(self, now: float) -> list[Frames]:
        """Every outstanding task and status request again (the broker drops duplicates of tasks it
        still holds). Once per event: a second resend would rerun tasks whose answers are on the way."""
        self.counters["resends"] += 1
        out = [self._submit_frames(p, now) for p in self.pending.values()]
        out += [[P.MASTER, P.STATUS, request] for request in self.status_waiters]
        for run in self.runs.values():  # their messages may be lost: each rolls back to its checkpoint
            out += run.recover(now, "the link to the broker was lost or the broker restarted")
        return out

    def link_came_back(self, now: float) -> list[Frames]:
        """The socket monitor saw the link drop and return: resend at the PONG of the PING sent now."""
        log.warning("link to broker %s dropped and came back: %d tasks to resend", self.endpoint, len(self.pending))
        self.resend_due = True
        self.link.beaten(now)
        return [[P.MASTER, P.PING], *self._reack()]

    def _reack(self) -> list[Frames]:
        """Acknowledge again what each stream's consumer has taken: an ACK lost with the link would
        leave its lane waiting with a full window, and the consumer waiting for it."""
        out: list[Frames] = []
        for tid, p in self.pending.items():
            sink = p.stream() if p.stream is not None else None
            if sink is not None and sink.parts:
                out += self.ack(tid, sink.parts - 1)
        return out

    # ---- time ---------------------------------------------------------------------------------
    def tick(self, now: float) -> Tick:
        """Fail tasks past their deadline (and CANCEL them at the broker); PING when due; after
        silence for liveness × interval ask for a new socket; after ``broker_timeout`` of it, fail
        everything outstanding with BrokerUnreachable."""
        out = Tick(self._expire(now))
        for rid, run in list(self.runs.items()):
            # cancelled: its Iteration was dropped (leaving the loop early); the partitions are freed
            out.send += run.cancel() if run.future.cancelled() else run.tick(now)
            if run.future.done():
                del self.runs[rid]
        if not self.link.beat_due(now):
            return out
        if self.link.silent(now):
            if self.lost_since is None:
                self.lost_since = self.link.last_heard
                self.unresolved = unresolved(self.endpoint)  # asked once per silence: a name lookup may block
                log.warning("broker %s silent for %.1f s: reconnecting%s", self.endpoint, now - self.link.last_heard,
                            f" ({self.refused or self.unresolved})" if self.refused or self.unresolved else "")
            out.reconnect = True
            self.link.reconnected(now)  # a full liveness period (at least the back-off) for the new socket
            self.resend_due = True
        limit = self.cfg.broker_timeout
        if self.lost_since is not None and limit is not None and now - self.lost_since > limit:
            why = (f"{self.refused}: check security.broker_key, and that this key is in the broker's "
                   "security.masters" if self.refused else
                   f"{self.unresolved}" if self.unresolved else "is `ndpipe broker` running there?")
            self.fail_all(BrokerUnreachable(
                f"broker {self.endpoint} unreachable for {now - self.lost_since:.1f} s "
                f"(master.broker_timeout = {limit} s); {why}"))
        out.send.append([P.MASTER, P.PING])
        self.link.beaten(now)
        return out

    def _expire(self, now: float) -> list[Frames]:
        if len(self.deadlines) > 2 * len(self.pending) + 1024:  # mostly entries of tasks long answered
            self.deadlines = [(p.deadline, p.tid) for p in self.pending.values() if p.deadline is not None]
            heapq.heapify(self.deadlines)
        out: list[Frames] = []
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, tid = heapq.heappop(self.deadlines)
            p = self.pending.get(tid)
            if p is None or p.deadline != deadline:
                continue
            del self.pending[tid]
            timeout = P.OPTIONS.unpack(p.options)[0] / 1000
            what = f" from pipeline {list(p.stages)}" if p.stages else ""
            error = error_from_code(P.TIMEOUT, tid.hex(), {"message": f"no result within {timeout:g} s{what}"})
            resolve(p.future, error=error)
            out.append([P.MASTER, P.CANCEL, tid])
        return out

    def fail_all(self, error: BaseException) -> None:
        """Resolve every outstanding task and status request with ``error`` (closing, or a lost broker)."""
        pending, self.pending = self.pending, {}
        for p in pending.values():
            resolve(p.future, error=error)
        waiters, self.status_waiters = self.status_waiters, {}
        for future in waiters.values():
            resolve(future, error=error)
        runs, self.runs = self.runs, {}
        for run in runs.values():
            run.fail(error)

    def _submit_frames(self, p: Pending, now: float) -> Frames:
        options = p.options
        if p.deadline is not None:  # tell the broker what is left, not the original timeout
            _t, attempts, flags = P.OPTIONS.unpack(options)
            options = P.OPTIONS.pack(max(1, int((p.deadline - now) * 1000)), attempts, flags)
        return [P.MASTER, P.SUBMIT, p.service, p.tid, options, *p.payload]
