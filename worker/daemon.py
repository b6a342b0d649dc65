"""The worker daemon: the supervisor of a host's lanes. It never runs user code, and no task passes
through it.

It registers with the broker (READY: services, number of lanes, credit per lane; the broker answers
WELCOME with a key), tells each lane to join with that key, and from then on heartbeats for the
whole host: a lane never heartbeats, so a handler that holds the GIL for minutes never makes its lane
look dead, and a host cut off is declared dead after liveness × interval. One poll loop watches the
broker socket, each lane's pipe and sentinel (a lane's death is seen at once), and the stop signal.

A lane that dies is reported at once: the task it was running (read from its shared slot) as TIMEOUT
if its deadline timer ended it, else CRASHED (the broker retries it, counting an attempt), then
LANE_GONE (the broker hands back what the lane held), and a new lane is spawned in its place. The
daemon also enforces deadlines as a backstop (a handler that reset SIGALRM is killed anyway) and kills
the lane running a task the broker cancels. Lanes die with the daemon (PR_SET_PDEATHSIG).

Broker lost (silent for ``liveness`` intervals): a new socket, READY again with exponential back-off,
and the lanes join again with the new key. SIGTERM: DRAIN, the lanes finish what they hold for up
to ``drain_timeout`` seconds and leave, then DISCONNECT (the broker requeues what is left).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import msgpack
import zmq

from ndpipe import __version__, logsetup, security
from ndpipe import protocol as P
from ndpipe.config import SecurityConfig, WorkerConfig
from ndpipe.errors import NdpipeError, ProtocolError
from ndpipe.link import BrokerLink
from ndpipe.runtime import StopSignal
from ndpipe.sdnotify import Notifier, Rate
from ndpipe.transport import Throttle, configure, recv_bounded, send_frames, unpack_map, unresolved
from ndpipe.worker import compute
from ndpipe.worker.cache import Entry, Fetches, RefCache
from ndpipe.worker.lane import LINK_LOST, RUNNING, LaneArgs, LaneSlot, SlotView, read_slot
from ndpipe.worker.lane import main as lane_main
from ndpipe.worker.metrics import LaneTally, WorkerMetrics, death_cause
from ndpipe.worker.usage import Totals, Usage

log = logging.getLogger("ndpipe.worker")
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
MAX_QUICK_DEATHS = 5  # lanes dying before HELLO in a row: the handlers cannot even load
DEADLINE_GRACE = 1.0  # seconds past a deadline before the daemon's backstop kills a lane
INSTANCE_ENV = "NDPIPE_WORKER_INSTANCE"  # set by ndpipe-worker@.service to %i: shown in logs, STATUS and status


@dataclass(eq=False)
class LaneProc:
    """The daemon's view of one lane process."""

    index: int
    proc: BaseProcess
    conn: Connection  # the daemon's end of the lane's pipe
    slot: LaneSlot
    ready: bool = False  # said HELLO (its handlers loaded)
    killed: str = ""  # why the daemon killed it: "timeout", "cancel" (its task is already settled)
    mapped: set[bytes] = field(default_factory=set)  # arrays sent once it was given (told L_EVICT: only those)


class WorkerDaemon:
    """Run with :meth:`run`; ``stop.request()`` or SIGTERM ends it gracefully."""

    def __init__(self, config: WorkerConfig | None = None, context: zmq.Context[Any] | None = None,
                 sec: SecurityConfig | None = None, notify: Notifier | None = None) -> None:
        self.cfg = config or WorkerConfig()
        self.notify = notify or Notifier()  # systemd's READY (once registered), STATUS, WATCHDOG
        self.instance = os.environ.get(INSTANCE_ENV, "").strip()
        self.label = f"worker instance {self.instance}" if self.instance else "worker"
        self._rate = Rate()
        self.curve = security.client_curve(sec or SecurityConfig())  # the daemon's and its lanes' key pair
        self.services = {name: spec.handler for name, spec in self.cfg.services.items()}
        self.timeouts = {name: spec.timeout for name, spec in self.cfg.services.items()}
        self.inits = {name: spec.init for name, spec in self.cfg.services.items() if spec.init is not None}
        compute.add_app_dir(self.cfg.app_dir)  # before the handlers are checked (and lanes spawned)
        for name, spec in self.cfg.services.items():
            compute.check_service(name, spec.handler, spec.init)  # fail at start, naming it, not in every lane
        self.broken_logged: set[tuple[str, str]] = set()
        self.nlanes = self.cfg.effective_processes
        self.credit = self.cfg.lane_credit
        for var in BLAS_THREAD_VARS:  # lanes inherit: one compute process per core, no oversubscription
            os.environ.setdefault(var, "1")
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.lanes: dict[int, LaneProc] = {}
        self.sock: zmq.Socket[Any] | None = None
        self.key: bytes | None = None  # from WELCOME: what the lanes present to join us
        self.link = BrokerLink(P.HEARTBEAT_INTERVAL, P.LIVENESS, time.monotonic(), self.cfg.reconnect_min,
                               self.cfg.reconnect_max)
        self.draining = False
        self.quick_deaths = 0
        self.totals = Totals()  # what lanes that ended had done (a respawned lane counts from 0)
        self.dns_note: str | None = None  # why the broker's host does not resolve; None: not asked this silence
        self.poller = zmq.Poller()
        self.usage = Usage()  # CPU and RSS of the daemon and each lane, for heartbeats and status
        self._malformed = Throttle(log)
        self._dropped = Throttle(log)
        self._mp = mp.get_context("spawn")
        self.cache = RefCache(self.cfg.cache_bytes)  # arrays sent once (Master.put), for all lanes
        self.fetches = Fetches()
        self.tally = LaneTally()  # lane deaths, restarts, reports: for worker.metrics
        self.metrics: WorkerMetrics | None = None  # the Prometheus listener, once :meth:`listen` bound it

    # ---- lanes ----------------------------------------------------------------------------------
    def _spawn(self, index: int) -> None:
        mine, theirs = self._mp.Pipe(duplex=True)
        slot = self._mp.RawValue(LaneSlot)
        args = LaneArgs(index, self.cfg.broker, self.services, self.timeouts, os.getpid(), self.cfg.max_frames,
                        self.cfg.max_frame_bytes, self.cfg.lane_memory_limit, self.inits, self.curve,
                        logsetup.active())
        proc = self._mp.Process(target=lane_main, name=f"ndpipe-lane-{index}", args=(args, theirs, slot))
        proc.start()
        theirs.close()
        self.lanes[index] = LaneProc(index, proc, mine, slot)
        self.poller.register(proc.sentinel, zmq.POLLIN)
        self.poller.register(mine.fileno(), zmq.POLLIN)

    def _join(self, lane: LaneProc) -> None:
        """Tell a lane to join the broker under our current registration."""
        if self.key is None or not lane.ready or self.draining:
            return
        params = {"key": self.key, "heartbeat_interval": self.link.interval, "liveness": self.link.liveness}
        try:
            lane.conn.send_bytes(P.L_JOIN + msgpack.packb(params, use_bin_type=True))
        except OSError:
            pass  # it is dying: its sentinel says so next

    def _on_pipe(self, lane: LaneProc) -> None:
        try:
            while lane.conn.poll(0):
                msg = lane.conn.recv_bytes()
                if msg[:1] == P.L_HELLO:
                    try:
                        hello = unpack_map(msg[1:])
                    except ProtocolError:
                        hello = {}
                    if hello.get("pid") == lane.proc.pid:
                        lane.ready = True
                        self._log_broken(lane, hello.get("broken") or {})
                        self._join(lane)
                elif msg[:1] == P.L_FETCH:
                    self._on_fetch(lane, unpack_map(msg[1:]))
        except (EOFError, OSError):
            self.poller.unregister(lane.conn.fileno())  # it ended: its sentinel follows

    # ---- arrays sent once ---------------------------------------------------------------------------
    def _on_fetch(self, lane: LaneProc, ask: dict[str, Any]) -> None:
        """A lane needs an array ref's bytes: from the host cache, or fetched once for all who ask."""
        digest, tid = ask.get("digest"), ask.get("tid")
        if not isinstance(digest, bytes) or not isinstance(tid, bytes):
            return
        entry = self.cache.get(digest)
        if entry is not None:
            self._give(lane, digest, entry)
        elif self.fetches.want(digest, tid, lane, time.monotonic()):
            self._send_broker([P.WORKER, P.W_FETCH, tid, digest])

    def _on_data(self, frames: list[Any]) -> None:
        digest, meta, data = P.parse_w_data(frames)
        waiters: list[LaneProc] = [w for w in self.fetches.done(digest) if self._current(w)]
        if not waiters:
            return
        buf = data.buffer if isinstance(data, zmq.Frame) else data
        try:
            admitted = self.cache.admit(digest, meta, buf) if meta else bytes(buf).decode("utf-8", "replace")
        except OSError as exc:  # no memory for the memfd: the waiters hear it now, not after a timeout
            admitted = f"this host cannot keep the array: {exc}"
        if isinstance(admitted, str):
            log.warning("array ref %s unavailable: %s", digest.hex(), admitted)
            for lane in waiters:
                self._deny(lane, digest, admitted)
            return
        entry, evicted = admitted
        for old in evicted:  # only lanes that map it: a busy lane's pipe must not fill with news of others
            for each in self.lanes.values():
                if old in each.mapped:
                    each.mapped.discard(old)
                    self._tell(each, P.L_EVICT + old)
        for lane in waiters:
            self._give(lane, digest, entry)

    def _current(self, lane: LaneProc) -> bool:
        """Still the lane at its index (a waiter that died and was replaced is not)."""
        return self.lanes.get(lane.index) is lane

    def _give(self, lane: LaneProc, digest: bytes, entry: Entry) -> None:
        lane.mapped.add(digest)
        if self._tell(lane, P.L_DATA + msgpack.packb({"digest": digest, "meta": entry.meta, "size": entry.size})):
            try:
                reduction.send_handle(lane.conn, entry.fd, lane.proc.pid or 0)
            except OSError:
                pass  # it is dying: its sentinel says so next

    def _deny(self, lane: LaneProc, digest: bytes, why: str) -> None:
        self._tell(lane, P.L_NODATA + msgpack.packb({"digest": digest, "why": why}))

    def _tell(self, lane: LaneProc, message: bytes) -> bool:
        try:
            lane.conn.send_bytes(message)
            return True
        except OSError:
            return False

    def _expire_fetches(self, now: float) -> None:
        for digest, waiting in self.fetches.expired(now):
            why = f"no answer from the task's master within {self.fetches.timeout:g} s"
            for w in waiting:
                if self._current(w):
                    self._deny(w, digest, why)

    def _log_broken(self, lane: LaneProc, broken: dict[str, Any]) -> None:
        """A resident service whose constructor failed in a lane: the lane stays up without it (the
        broker routes it none of those tasks and fails them with UNAVAILABLE when no lane can serve
        them). Logged once per service and exception type, not once per lane or respawn."""
        for name, details in broken.items():
            if (name, str(details.get("type"))) not in self.broken_logged:  # messages may name a pid: not them
                self.broken_logged.add((name, str(details.get("type"))))
                log.error("service %r is unavailable in lane %d: its constructor failed: %s: %s\n%s", name,
                          lane.index, details.get("type"), details.get("message"), details.get("traceback", ""))

    def _on_lane_death(self, lane: LaneProc) -> None:
        self.poller.unregister(lane.proc.sentinel)
        try:
            self.poller.unregister(lane.conn.fileno())
        except KeyError:
            pass
        lane.proc.join(0.1)
        code, pid = lane.proc.exitcode, lane.proc.pid or 0
        view = read_slot(lane.slot)
        lane.conn.close()
        self.totals.done += view.done
        self.totals.failed += view.failed
        service = self._service_name(view.service)
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if code == P.EXIT_OUT_OF_MEMORY:
            why = f"out of memory: the handler exceeded worker.memory_limit = {self.cfg.lane_memory_limit} bytes"
        elif code == -signal.SIGKILL:
            why = "signal 9: killed (kill -9, or the kernel's OOM killer)"
        elif code == -signal.SIGALRM:
            lane.killed = lane.killed or "timeout"
        if view.state == RUNNING and lane.killed != "cancel":
            if lane.killed == "timeout":
                self.totals.timed_out += 1
                log.warning("lane %d (pid %s) ended by timeout: task %s (service %s) ran past its %.3g s; "
                            "reported TIMEOUT, lane replaced", lane.index, pid, view.tid.hex(), service, view.timeout)
                self._report(view.tid, P.TIMEOUT, "TimeoutError", f"ran longer than its timeout of {view.timeout:g} s; "
                             "its compute process was stopped and replaced", pid=pid, exitcode=code)
            else:
                self.totals.crashed += 1
                log.warning("lane %d (pid %s) died (%s) running task %s (service %s): reported CRASHED, the "
                            "broker retries it", lane.index, pid, why, view.tid.hex(), service)
                self._report(view.tid, P.CRASHED, "ProcessDied", f"compute process died ({why}) while running "
                             "the task", pid=pid, exitcode=code)
        elif view.state == LINK_LOST and view.done and view.tid:
            # Its link broke right after it answered: if that answer never arrived (a frame libzmq
            # refused cuts the link), this counts an attempt, so such a task ends in MAX_ATTEMPTS.
            self._report(view.tid, P.CRASHED, "LinkLost", "the lane's connection broke just after it sent this "
                         "task's answer (a result frame over the broker's max_frame_bytes?)", pid=pid, exitcode=code)
        else:
            log.info("lane %d (pid %s) ended (%s)", lane.index, pid, why)
        self.tally.ended(death_cause(code, lane.killed), respawn=not self.draining)
        self._send_broker([P.WORKER, P.LANE_GONE, msgpack.packb({"lane": lane.index, "pid": pid})])
        self.quick_deaths = 0 if lane.ready else self.quick_deaths + 1
        if self.quick_deaths > MAX_QUICK_DEATHS:
            raise NdpipeError(f"compute processes die before starting ({why}); check the handlers")
        del self.lanes[lane.index]
        if not self.draining:
            self._spawn(lane.index)

    def _service_name(self, index: int) -> str:
        """The slot's service index as a name for a log line."""
        names = list(self.services)
        return repr(names[index]) if index < len(names) else "-"

    def _kill(self, lane: LaneProc, why: str) -> None:
        if lane.proc.is_alive():
            lane.killed = why
            lane.proc.kill()

    def _running(self) -> list[tuple[LaneProc, SlotView]]:
        views = ((lane, read_slot(lane.slot)) for lane in self.lanes.values())
        return [(lane, view) for lane, view in views if view.state == RUNNING]

    def _check_deadlines(self, now: float) -> None:
        """Backstop: a lane whose timer did not end it (a handler reset SIGALRM) is killed here."""
        for lane, view in self._running():
            if view.timeout and now > view.started + view.timeout + DEADLINE_GRACE and not lane.killed:
                self._kill(lane, "timeout")

    def _report(self, tid: bytes, code: str, kind: str, message: str, **extra: Any) -> None:
        """A W_ERROR the daemon originates for its lane (the lane could not say it)."""
        details = {"message": message, "type": kind, **extra}
        self.tally.report(code)
        self._send_broker([P.WORKER, P.W_ERROR, tid, code.encode(), msgpack.packb(details)])

    # ---- broker ---------------------------------------------------------------------------------
    def _connect(self, now: float) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
        sock = configure(self.ctx.socket(zmq.DEALER), hwm=P.HWM, max_frame_bytes=self.cfg.max_frame_bytes)
        security.client(sock, self.curve)
        if self.curve is not None:  # a random id, not libzmq's counter: no other key can guess and take it over
            sock.routing_id = b"D" + os.urandom(15)
        sock.connect(self.cfg.broker)
        self.sock, self.key = sock, None
        self.poller.register(sock, zmq.POLLIN)
        info = {"id": self.name, "services": sorted(self.services), "lanes": self.nlanes, "credit": self.credit,
                "host": socket.gethostname(), "pid": os.getpid(), "version": __version__,
                **({"instance": self.instance} if self.instance else {})}
        self._send_broker([P.WORKER, P.READY, msgpack.packb(info)])
        if self.draining:  # a re-registration while stopping must not attract new work
            self._send_broker([P.WORKER, P.DRAIN])
        self.link.reconnected(now)

    def _send_broker(self, frames: list[Any]) -> None:
        if self.sock is None:
            return
        try:
            send_frames(self.sock, frames, zmq.NOBLOCK)
        except zmq.Again:
            self._dropped.warning("broker link full: message to the broker dropped")

    def _on_broker(self, frames: list[Any], now: float) -> None:
        command = P.check_header(frames, P.WORKER, 2)
        self.link.heard(now)
        if command == P.HEARTBEAT:
            pass
        elif command == P.WELCOME:
            params = unpack_map(P.control_frame(frames, P.WORKER))
            key = params.get("key")
            if not isinstance(key, bytes) or len(key) != P.KEY_BYTES:
                raise ProtocolError(f"WELCOME without a key of {P.KEY_BYTES} octets")
            self.key = key
            self.dns_note = None
            self.link.adopt(float(params.get("heartbeat_interval", self.link.interval)),
                            int(params.get("liveness", self.link.liveness)), now)
            log.info("%s registered with broker %s at %s as %s: %d lanes (heartbeat %.2f s × %d)", self.label,
                     params.get("broker_id"), self.cfg.broker, self.name, self.nlanes, self.link.interval,
                     self.link.liveness)
            for lane in self.lanes.values():
                self._join(lane)
            self.notify.ready(self._status_line(now))
        elif command == P.DISCONNECT:
            log.warning("broker does not know this worker: registering again")
            self._connect(now)
        elif command == P.W_DATA:
            self._on_data(frames)
        elif command == P.W_CANCEL:
            tid = P.parse_task_ref(frames, P.WORKER)
            for lane, view in self._running():
                if view.tid == tid:
                    self._kill(lane, "cancel")
        else:
            raise ProtocolError(f"unexpected broker command {command!r} on a worker daemon's connection")

    def _heartbeat(self, now: float) -> None:
        if self.link.silent(now):
            if self.dns_note is None:  # once per silence: a lookup may block for the resolver's timeout
                self.dns_note = unresolved(self.cfg.broker)  # libzmq retries such a name without a word
            why = self.dns_note
            log.warning("broker silent for %.1f s: reconnecting (back-off %.1f s)%s", now - self.link.last_heard,
                        self.link.backoff, f"; {why}" if why else "")
            self._connect(now)
            return
        self._send_broker([P.WORKER, P.HEARTBEAT, msgpack.packb(self._stats())])
        self.link.beaten(now)

    def _stats(self) -> dict[str, Any]:
        lanes = [(lane.index, lane.proc.pid or 0, read_slot(lane.slot)) for lane in self.lanes.values()]
        return self.usage.stats(os.getpid(), self.nlanes, lanes)

    # ---- loop -----------------------------------------------------------------------------------
    def listen(self) -> None:
        """Bind ``worker.metrics`` if set (a ConfigError naming it if the port is taken): before any
        lane starts or READY is sent, so a daemon that registers can be scraped."""
        if self.cfg.metrics and self.metrics is None:
            self.metrics = WorkerMetrics(self.cfg.metrics)

    def run(self, stop: StopSignal) -> None:
        """Serve until stopped, then drain and hand back."""
        self.listen()
        self.poller.register(stop.fd, zmq.POLLIN)
        log.info("%s %s (ndpipe %s) starting: broker %s, %d lanes × %d credit, services %s%s", self.label,
                 self.name, __version__, self.cfg.broker, self.nlanes, self.credit, ", ".join(self.services),
                 ", CurveZMQ on" if self.curve else "")
        for index in range(self.nlanes):
            self._spawn(index)
        drain_until = float("inf")  # (registration waits until every lane said HELLO)
        while True:
            if stop.requested and not self.draining:
                self.draining = True
                drain_until = time.monotonic() + self.cfg.drain_timeout
                self._send_broker([P.WORKER, P.DRAIN])
                for lane in self.lanes.values():
                    try:
                        lane.conn.send_bytes(P.L_DRAIN)
                    except OSError:
                        pass
                log.info("%s stopping: %d lanes finish what they hold (up to %.0f s)", self.label, len(self.lanes),
                         self.cfg.drain_timeout)
                self.notify.stopping(self._status_line(time.monotonic()))
            now = time.monotonic()
            if self.draining and (not self.lanes or now >= drain_until):
                break
            next_beat = self.link.next_beat if self.sock is not None else float("inf")
            wake = min(next_beat, drain_until, now + 1.0, self.fetches.next_expiry())
            events = dict(self.poller.poll(int(max(0.0, wake - now) * 1000)))
            now = time.monotonic()
            if stop.fd in events:
                stop.clear()
            self._dispatch_events(events, now)
            if self.sock is None and all(lane.ready for lane in self.lanes.values()) and not self.draining:
                self._connect(now)
            self._check_deadlines(now)
            self._expire_fetches(now)
            if self.sock is not None and self.link.beat_due(now):
                self._heartbeat(now)
            self.notify.tick(now, self._status_line)
            if self.metrics is not None:
                self.metrics.refresh(self, now)
        self._send_broker([P.WORKER, P.DISCONNECT])
        t = self.totals.plus(read_slot(lane.slot) for lane in self.lanes.values())
        log.info("%s stopped: %d tasks done (%d of them failed), %d timed out, %d crashed and were requeued; "
                 "%d lanes still busy handed their tasks back", self.label, t.done, t.failed, t.timed_out, t.crashed,
                 len(self.lanes))

    def _status_line(self, now: float) -> str:
        """systemd's STATUS= (``systemctl status ndpipe-worker@N``): lanes, work and the broker link."""
        views = [read_slot(lane.slot) for lane in self.lanes.values()]
        done = self.totals.plus(views).done
        if self.draining:
            link = "draining"
        elif self.key is not None:
            link = f"registered with {self.cfg.broker}"
        elif self.sock is not None:
            link = f"waiting for broker {self.cfg.broker}"
        else:
            link = "lanes starting"
        alive = sum(1 for lane in self.lanes.values() if lane.ready)
        running = sum(1 for view in views if view.state == RUNNING)
        return (f"{self.label}: {link}; lanes {alive}/{self.nlanes}, running {running}, done {done}, "
                f"{self._rate.update(done, now):.1f} tasks/s")

    def _dispatch_events(self, events: dict[Any, int], now: float) -> None:
        if self.sock is not None and self.sock in events:
            sock = self.sock
            for _ in range(P.READ_BATCH):
                try:
                    self._on_broker(recv_bounded(sock, P.ENVELOPE_FRAMES, head=P.ENVELOPE_FRAMES), now)
                except zmq.Again:
                    break
                except ProtocolError as exc:
                    self._malformed.warning("dropped malformed message: %s", exc)
                except Exception:  # a bug handling one message must not stop the worker
                    log.exception("error while handling a message")
                if sock.closed:  # DISCONNECT made us reconnect: the new socket is polled next pass
                    break
        for lane in list(self.lanes.values()):
            if lane.conn.fileno() in events:
                self._on_pipe(lane)
            if lane.proc.sentinel in events:
                self._on_lane_death(lane)

    def close(self) -> None:
        """Stop every lane (TERM, then KILL) and release the socket."""
        for lane in self.lanes.values():
            if lane.proc.is_alive():
                lane.proc.terminate()
        deadline = time.monotonic() + 2.0
        for lane in self.lanes.values():
            lane.proc.join(max(0.0, deadline - time.monotonic()))
            if lane.proc.is_alive():
                lane.proc.kill()
                lane.proc.join(1.0)
            lane.conn.close()
        if self.sock is not None:
            self.sock.close(linger=1000)  # let the last reports and DISCONNECT reach the broker
        self.cache.close()
        self.notify.close()
        if self.metrics is not None:
            self.metrics.close()
        if self._own_ctx:
            self.ctx.term()


def serve(config: WorkerConfig, stop: StopSignal | None = None, sec: SecurityConfig | None = None,
          notify: Notifier | None = None) -> None:
    """Entry point for the CLI and tests. Signals stay handled until the clean-up is done. ``notify``:
    systemd's notifier (the CLI passes the one $NOTIFY_SOCKET asks for)."""
    daemon = WorkerDaemon(config, sec=sec, notify=notify)
    with stop or StopSignal() as sig:
        try:
            daemon.run(sig)
        finally:
            daemon.close()
