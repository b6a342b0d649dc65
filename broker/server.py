"""The broker process: one poll loop around :class:`~ndpipe.broker.state.BrokerState`.

Frontend ROUTER (masters) and backend ROUTER (workers). Only header frames are read; payload
frames are stored as ``zmq.Frame`` objects and forwarded untouched. A malformed message is logged
(rate-limited) and dropped; if it carried a usable task id the master gets a BAD_REQUEST error so
it does not wait for nothing. Nothing a peer sends can stop the loop.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import time
from typing import Any

import msgpack
import zmq

from ndpipe import protocol as P
from ndpipe import rounds as R
from ndpipe import security
from ndpipe.broker import status
from ndpipe.broker.budget import ByteBudget
from ndpipe.broker.guard import Guard
from ndpipe.broker.iterate import Runs, Send
from ndpipe.broker.metrics import BrokerMetrics
from ndpipe.broker.state import BrokerState, Task
from ndpipe.config import BrokerConfig, SecurityConfig
from ndpipe.errors import AddressInUse, ConfigError, ProtocolError
from ndpipe.runtime import StopSignal, limit_malloc_arenas, trim_heap
from ndpipe.sdnotify import Notifier, Rate
from ndpipe.security import tag
from ndpipe.transport import (
    ZERO_COPY_MIN,
    Throttle,
    TooManyFrames,
    configure,
    frame_bytes,
    readable,
    recv_bounded,
    recv_keyed,
    send_frames,
    unpack_map,
)

log = logging.getLogger("ndpipe.broker")

EXPIRY_TICKS = 4  # expiry checks per heartbeat interval


class Broker:
    """Bind both sockets, then :meth:`run` until :meth:`stop` (or a signal) asks it to end."""

    def __init__(self, config: BrokerConfig | None = None, context: zmq.Context[Any] | None = None,
                 sec: SecurityConfig | None = None, notify: Notifier | None = None) -> None:
        self.cfg = config or BrokerConfig()
        self.notify = notify or Notifier()  # systemd's READY/STATUS/WATCHDOG; does nothing outside a unit
        self._rate = Rate()
        self.sec = sec or SecurityConfig()
        self.curve = security.server_curve(self.sec)  # ConfigError before anything opens
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        # ZAP listens before either socket binds: no handshake is ever answered by nobody.
        self.guard = Guard(self.ctx, self.sec) if self.curve else None
        self.peer_key = b""  # the authenticated key of the message being handled (curve only)
        self.state = BrokerState(
            self.cfg.heartbeat_interval, self.cfg.liveness, self.cfg.max_attempts, self.cfg.max_queued,
            self.cfg.max_services, self.cfg.unroutable_timeout,
            ByteBudget(self.cfg.max_queued_bytes, self.cfg.max_queued_bytes_per_master,
                       self.cfg.max_queued_bytes_per_service),
        )
        self.runs = Runs(self.state)  # iterations: where partitions sit, messages between them, barriers
        self.frontend = self._router(security.MASTERS)
        self.backend = self._router(security.WORKERS)
        self._malformed = Throttle(log)
        self._undeliverable = Throttle(log)
        self._old = Throttle(log)
        self.metrics: BrokerMetrics | None = None  # broker.metrics: the Prometheus listener, once bound

    def _router(self, domain: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.ROUTER)
        # No ROUTER_HANDOVER on the workers' socket with curve on: libzmq hands an id over before any
        # message, so a listed key presenting a connected daemon's id would receive its tasks. Nothing
        # there needs it: daemons and lanes take a fresh random id per connection (PROTOCOL.md §13).
        # Masters keep their id across sockets (the broker knows them by it), so their socket keeps it.
        handover = not (self.curve and domain == security.WORKERS)
        configure(sock, self.cfg.hwm, self.cfg.max_frame_bytes, router=True, handover=handover)
        security.server(sock, self.curve, domain)
        # Read ahead little per peer: what a peer sends faster than the broker reads waits in that
        # peer's own socket (its DEALER's HWM, then the kernel), not in the broker's memory. A flood of
        # 200,000 garbage messages took the broker's RSS +264 MB at 100,000; +63 MB at 1,000.
        sock.rcvhwm = self.cfg.rcvhwm
        return sock

    def bind(self) -> None:
        """Bind both endpoints, then tell systemd READY=1; one that cannot be bound is a ConfigError
        naming its key (AddressInUse when another process holds it: retryable), and so is one other
        hosts could reach in plaintext (unless ``security.insecure`` says so)."""
        exposed = security.insecure_binds(self.sec, {"frontend": self.cfg.frontend, "backend": self.cfg.backend})
        if exposed:
            raise ConfigError(f"{', '.join(exposed)}: binds a non-loopback TCP address with security.curve off: "
                              f"{security.INSECURE_HINT}")
        for sock, key, endpoint in ((self.frontend, "frontend", self.cfg.frontend),
                                    (self.backend, "backend", self.cfg.backend)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                kind = AddressInUse if exc.errno == errno.EADDRINUSE else ConfigError
                raise kind(f"broker.{key}: cannot bind {endpoint}: {exc} (another broker running?)") from exc
        if self.cfg.metrics:
            self.metrics = BrokerMetrics(self.cfg.metrics)
            self.metrics.refresh(self)
        log.info("broker %s: masters on %s, workers on %s", self.state.broker_id.hex(),
                 self.cfg.frontend, self.cfg.backend)
        self.notify.ready(f"masters on {self.cfg.frontend}, workers on {self.cfg.backend}")

    def close(self) -> None:
        self.notify.close()
        if self.metrics is not None:
            self.metrics.close()
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        if self.guard is not None:
            self.guard.close()
        if self._own_ctx:
            self.ctx.term()

    # ---- loop -----------------------------------------------------------------------------------
    def run(self, stop: StopSignal) -> None:
        """Serve until ``stop.requested``. One poll loop: read, dispatch, housekeeping."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(stop.fd, zmq.POLLIN)
        if self.guard is not None:
            poller.register(self.guard.zap, zmq.POLLIN)
        interval = self.cfg.heartbeat_interval
        tick = interval / EXPIRY_TICKS  # expiry checks run finer than heartbeats: faster requeue
        next_beat = next_tick = time.monotonic() + tick
        while not stop.requested:
            timeout = max(0.0, min(next_tick, self.notify.due) - time.monotonic())
            events = dict(poller.poll(int(timeout * 1000)))
            if stop.fd in events:
                stop.clear()
            if self.guard is not None:
                self._guard_events(stop, events)
            if self.frontend in events:
                self._drain(self.frontend, self._on_master)
            if self.backend in events:
                self._drain(self.backend, self._on_worker)
            now = time.monotonic()
            try:
                if now >= next_tick:
                    self._expire(now)
                    next_tick = now + tick
                if now >= next_beat:
                    self._heartbeat(now)
                    next_beat = now + interval
                if self.state.has_work:
                    self._flush(now)
            except Exception:  # a bug must not stop the broker; the next pass retries
                log.exception("error in dispatch or housekeeping")
            self.notify.tick(now, self._status_line)
        self.notify.stopping()
        c = self.state.counters
        log.info("broker stopping: %d completed, %d failed, %d requeued, %d queued, %d in flight",
                 c["completed"], c["failed"], c["requeued"],
                 sum(len(q) for q in self.state.queues.values()),
                 sum(len(w.inflight) for w in self.state.lanes.values()))

    def _status_line(self, now: float) -> str:
        """systemd's STATUS= (``systemctl status``): peers, queue and throughput at a glance."""
        return status.line(self.state, self._rate.update(self.state.counters["completed"], now))

    def _guard_events(self, stop: StopSignal, events: dict[Any, int]) -> None:
        """CurveZMQ: answer waiting ZAP requests; on SIGHUP reload the allow-lists and forget the
        peers of removed keys."""
        assert self.guard is not None
        try:
            if stop.reload_requested:
                stop.reload_requested = False
                self._revoke(self.guard.reload(), time.monotonic())
            if self.guard.zap in events:
                self.guard.on_zap()
        except Exception:  # a bug must not stop the broker
            log.exception("error in the ZAP handler or an allow-list reload")

    def _drain(self, sock: zmq.Socket[Any], handler: Any) -> None:
        for _ in range(P.READ_BATCH):
            if not readable(sock):
                return
            try:
                front = sock is self.frontend
                cap, head = P.read_cap(self.cfg.max_frames), 6 if front else 4
                header = P.MASTER if front else (P.WORKER, *P.OLD_WORKERS)
                if self.guard is None:
                    frames = recv_bounded(sock, cap, head, header)
                else:
                    frames, self.peer_key = recv_keyed(sock, cap, head, header)
                    if not self.guard.admits(frames[0], self.peer_key, front):
                        continue
            except zmq.Again:
                return
            except TooManyFrames as exc:
                self._malformed_msg(exc)
                if sock is self.frontend:
                    self._refuse_oversized(exc.head, str(exc))
                continue
            except ProtocolError as exc:
                self._malformed_msg(exc)
                continue
            try:
                handler(frames)
            except ProtocolError as exc:
                self._malformed_msg(exc)
            except Exception:  # a bug must not kill the broker; say where
                log.exception("error while handling a message")

    def _malformed_msg(self, exc: Exception) -> None:
        self._malformed.warning("dropped malformed message: %s", exc)

    # ---- masters --------------------------------------------------------------------------------
    def _on_master(self, frames: list[Any]) -> None:
        if len(frames) < 3:
            raise ProtocolError(f"master message has {len(frames)} frames")
        ident, msg = frames[0], frames[1:]
        command = P.check_header(msg, P.MASTER, 2)
        now = time.monotonic()
        if not self._may(ident, command, msg):
            return
        ident = self.state.master_seen(ident, now)  # the one copy of this id that tasks keep
        if command == P.SUBMIT:
            self._on_submit(ident, msg, now)
        elif command == P.PING:
            interval_ms = int(self.cfg.heartbeat_interval * 1000).to_bytes(4, "big")
            pong = [P.MASTER, P.PONG, self.state.session(ident), interval_ms]
            self._to_master(ident, pong)
        elif command == P.CANCEL:
            self.state.cancel(ident, P.parse_task_ref(msg, P.MASTER))
        elif command == P.STATUS:
            self._on_status(ident, msg, now)
        elif command == P.BYE:
            dropped = self.state.master_gone(ident)
            self._send(self.runs.master_gone(ident))
            log.log(logging.INFO if dropped else logging.DEBUG, "master %s left; %d queued tasks dropped",
                    tag(ident), dropped)
        elif command in (P.IT_PLACE, P.IT_ROUND, P.IT_END):
            self._on_iteration(ident, command, msg)
        elif command == P.ACK:
            self._on_ack(ident, msg)
        elif command == P.DATA:
            request, digest, meta, data = P.parse_data(msg)
            worker = self.state.fetched(request, digest, len(data), ident)
            if worker is not None:  # forwarded untouched: the worker checks the digest
                self._to_worker(worker, [P.WORKER, P.W_DATA, digest, meta, data])
        else:
            raise ProtocolError(f"unknown master command {command!r}")

    def _on_iteration(self, ident: bytes, command: bytes, msg: list[Any]) -> None:
        """IT_PLACE, IT_ROUND, IT_END (PROTOCOL.md §5.7): the master decides, the broker routes. One
        that cannot be used fails its run with BAD_REQUEST (the master would otherwise wait)."""
        run, ctl, payload = R.parse(msg, P.MASTER)
        try:
            if command == P.IT_PLACE:
                self._send(self.runs.place(ident, run, ctl, payload, time.monotonic()))
            elif command == P.IT_ROUND:
                self._send(self.runs.round(ident, run, ctl))
            else:
                self._send(self.runs.end(ident, run, ctl))
        except ProtocolError as exc:
            body = {"epoch": ctl.get("epoch"), "code": P.BAD_REQUEST, "message": f"{_name(command)}: {exc}"}
            self._to_master(ident, R.frames(P.MASTER, P.IT_FAIL, run, body))
            raise

    def _on_submit(self, ident: bytes, msg: list[Any], now: float) -> None:
        try:
            sub = P.parse_submit(msg, self.cfg.max_frames)
        except P.BadSubmit as exc:
            self.state.reject()
            self._error(ident, exc.tid, P.BAD_REQUEST, {"message": str(exc)})
            return
        service = sys.intern(sub.service)  # one str per service name, not one per task
        # Small frames are copied out: a kept zmq.Frame pins the ~8 KiB receive buffer libzmq carved it
        # from (up to 7.5 KiB per queued task when SUBMITs trickle in). Large ones stay zero-copy.
        payload = [f if len(f) >= ZERO_COPY_MIN else f.bytes for f in sub.payload]
        tid = sub.tid
        stages = tuple(sys.intern(name) for name in sub.stages)
        code = self.state.submit(ident, tid, service, payload, now, sub.timeout_ms, sub.max_attempts, sub.flags,
                                 stages, account=self.peer_key or ident)
        if code == P.QUEUE_FULL:
            self._error(ident, tid, code, {"message": self.state.refused})

    def _on_ack(self, ident: bytes, msg: list[Any]) -> None:
        """The master consumed parts of a stream: tell its lane, by the broker's id for the task."""
        tid, seq = P.parse_ack(msg, P.MASTER)
        task = self.state.ack(ident, tid)
        if task is not None and task.worker is not None:
            self._to_worker(task.worker, [P.WORKER, P.W_ACK, task.tid, seq.to_bytes(4, "big")])

    def _on_status(self, ident: bytes, msg: list[Any], now: float) -> None:
        """The whole picture for an admin key (or anyone, with curve off); a master its own tasks."""
        request = P.parse_status(msg)
        full = self.guard is None or self.guard.is_admin(self.peer_key)
        if full:
            body = status.full(self.state, self.runs, now)
            if self.guard is not None:
                body["counters"].update(self.guard.counters)
        else:
            body = status.own(self.state, ident)
        body = msgpack.packb(body, use_bin_type=True)
        self._to_master(ident, [P.MASTER, P.STATUS_REPLY, body, request])

    def _may(self, ident: bytes, command: bytes, msg: list[Any]) -> bool:
        """With curve on, only a master key may do more than PING, STATUS and BYE: an admin-only key's
        SUBMIT is answered (the caller would wait), anything else dropped."""
        if self.guard is None or command in (P.PING, P.STATUS, P.BYE) or self.guard.may_submit(self.peer_key):
            return True
        self._malformed.warning("refused %r from key %s: not in security.masters", command, self.peer_key.decode())
        if command == P.SUBMIT and len(msg) > 2:
            tid = P.submit_id(msg)
            if tid:
                self._error(ident, tid, P.BAD_REQUEST, {"message": f"key {self.peer_key.decode()} may read STATUS "
                                                                  "but not submit (it is not in security.masters)"})
        return False

    def _refuse_oversized(self, head: list[Any], why: str) -> None:
        """A SUBMIT over the frame cap still names its task: answer BAD_REQUEST, not silence."""
        msg = head[1:]  # after the routing id
        if len(msg) < 2 or frame_bytes(msg[0]) != P.MASTER or frame_bytes(msg[1]) != P.SUBMIT:
            return
        tid = P.submit_id(msg)
        if tid:
            self.state.reject()
            self._error(frame_bytes(head[0]), tid, P.BAD_REQUEST, {"message": f"SUBMIT {why} (broker.max_frames)"})

    def _to_master(self, ident: bytes, frames: list[Any]) -> bool:
        try:
            send_frames(self.frontend, [ident, *frames], zmq.NOBLOCK)
            return True
        except zmq.Again:  # its pipe is full: only if master.window exceeds broker.hwm
            self._undeliverable.warning("master %s not reading: a reply was dropped", tag(ident))
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the master is gone; it resends if it returns
            log.debug("cannot reach master %s: %s", tag(ident), exc)
            return False

    def _error(self, ident: bytes, tid: bytes, code: str, details: dict[str, Any], task: Task | None = None) -> None:
        body = msgpack.packb(details, use_bin_type=True)
        self._to_master(ident, [P.MASTER, P.ERROR, tid, code.encode(), body, *self._stage(task)])

    @staticmethod
    def _stage(task: Task | None) -> list[bytes]:
        """ERROR's frame 5 for a pipeline: the stage that failed (PROTOCOL.md §5.5)."""
        return [task.stage.to_bytes(2, "big")] if task is not None and task.stages else []

    # ---- workers: daemons and lanes ------------------------------------------------------------------
    def _on_worker(self, frames: list[Any]) -> None:
        if len(frames) < 3:
            raise ProtocolError(f"worker message has {len(frames)} frames")
        rid, msg = frames[0], frames[1:]
        if frame_bytes(msg[0]) in P.OLD_WORKERS:  # no DISCONNECT: it would only register again, in a loop
            self._old.warning("refused a worker speaking %s (ndpipe before lanes, 0.1.x): upgrade it to %s",
                              frame_bytes(msg[0]).decode(), P.WORKER.decode())
            return
        command = P.check_header(msg, P.WORKER, 2)
        now = time.monotonic()
        if command == P.READY:
            self._on_ready(rid, msg, now)
            return
        if command == P.LANE:
            self._on_lane(rid, msg, now)
            return
        if command in (P.W_RESULT, P.W_ERROR):
            self._on_answer(rid, msg, now)
            return
        if command == P.W_FETCH:
            self._on_fetch(rid, msg, now)
            return
        if command in (P.W_STEPPED, P.W_STATE):
            self._on_stepped(rid, command, msg)
            return
        if command == P.W_PART:
            tid, seq, payload = P.parse_part(msg, P.WORKER)
            task = self.state.part(rid, tid, seq)
            if task is not None:
                self._to_master(task.master, [P.MASTER, P.PART, task.master_tid, seq.to_bytes(4, "big"), *payload])
            if not self.state.lane_seen(rid):  # a lane the broker forgot (cut off, expired): it starts over
                self._to_worker(rid, [P.WORKER, P.DISCONNECT])
            return
        known = self._on_daemon(rid, command, msg, now)
        if not known:  # it lost us or we lost it: tell it to register again
            self._to_worker(rid, [P.WORKER, P.DISCONNECT])

    def _on_stepped(self, rid: bytes, command: bytes, msg: list[Any]) -> None:
        """W_STEPPED or W_STATE from a lane (§5.7)."""
        if not self.state.lane_seen(rid):  # a lane the broker forgot (its worker expired): it starts over,
            self._to_worker(rid, [P.WORKER, P.DISCONNECT])  # and so drops the partitions it still holds
            return
        run = frame_bytes(msg[2]) if len(msg) > 2 else b""
        handle = self.runs.stepped if command == P.W_STEPPED else self.runs.state_of
        try:
            run, ctl, payload = R.parse(msg, P.WORKER)
            self._send(handle(rid, run, ctl, payload))
        except ProtocolError as exc:  # logged as malformed; the run, if the sender holds part of it, fails
            self._send(self.runs.malformed(rid, run, str(exc)))
            raise

    def _on_daemon(self, rid: bytes, command: bytes, msg: list[Any], now: float) -> bool:
        """HEARTBEAT, DRAIN, LANE_GONE, DISCONNECT: a daemon's own commands (a lane's DISCONNECT too).
        Returns whether the sender is a registered daemon (or a lane saying goodbye)."""
        frame = P.control_frame(msg, P.WORKER, optional=True) if command == P.HEARTBEAT else b""
        stats = frame if 0 < len(frame) <= P.CONTROL_MAX else None
        known = self.state.worker_seen(rid, now, stats)
        if command == P.DISCONNECT:
            if known:
                handed = self.state.worker_gone(rid, now, penalize=False)
                log.info("worker %s disconnected; %d tasks handed back", tag(rid), len(handed))
            elif rid in self.state.lanes:  # a lane leaving (its daemon drains): its prefetched tasks go back
                self.state.lane_gone(rid, now, penalize=False)
                self._send(self.runs.check(now))  # and the partitions it held are lost
            return True  # never answered: it is leaving
        if command == P.DRAIN and known:
            self.state.worker_drain(rid)
            log.info("worker %s draining", tag(rid))
        elif command == P.LANE_GONE:
            index, pid = P.parse_lane_gone(unpack_map(P.control_frame(msg, P.WORKER)))
            back = self.state.lane_ended(rid, index, pid, now) if known else None
            if back is not None:
                log.info("worker %s lane %d (pid %d) ended; %d tasks handed back", tag(rid), index, pid, len(back))
                self._send(self.runs.check(now))  # its iterations' partitions are lost: their masters roll back
        elif command not in (P.HEARTBEAT, P.DRAIN):
            raise ProtocolError(f"unknown worker command {command!r}")
        return known

    def _on_answer(self, rid: bytes, msg: list[Any], now: float) -> None:
        """W_RESULT or W_ERROR: taken only from the lane holding the task, or its daemon (§5 rule 4)."""
        tid, code, body = P.parse_answer(msg)
        known = self.state.lane_seen(rid) | self.state.worker_seen(rid, now)
        if code is None:
            held = self.state.tasks.get(tid)
            if held is not None and held.stages:  # the next stage's input: small frames copied, as at SUBMIT
                body = [f if len(f) >= ZERO_COPY_MIN else frame_bytes(f) for f in body]
            task = self.state.complete(rid, tid, body, now)
            if task is not None:
                self._to_master(task.master, [P.MASTER, P.RESULT, task.master_tid, *body])
        else:
            why, pid = "", None
            if code == P.CRASHED:  # say in a final MAX_ATTEMPTS why the last attempt died (e.g. out of memory)
                try:
                    details = unpack_map(frame_bytes(body[0]))
                    why = str(details.get("message", ""))[:500]
                    pid = details.get("pid") if isinstance(details.get("pid"), int) else None
                except ProtocolError:
                    pass
            task = self.state.fail(rid, tid, code, now, why, pid)
            if task is not None:
                self._to_master(task.master, [P.MASTER, P.ERROR, task.master_tid, code.encode(), body[0],
                                              *self._stage(task)])
        if not known:
            self._to_worker(rid, [P.WORKER, P.DISCONNECT])

    def _on_ready(self, rid: bytes, msg: list[Any], now: float) -> None:
        ready = P.parse_ready(unpack_map(P.control_frame(msg, P.WORKER)))
        if self.guard is not None:
            refused = self.guard.ready_refusal(self.state, rid, self.peer_key, ready, self.cfg.max_slots_per_key)
            if refused:  # unanswered: the daemon tries again after its liveness
                self.guard.counters["messages_refused"] += 1
                self._malformed.warning("refused READY from key %s: %s", self.peer_key.decode(), refused)
                return
        host = self.state.worker_ready(rid, ready.services, ready.credit, now, ready.info, ready.lanes, ready.name)
        params = {"heartbeat_interval": self.cfg.heartbeat_interval, "liveness": self.cfg.liveness,
                  "broker_id": self.state.broker_id.hex(), "key": host.key, "id": host.name}
        self._to_worker(rid, [P.WORKER, P.WELCOME, msgpack.packb(params, use_bin_type=True)])
        instance = f" instance {ready.info['instance']}" if ready.info.get("instance") else ""  # ndpipe-worker@N
        log.info("worker %s ready: %s, %d lanes × %d credit, host %s pid %s%s", ready.name, ",".join(ready.services),
                 ready.lanes, ready.credit, ready.info.get("host"), ready.info.get("pid"), instance)

    def _revoke(self, peers: list[tuple[bool, bytes]], now: float) -> None:
        """Forget at once the peers whose key a reload removed: a worker's tasks go back to the queue
        (no attempt counted), a master's queued tasks are dropped."""
        for front, rid in peers:
            if front:
                self.state.master_gone(rid)
                self._send(self.runs.master_gone(rid))
            elif rid in self.state.hosts:
                self.state.worker_gone(rid, now, penalize=False)
            elif rid in self.state.lanes:
                self.state.lane_gone(rid, now, penalize=False)
        self._send(self.runs.check(now))

    def _on_lane(self, rid: bytes, msg: list[Any], now: float) -> None:
        info = P.parse_lane(unpack_map(P.control_frame(msg, P.WORKER)))
        lane = self.state.lane_ready(rid, info.key, info.index, now, info.pid, info.broken)
        if lane is None:  # a key no live worker holds (it was forgotten, or never was): the lane starts over
            self._malformed.warning("lane %d (pid %d) presented a key no registered worker has: told DISCONNECT",
                                    info.index, info.pid)
            self._to_worker(rid, [P.WORKER, P.DISCONNECT])
        elif lane.broken:
            log.warning("lane %s (pid %d) joined without %s: constructor failed there", lane.address, info.pid,
                        ", ".join(sorted(lane.broken)))
        else:
            log.debug("lane %s joined (pid %d)", lane.address, info.pid)
        self._send(self.runs.check(now))  # partitions waiting for a lane; or on the lane this one replaced

    def _on_fetch(self, rid: bytes, msg: list[Any], now: float) -> None:
        """A worker needs an array ref's bytes: ask the task's master, or answer at once why not."""
        tid, digest = P.parse_w_fetch(msg)
        self.state.worker_seen(rid, now)
        found = self.state.fetch(rid, tid, digest, now)
        if isinstance(found, str):
            self._to_worker(rid, [P.WORKER, P.W_DATA, digest, b"", found.encode()])
            return
        master, request = found
        if not self._to_master(master, [P.MASTER, P.FETCH, request, digest]):
            self.state.fetched(request, digest, 0)
            self._to_worker(rid, [P.WORKER, P.W_DATA, digest, b"", b"the task's master cannot be reached"])

    def _send(self, sends: list[Send]) -> None:
        for to_worker, ident, frames in sends:
            if to_worker:
                self._to_worker(ident, frames)
            else:
                self._to_master(ident, frames)

    def _to_worker(self, wid: bytes, frames: list[Any]) -> bool:
        try:
            send_frames(self.backend, [wid, *frames], zmq.NOBLOCK)
            return True
        except (zmq.Again, zmq.ZMQError) as exc:
            log.debug("cannot reach worker %s: %s", tag(wid), exc)
            return False

    # ---- dispatch and time ----------------------------------------------------------------------
    def _flush(self, now: float) -> None:
        for task, rec in self.state.dispatch(now):
            frames = P.task_frames(task.tid, task.service.encode(), task.attempt, self._remaining_ms(task, now),
                                   task.flags, task.payload)
            try:
                send_frames(self.backend, [rec.wid, *frames], zmq.NOBLOCK)
            except zmq.Again:  # its link is full: hand back this task, keep the lane
                self.state.stall(task)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: its connection is gone; requeue what it held
                log.warning("lane %s unreachable (%s): its tasks requeued", rec.address, exc)
                self.state.lane_gone(rec.wid, now, penalize=False)
        for failure in self.state.take_failures():
            self._error(failure.task.master, failure.task.master_tid, failure.code, failure.details, failure.task)
        for lane, tid in self.state.take_stops():  # a stream its master closed: the lane stops the generator
            self._to_worker(lane.wid, [P.WORKER, P.W_CANCEL, tid])
        for lane, tid in self.state.take_cancels():  # queued in the lane: it drops it; running: its daemon kills it
            self._to_worker(lane.wid, [P.WORKER, P.W_CANCEL, tid])
            if lane.host.hid != lane.wid:
                self._to_worker(lane.host.hid, [P.WORKER, P.W_CANCEL, tid])

    @staticmethod
    def _remaining_ms(task: Task, now: float) -> int:
        if task.deadline is None:
            return 0
        return max(1, int((task.deadline - now) * 1000))

    def _expire(self, now: float) -> None:
        dead, gone = self.state.expire(now)
        for wid in dead:
            log.warning("worker %s silent for over %.1f s: declared dead, its tasks requeued", tag(wid),
                        self.state.expiry)
        for master in gone:
            log.info("master %s silent: forgotten, its queued tasks dropped", tag(master))
            self._send(self.runs.master_gone(master))
        self._send(self.runs.check(now))  # iterations with a partition on a lane that is gone, or waiting for one

    def _heartbeat(self, now: float) -> None:
        self.state.prune()
        if self.guard is not None:
            self.guard.forget(set(self.state.masters), {*self.state.lanes, *self.state.hosts})
        trim_heap()
        if self.metrics is not None:
            self.metrics.refresh(self)
        for wid in list(self.state.hosts):
            try:
                send_frames(self.backend, [wid, P.WORKER, P.HEARTBEAT], zmq.NOBLOCK)
            except zmq.Again:
                pass  # its link is full of work: that tells it we are alive
            except zmq.ZMQError as exc:  # EHOSTUNREACH: its connection is gone (process died, link cut)
                # Counted like the liveness expiry it replaces: a result over max_frame_bytes cuts the
                # link too, and that task must reach MAX_ATTEMPTS instead of cutting every worker in turn.
                handed = self.state.worker_gone(wid, now, penalize=True)
                log.warning("worker %s unreachable (%s): declared dead, %d tasks requeued", tag(wid), exc,
                            len(handed))


def serve(config: BrokerConfig, stop: StopSignal | None = None, sec: SecurityConfig | None = None,
          notify: Notifier | None = None) -> None:
    """Entry point used by the CLI and the demo: bind, serve until signalled, close. SIGHUP reloads the
    allow-lists. ``notify``: systemd's notifier (the CLI passes the one $NOTIFY_SOCKET asks for)."""
    limit_malloc_arenas()  # before the zmq context starts its I/O thread
    broker = Broker(config, sec=sec, notify=notify)
    with stop or StopSignal(reload=(signal.SIGHUP,)) as sig:
        try:
            broker.bind()
            broker.run(sig)
        finally:
            broker.close()



def _name(command: bytes) -> str:
    """IT_PLACE, IT_ROUND or IT_END, for an error message."""
    return {P.IT_PLACE: "IT_PLACE", P.IT_ROUND: "IT_ROUND", P.IT_END: "IT_END"}.get(command, repr(command))
