"""The broker process: one poll loop around :class:`~ndpipe.broker.state.BrokerState`.

Frontend ROUTER (masters) and backend ROUTER (workers). Only header frames are read; payload
frames are stored as ``zmq.Frame`` objects and forwarded untouched. A malformed message is logged
(rate-limited) and dropped; if it carried a usable task id the master gets a BAD_REQUEST error so
it does not wait for nothing. Nothing a peer sends can stop the loop.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgpack
import zmq

from ndpipe import protocol as P
from ndpipe.broker.state import BrokerState, Task
from ndpipe.config import BrokerConfig
from ndpipe.errors import ConfigError, ProtocolError
from ndpipe.runtime import StopSignal, limit_malloc_arenas, trim_heap
from ndpipe.transport import (
    ZERO_COPY_MIN,
    Throttle,
    TooManyFrames,
    configure,
    frame_bytes,
    readable,
    recv_bounded,
    send_frames,
    unpack_map,
)

log = logging.getLogger("ndpipe.broker")

EXPIRY_TICKS = 4  # expiry checks per heartbeat interval


class Broker:
    """Bind both sockets, then :meth:`run` until :meth:`stop` (or a signal) asks it to end."""

    def __init__(self, config: BrokerConfig | None = None, context: zmq.Context[Any] | None = None) -> None:
        self.cfg = config or BrokerConfig()
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.state = BrokerState(
            self.cfg.heartbeat_interval, self.cfg.liveness, self.cfg.max_attempts, self.cfg.max_queued,
            self.cfg.max_services,
        )
        self.frontend = self._router()
        self.backend = self._router()
        self._malformed = Throttle(log)
        self._undeliverable = Throttle(log)

    def _router(self) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.ROUTER)
        configure(sock, self.cfg.hwm, self.cfg.max_frame_bytes, router=True)
        # Read ahead little per peer: what a peer sends faster than the broker reads waits in that
        # peer's own socket (its DEALER's HWM, then the kernel), not in the broker's memory. A flood of
        # 200,000 garbage messages took the broker's RSS +264 MB at 100,000; +63 MB at 1,000.
        sock.rcvhwm = self.cfg.rcvhwm
        return sock

    def bind(self) -> None:
        """Bind both endpoints; one that cannot be bound is a ConfigError naming its key."""
        for sock, key, endpoint in ((self.frontend, "frontend", self.cfg.frontend),
                                    (self.backend, "backend", self.cfg.backend)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise ConfigError(f"broker.{key}: cannot bind {endpoint}: {exc} (another broker running?)") from exc
        log.info("broker %s: masters on %s, workers on %s", self.state.broker_id.hex(),
                 self.cfg.frontend, self.cfg.backend)

    def close(self) -> None:
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    # ---- loop -----------------------------------------------------------------------------------
    def run(self, stop: StopSignal) -> None:
        """Serve until ``stop.requested``. One poll loop: read, dispatch, housekeeping."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(stop.fd, zmq.POLLIN)
        interval = self.cfg.heartbeat_interval
        tick = interval / EXPIRY_TICKS  # expiry checks run finer than heartbeats: faster requeue
        next_beat = next_tick = time.monotonic() + tick
        while not stop.requested:
            timeout = max(0.0, next_tick - time.monotonic())
            events = dict(poller.poll(int(timeout * 1000)))
            if stop.fd in events:
                stop.clear()
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
        c = self.state.counters
        log.info("broker stopping: %d completed, %d failed, %d requeued, %d queued, %d in flight",
                 c["completed"], c["failed"], c["requeued"],
                 sum(len(q) for q in self.state.queues.values()),
                 sum(len(w.inflight) for w in self.state.workers.values()))

    def _drain(self, sock: zmq.Socket[Any], handler: Any) -> None:
        for _ in range(P.READ_BATCH):
            if not readable(sock):
                return
            try:
                front = sock is self.frontend
                frames = recv_bounded(sock, P.read_cap(self.cfg.max_frames), head=6 if front else 4,
                                      header=P.MASTER if front else P.WORKER)
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
        ident = self.state.master_seen(ident, now)  # the one copy of this id that tasks keep
        if command == P.SUBMIT:
            self._on_submit(ident, msg, now)
        elif command == P.PING:
            interval_ms = int(self.cfg.heartbeat_interval * 1000).to_bytes(4, "big")
            pong = [P.MASTER, P.PONG, self.state.session(ident), interval_ms]
            self._to_master(ident, pong)
        elif command == P.CANCEL:
            P.check_header(msg, P.MASTER, 3)
            self.state.cancel(ident, P.task_id_of(msg[2]))
        elif command == P.STATUS:
            request = frame_bytes(msg[2]) if len(msg) > 2 else b""
            if len(request) > P.REQUEST_ID_MAX:  # cut short, it would no longer match the master's request
                raise ProtocolError(f"STATUS request id of {len(request)} octets (at most {P.REQUEST_ID_MAX})")
            body = msgpack.packb(self._snapshot(now), use_bin_type=True)
            self._to_master(ident, [P.MASTER, P.STATUS_REPLY, body, request])
        elif command == P.BYE:
            dropped = self.state.master_gone(ident)
            log.info("master %s left; %d queued tasks dropped", ident.hex(), dropped)
        else:
            raise ProtocolError(f"unknown master command {command!r}")

    def _on_submit(self, ident: bytes, msg: list[Any], now: float) -> None:
        tid = P.task_id_of(msg[3]) if len(msg) > 3 else b""
        try:
            if len(msg) < 6:
                raise ProtocolError(f"SUBMIT needs at least 6 frames, got {len(msg)}")
            if len(msg) - 6 > self.cfg.max_frames:
                raise ProtocolError(f"SUBMIT has {len(msg) - 6} payload buffer frames (limit {self.cfg.max_frames})")
            service = sys.intern(P.service_of(msg[2]))  # one str per service name, not one per task
            timeout_ms, max_attempts, flags = P.parse_options(msg[4])
        except ProtocolError as exc:
            if not tid:
                raise
            self.state.counters["rejected"] += 1
            self._error(ident, tid, P.BAD_REQUEST, {"message": str(exc)})
            return
        # Small frames are copied out: a kept zmq.Frame pins the ~8 KiB receive buffer libzmq carved it
        # from (up to 7.5 KiB per queued task when SUBMITs trickle in). Large ones stay zero-copy.
        payload = [f if len(f) >= ZERO_COPY_MIN else f.bytes for f in msg[5:]]
        code = self.state.submit(ident, tid, service, payload, now, timeout_ms, max_attempts, flags)
        if code == P.QUEUE_FULL:
            if service in self.state.queues:
                why = f"service {service!r} has {self.cfg.max_queued} tasks queued (broker.max_queued)"
            else:
                why = (f"the broker already queues tasks for {self.cfg.max_services} services "
                       f"(broker.max_services); {service!r} is not one of them")
            details = {"message": why}
            self._error(ident, tid, code, details)

    def _snapshot(self, now: float) -> dict[str, Any]:
        """The state's snapshot with each worker's stats frame decoded (an undecodable one shows as {})."""
        snap = self.state.snapshot(now)
        for w in snap["workers"]:
            try:
                w["stats"] = unpack_map(w["stats"]) if w["stats"] else {}
            except ProtocolError:
                w["stats"] = {}
        return snap

    def _refuse_oversized(self, head: list[Any], why: str) -> None:
        """A SUBMIT over the frame cap still names its task: answer BAD_REQUEST, not silence."""
        if len(head) >= 5 and frame_bytes(head[1]) == P.MASTER and frame_bytes(head[2]) == P.SUBMIT:
            try:
                tid = P.task_id_of(head[4])
            except ProtocolError:
                return
            self.state.counters["rejected"] += 1
            self._error(frame_bytes(head[0]), tid, P.BAD_REQUEST, {"message": f"SUBMIT {why} (broker.max_frames)"})

    def _to_master(self, ident: bytes, frames: list[Any]) -> bool:
        try:
            send_frames(self.frontend, [ident, *frames], zmq.NOBLOCK)
            return True
        except zmq.Again:  # its pipe is full: only if master.window exceeds broker.hwm
            self._undeliverable.warning("master %s not reading: a reply was dropped", ident.hex())
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the master is gone; it resends if it returns
            log.debug("cannot reach master %s: %s", ident.hex(), exc)
            return False

    def _error(self, ident: bytes, tid: bytes, code: str, details: dict[str, Any]) -> None:
        body = msgpack.packb(details, use_bin_type=True)
        self._to_master(ident, [P.MASTER, P.ERROR, tid, code.encode(), body])

    # ---- workers --------------------------------------------------------------------------------
    def _on_worker(self, frames: list[Any]) -> None:
        if len(frames) < 3:
            raise ProtocolError(f"worker message has {len(frames)} frames")
        wid, msg = frames[0], frames[1:]
        command = P.check_header(msg, P.WORKER, 2)
        now = time.monotonic()
        if command == P.READY:
            self._on_ready(wid, msg, now)
            return
        stats = frame_bytes(msg[2]) if command == P.HEARTBEAT and len(msg) > 2 and len(msg[2]) <= 65536 else None
        known = self.state.worker_seen(wid, now, stats)
        if command == P.W_RESULT:
            self._on_worker_result(wid, msg)
        elif command == P.W_ERROR:
            self._on_worker_error(wid, msg, now)
        elif command == P.DISCONNECT:
            if known:
                handed = self.state.worker_gone(wid, now, penalize=False)
                log.info("worker %s disconnected; %d tasks handed back", wid.hex(), len(handed))
            return
        elif command == P.HEARTBEAT:
            pass
        elif command == P.DRAIN:
            if known:
                self.state.worker_drain(wid)
                log.info("worker %s draining", wid.hex())
        else:
            raise ProtocolError(f"unknown worker command {command!r}")
        if not known:  # it lost us or we lost it: tell it to register again
            self._to_worker(wid, [P.WORKER, P.DISCONNECT])

    def _on_worker_result(self, wid: bytes, msg: list[Any]) -> None:
        """Accepted even from a forgotten worker: the first answer wins."""
        P.check_header(msg, P.WORKER, 4)
        task = self.state.complete(wid, P.task_id_of(msg[2]))
        if task is not None:
            self._to_master(task.master, [P.MASTER, P.RESULT, task.tid, *msg[3:]])

    def _on_worker_error(self, wid: bytes, msg: list[Any], now: float) -> None:
        P.check_header(msg, P.WORKER, 5)
        tid, code = P.task_id_of(msg[2]), P.error_code_of(msg[3])
        why = ""
        if code == P.CRASHED:  # say in a final MAX_ATTEMPTS why the last attempt died (e.g. out of memory)
            try:
                why = str(unpack_map(frame_bytes(msg[4])).get("message", ""))[:500]
            except ProtocolError:
                pass
        task = self.state.fail(wid, tid, code, now, why)
        if task is not None:
            self._to_master(task.master, [P.MASTER, P.ERROR, tid, code.encode(), msg[4]])

    def _on_ready(self, wid: bytes, msg: list[Any], now: float) -> None:
        P.check_header(msg, P.WORKER, 3)
        info = unpack_map(frame_bytes(msg[2]))
        services, slots = info.get("services"), info.get("slots")
        if (not isinstance(services, list) or not services or not all(isinstance(s, str) for s in services)
                or isinstance(slots, bool) or not isinstance(slots, int) or not 0 < slots <= P.MAX_SLOTS):
            raise ProtocolError(f"READY needs services (list of str) and slots (1..{P.MAX_SLOTS}), got {info!r:.200}")
        self.state.worker_ready(wid, services, slots, now, info)
        params = {"heartbeat_interval": self.cfg.heartbeat_interval, "liveness": self.cfg.liveness,
                  "broker_id": self.state.broker_id.hex()}
        self._to_worker(wid, [P.WORKER, P.WELCOME, msgpack.packb(params)])
        log.info("worker %s ready: %s, %d slots, host %s pid %s", wid.hex(), ",".join(services), slots,
                 info.get("host"), info.get("pid"))

    def _to_worker(self, wid: bytes, frames: list[Any]) -> bool:
        try:
            send_frames(self.backend, [wid, *frames], zmq.NOBLOCK)
            return True
        except (zmq.Again, zmq.ZMQError) as exc:
            log.debug("cannot reach worker %s: %s", wid.hex(), exc)
            return False

    # ---- dispatch and time ----------------------------------------------------------------------
    def _flush(self, now: float) -> None:
        for task, rec in self.state.dispatch(now):
            meta = P.META.pack(task.attempt, self._remaining_ms(task, now), task.flags)
            frames = [P.WORKER, P.TASK, task.tid, task.service.encode(), meta, *task.payload]
            try:
                send_frames(self.backend, [rec.wid, *frames], zmq.NOBLOCK)
            except zmq.Again:  # its link is full: hand back this task, keep the worker
                self.state.stall(task)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: it is gone; requeue what it held
                log.warning("worker %s unreachable (%s): its tasks requeued", rec.wid.hex(), exc)
                self.state.worker_gone(rec.wid, now, penalize=False)
        for failure in self.state.take_failures():
            self._error(failure.task.master, failure.task.tid, failure.code, failure.details)
        for wid, tid in self.state.take_cancels():
            self._to_worker(wid, [P.WORKER, P.W_CANCEL, tid])

    @staticmethod
    def _remaining_ms(task: Task, now: float) -> int:
        if task.deadline is None:
            return 0
        return max(1, int((task.deadline - now) * 1000))

    def _expire(self, now: float) -> None:
        dead, gone = self.state.expire(now)
        for wid in dead:
            log.warning("worker %s silent for over %.1f s: declared dead, its tasks requeued", wid.hex(),
                        self.state.expiry)
        for master in gone:
            log.info("master %s silent: forgotten, its queued tasks dropped", master.hex())

    def _heartbeat(self, now: float) -> None:
        self.state.prune()
        trim_heap()
        for wid in list(self.state.workers):
            try:
                send_frames(self.backend, [wid, P.WORKER, P.HEARTBEAT], zmq.NOBLOCK)
            except zmq.Again:
                pass  # its link is full of work: that tells it we are alive
            except zmq.ZMQError as exc:  # EHOSTUNREACH: its connection is gone (process died, link cut)
                # Counted like the liveness expiry it replaces: a result over max_frame_bytes cuts the
                # link too, and that task must reach MAX_ATTEMPTS instead of cutting every worker in turn.
                handed = self.state.worker_gone(wid, now, penalize=True)
                log.warning("worker %s unreachable (%s): declared dead, %d tasks requeued", wid.hex(), exc,
                            len(handed))


def serve(config: BrokerConfig, stop: StopSignal | None = None) -> None:
    """Entry point used by the CLI and the demo: bind, serve until signalled, close."""
    limit_malloc_arenas()  # before the zmq context starts its I/O thread
    broker = Broker(config)
    with stop or StopSignal() as sig:
        try:
            broker.bind()
            broker.run(sig)
        finally:
            broker.close()

