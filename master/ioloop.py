"""The master's I/O thread: one poll loop that alone touches the DEALER socket.

It keeps every outstanding task (:class:`Pending`) until it resolves, exactly once: results and
errors, local timeouts, PING/PONG with the session token, a new socket after silence, a silent
link drop seen by ``LinkWatch``, BrokerUnreachable after ``broker_timeout``. Every outstanding
task is resent exactly once per such event, at the first PONG after it (``resend_due`` or a new
session). User threads talk to it only through ``Master._inbox`` and a wake pipe.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from ndpipe import protocol as P
from ndpipe.codec import Limits, decode, decode_outcomes
from ndpipe.errors import BrokerUnreachable, DecodeError, NdpipeError, ProtocolError, error_from_code
from ndpipe.transport import LinkWatch, Throttle, frame_bytes, recv_bounded, send_frames, unpack_map

if TYPE_CHECKING:
    from ndpipe.master.client import Master

log = logging.getLogger("ndpipe.master")


@dataclass(slots=True, eq=False)
class Pending:
    tid: bytes
    service: bytes
    options: bytes
    payload: list[Any]
    future: Future[Any]
    deadline: float | None
    batch: int = 0  # FLAG_BATCH tasks: number of calls (the result is that many outcomes)


class IOLoop:
    """The master's poll loop (runs in the I/O thread, touches the socket alone)."""

    def __init__(self, master: Master) -> None:
        self.m = master
        self.pending: dict[bytes, Pending] = {}
        self.deadlines: list[tuple[float, bytes]] = []
        self.status_waiters: dict[bytes, Future[dict[str, Any]]] = {}
        self.watch = LinkWatch(master._sock)
        cfg = master.cfg
        self.interval = cfg.heartbeat_interval
        self.liveness = cfg.liveness
        self.session: bytes | None = None
        self.resend_due = False  # the link dropped or the socket is new: resend at the next PONG
        now = time.monotonic()
        self.heard = now
        self.lost_since: float | None = None
        self.next_ping = now
        self.closing = False
        self.malformed = Throttle(log)
        self.dropped = Throttle(log)
        self.limits = Limits(max_frames=cfg.max_frames)
        self.counters = {"late_answers": 0, "resends": 0}

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.m._wake_r, zmq.POLLIN)
        poller.register(self.m._sock, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)
        while not self.closing:
            now = time.monotonic()
            wake = self.next_ping
            if self.deadlines:
                wake = min(wake, self.deadlines[0][0])
            events = dict(poller.poll(int(max(0.0, wake - now) * 1000)))
            if self.m._wake_r in events:
                try:
                    while os.read(self.m._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                # After emptying the pipe, before reading the inbox: an item posted before this line is
                # read just below; one posted after it finds the flag clear and writes a new wake-up.
                self.m._wake_pending = False
            self._inbox()
            if self.m._sock in events:
                self._receive()
            if self.watch.monitor in events and self.watch.came_back():
                log.warning("link to broker %s dropped and came back: %d tasks to resend",
                            self.m.endpoint, len(self.pending))
                self._resend_at_pong(time.monotonic())
            now = time.monotonic()
            self._expire(now)
            if now >= self.next_ping:
                self._ping(now, poller)
        self._send([P.MASTER, P.BYE])
        self.m._sock.close(linger=200)
        self._fail_all(NdpipeError("master closed before the task finished"))

    def _send(self, frames: list[Any]) -> None:
        try:
            send_frames(self.m._sock, frames, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped.warning("broker link full: message dropped (tasks are resent after a reconnect)")

    def _submit(self, p: Pending) -> None:
        options = p.options
        if p.deadline is not None:  # tell the broker what is left, not the original timeout
            _t, attempts, flags = P.OPTIONS.unpack(options)
            left = max(1, int((p.deadline - time.monotonic()) * 1000))
            options = P.OPTIONS.pack(left, attempts, flags)
        self._send([P.MASTER, P.SUBMIT, p.service, p.tid, options, *p.payload])

    def _inbox(self) -> None:
        inbox = self.m._inbox
        while inbox:
            kind, item = inbox.popleft()
            if kind == "submit":
                if item.future.done():
                    continue
                self.pending[item.tid] = item
                if item.deadline is not None:
                    heapq.heappush(self.deadlines, (item.deadline, item.tid))
                self._submit(item)
            elif kind == "cancel":
                if self.pending.pop(item, None) is not None:
                    self._send([P.MASTER, P.CANCEL, item])
            elif kind == "status":
                request, future = item
                self.status_waiters[request] = future
                self._send([P.MASTER, P.STATUS, request])
            elif kind == "status_cancel":
                self.status_waiters.pop(item, None)
            elif kind == "close":
                self.closing = True

    def _receive(self) -> None:
        sock = self.m._sock
        for _ in range(1024):
            try:
                frames = recv_bounded(sock, self.limits.max_frames + 8, head=3)
                self._on_message(frames)
            except zmq.Again:
                return
            except ProtocolError as exc:
                self.malformed.warning("dropped malformed message from broker: %s", exc)
            except Exception:  # a bug handling one message must not kill the I/O thread
                log.exception("error while handling a message from the broker")

    def _on_message(self, frames: list[Any]) -> None:
        command = P.check_header(frames, P.MASTER, 2)
        self.heard = time.monotonic()
        if self.lost_since is not None:
            log.info("broker %s reachable again", self.m.endpoint)
            self.lost_since = None
        if command == P.RESULT:
            P.check_header(frames, P.MASTER, 4)
            p = self.pending.pop(P.task_id_of(frames[2]), None)
            if p is None:  # an answer already delivered (task ran twice), or for a cancelled task
                self.counters["late_answers"] += 1
                return
            try:
                if p.batch:
                    resolve(p.future, value=decode_outcomes(frames[3:], p.batch, self.limits))
                else:
                    resolve(p.future, value=decode(frames[3:], self.limits))
            except DecodeError as exc:
                resolve(p.future, error=exc)
        elif command == P.ERROR:
            self._on_error(frames)
        elif command == P.PONG:
            self._on_pong(frames)
        elif command == P.STATUS_REPLY:
            P.check_header(frames, P.MASTER, 4)
            future = self.status_waiters.pop(frame_bytes(frames[3]), None)
            if future is not None:
                resolve(future, value=unpack_map(frame_bytes(frames[2]), 64 << 20))
        else:
            raise ProtocolError(f"unknown broker command {command!r}")

    def _on_error(self, frames: list[Any]) -> None:
        P.check_header(frames, P.MASTER, 5)
        p = self.pending.pop(P.task_id_of(frames[2]), None)
        if p is None:
            self.counters["late_answers"] += 1
            return
        try:
            details = unpack_map(frame_bytes(frames[4]), 16 << 20)
        except ProtocolError as exc:
            details = {"message": f"undecodable error details: {exc}"}
        code = frame_bytes(frames[3]).decode("ascii", "replace")
        resolve(p.future, error=error_from_code(code, p.tid.hex(), details))

    def _on_pong(self, frames: list[Any]) -> None:
        P.check_header(frames, P.MASTER, 4)
        session = frame_bytes(frames[2])
        broker_interval = max(0.01, int.from_bytes(frame_bytes(frames[3]), "big") / 1000)
        self.interval = min(self.m.cfg.heartbeat_interval, broker_interval)
        self.next_ping = min(self.next_ping, time.monotonic() + self.interval)
        if self.resend_due or session != self.session:
            # A new broker, or one that forgot us, holds none of our tasks; before the first PONG, a
            # broker that died unseen may have swallowed some; after a link drop or a new socket,
            # messages in flight both ways are gone. Resend once, here, whichever of these happened
            # (a second resend would rerun tasks whose answers are on their way): the broker drops
            # duplicates of tasks it still holds.
            if self.session is not None and session != self.session:
                log.warning("broker restarted or forgot this master: resending %d tasks", len(self.pending))
            self._resend_all()
        self.resend_due = False
        self.session = session

    def _resend_all(self) -> None:
        """After anything that may have lost messages: every outstanding task and status request
        again (the broker drops duplicates of tasks it still holds)."""
        self.counters["resends"] += 1
        for p in list(self.pending.values()):
            self._submit(p)
        for request in self.status_waiters:
            self._send([P.MASTER, P.STATUS, request])

    def _expire(self, now: float) -> None:
        if len(self.deadlines) > 2 * len(self.pending) + 1024:  # entries of tasks long answered
            self.deadlines = [(p.deadline, p.tid) for p in self.pending.values() if p.deadline is not None]
            heapq.heapify(self.deadlines)
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, tid = heapq.heappop(self.deadlines)
            p = self.pending.get(tid)
            if p is None or p.deadline != deadline:
                continue
            del self.pending[tid]
            timeout = P.OPTIONS.unpack(p.options)[0] / 1000
            err = error_from_code(P.TIMEOUT, tid.hex(), {"message": f"no result within {timeout:g} s"})
            resolve(p.future, error=err)
            self._send([P.MASTER, P.CANCEL, tid])

    def _ping(self, now: float, poller: zmq.Poller) -> None:
        silent = now - self.heard
        if silent > self.interval * self.liveness:
            if self.lost_since is None:
                self.lost_since = self.heard
                log.warning("broker %s silent for %.1f s: reconnecting", self.m.endpoint, silent)
            limit = self.m.cfg.broker_timeout
            if limit is not None and now - self.lost_since > limit:
                self._fail_all(BrokerUnreachable(
                    f"broker {self.m.endpoint} unreachable for {now - self.lost_since:.1f} s "
                    f"(master.broker_timeout = {limit} s); is `ndpipe broker` running there?"))
            poller.unregister(self.m._sock)
            poller.unregister(self.watch.monitor)
            self.watch.close()
            self.m._sock.close(linger=0)
            self.m._sock = self.m._new_socket()
            self.watch = LinkWatch(self.m._sock)
            poller.register(self.m._sock, zmq.POLLIN)
            poller.register(self.watch.monitor, zmq.POLLIN)
            self.heard = now  # give the new socket a full liveness period
            self.resend_due = True
        self._send([P.MASTER, P.PING])
        self.next_ping = now + self.interval

    def _resend_at_pong(self, now: float) -> None:
        """The link dropped and came back: resend when the broker answers a PING, which is sent now."""
        self.resend_due = True
        self._send([P.MASTER, P.PING])
        self.next_ping = now + self.interval

    def _fail_all(self, error: BaseException) -> None:
        pending, self.pending = self.pending, {}
        for p in pending.values():
            resolve(p.future, error=error)
        waiters, self.status_waiters = self.status_waiters, {}
        for future in waiters.values():
            resolve(future, error=error)


def resolve(future: Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless the user cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass
