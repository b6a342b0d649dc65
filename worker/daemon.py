"""The worker daemon: one DEALER to the broker, a pool of compute processes, one poll loop.

The daemon never runs handlers itself, so it keeps heartbeating however long a task computes. It
polls the broker socket, the ROUTER its compute processes connect to, every child's sentinel (a
child death is seen at once and reported as CRASHED, so the broker retries the task elsewhere
without waiting for a heartbeat to expire) and the stop signal's pipe.

The channel to the compute processes is private: an ipc socket in a fresh 0700 directory (under
``$RUNTIME_DIRECTORY`` when systemd gives one), so no other uid can connect, and no routing-id
handover — each spawn gets an identity of its own (slot index and a random token) and the daemon
talks only to the identities it spawned. (An abstract-namespace socket, listed in /proc/net/unix and
open to every local user, let a second uid that connected as ``c0`` take over a process's tasks.)

Broker lost (silent for ``liveness`` intervals): a new socket with a new identity, READY again,
with exponential back-off between attempts. A broker that does not know us (it restarted) answers
DISCONNECT and we re-register at once. SIGTERM: DRAIN, finish what is running for up to
``drain_timeout`` seconds, DISCONNECT (the broker requeues what is left), stop the children.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from multiprocessing.process import BaseProcess
from typing import Any

import msgpack
import psutil
import zmq

from ndpipe import __version__
from ndpipe import protocol as P
from ndpipe.codec import batch_length
from ndpipe.config import WorkerConfig
from ndpipe.errors import NdpipeError, ProtocolError
from ndpipe.runtime import StopSignal
from ndpipe.transport import Throttle, configure, frame_bytes, recv_bounded, send_frames, unpack_map
from ndpipe.worker import compute
from ndpipe.worker.pool import Job, Pool

log = logging.getLogger("ndpipe.worker")
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PIPELINE_MAX = 4  # jobs sent ahead to one compute process (the rest of the prefetch waits in the daemon)
MAX_QUICK_DEATHS = 5  # children dying before HELLO in a row: the handlers cannot even load


class WorkerDaemon:
    """Run with :meth:`run`; ``stop.request()`` or SIGTERM ends it gracefully."""

    def __init__(self, config: WorkerConfig | None = None, context: zmq.Context[Any] | None = None) -> None:
        self.cfg = config or WorkerConfig()
        self.services = {name: spec.handler for name, spec in self.cfg.services.items()}
        self.timeouts = {name: spec.timeout for name, spec in self.cfg.services.items()}
        for spec in self.services.values():
            compute.resolve(spec)  # fail at start, with the handler named, not in every child
        processes = self.cfg.effective_processes
        # Prefetched tasks are queued in the children's sockets (up to PIPELINE_MAX each) rather than
        # in the daemon, so a child never waits for a round trip through the daemon between tasks.
        self.pool = Pool(processes, depth=min(PIPELINE_MAX, 1 + -(-self.cfg.prefetch // processes)))
        for var in BLAS_THREAD_VARS:  # children inherit: one compute process per core, no oversubscription
            os.environ.setdefault(var, "1")
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.private_dir = private_dir()
        self.child_endpoint = f"ipc://{self.private_dir}/compute.sock"
        self.children = configure(self.ctx.socket(zmq.ROUTER), hwm=P.CHILD_HWM, router=True, handover=False)
        self.children.bind(self.child_endpoint)
        self.procs: dict[int, BaseProcess] = {}
        self.child_ids: dict[bytes, int] = {}  # routing id of each live spawn -> its slot
        self.ident_of: dict[int, bytes] = {}  # slot -> routing id of its live spawn
        self.retired: deque[bytes] = deque(maxlen=64)  # ids of dead spawns: their last frames are dropped quietly
        self.sock: zmq.Socket[Any] | None = None
        self.interval = P.HEARTBEAT_INTERVAL
        self.liveness = P.LIVENESS
        self.backoff = self.cfg.reconnect_min
        self.broker_deadline = 0.0
        self.next_beat = 0.0
        self.draining = False
        self.quick_deaths = 0
        self.poller = zmq.Poller()
        self._ps: dict[int, psutil.Process] = {}
        self._malformed = Throttle(log)
        self._dropped = Throttle(log)
        self._mp = mp.get_context("spawn")

    @property
    def slots(self) -> int:
        return self.pool.size + self.cfg.prefetch

    # ---- children -------------------------------------------------------------------------------
    def _spawn(self, index: int) -> None:
        old = self.ident_of.pop(index, None)
        if old is not None:
            del self.child_ids[old]
            self.retired.append(old)
        ident = compute.routing_id(index, os.urandom(8).hex())
        proc = self._mp.Process(
            target=compute.main, name=f"ndpipe-compute-{index}",
            args=(self.child_endpoint, ident, self.services, os.getpid(), self.cfg.max_frames,
                  self.cfg.memory_limit, self.cfg.max_frame_bytes),
        )
        proc.start()
        self.procs[index] = proc
        self.child_ids[ident] = index
        self.ident_of[index] = ident
        self.poller.register(proc.sentinel, zmq.POLLIN)

    def _on_child_death(self, index: int, now: float) -> None:
        proc = self.procs[index]
        self.poller.unregister(proc.sentinel)
        proc.join(0.1)
        was_ready = self.pool.slots[index].ready
        job = self.pool.died(index)
        code = proc.exitcode
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if code == P.EXIT_OUT_OF_MEMORY:
            why = f"out of memory: the handler exceeded worker.memory_limit = {self.cfg.memory_limit} bytes"
        elif code == -9:
            why = "signal 9: killed (kill -9, or the kernel's OOM killer)"
        if job is not None:
            log.warning("compute process %d (pid %s) died (%s) running task %s: reported CRASHED",
                        index, proc.pid, why, job.tid.hex())
            self._report(job.tid, P.CRASHED, "ProcessDied", f"compute process died ({why}) while running "
                         f"service {job.service!r}", pid=proc.pid, exitcode=code)
        else:
            log.info("compute process %d (pid %s) ended (%s)", index, proc.pid, why)
        self.quick_deaths = 0 if was_ready else self.quick_deaths + 1
        if self.quick_deaths > MAX_QUICK_DEATHS:
            raise NdpipeError(f"compute processes die before starting ({why}); check the handlers")
        if not self.draining:
            self._spawn(index)

    def _kill_child(self, index: int) -> None:
        proc = self.procs.get(index)
        if proc is not None and proc.is_alive():
            proc.kill()

    def _on_child(self, frames: list[Any], now: float) -> None:
        ident = frames[0]
        index = self.child_ids.get(ident)
        if index is None:
            if ident in self.retired:
                return  # a dead spawn's last frames, read after its sentinel: its task was already reported
            raise ProtocolError(f"unknown compute process {ident[:40]!r}")
        kind = frames[1]
        if kind == P.C_HELLO:
            proc = self.procs.get(index)
            if len(frames) > 2 and proc is not None and frames[2] == str(proc.pid).encode():
                self.pool.child_ready(index)  # a dead predecessor's late HELLO is ignored
        elif (kind == P.C_RESULT and len(frames) >= 4) or (kind == P.C_ERROR and len(frames) == 5):
            if self.pool.finished(index, frames[2], now) is not None:  # still wanted: pass it on as is
                command = P.W_RESULT if kind == P.C_RESULT else P.W_ERROR
                self._send_broker([P.WORKER, command, *frames[2:]])
            slot = self.pool.slots[index]
            if slot.job is not None and slot.job.cancelled and not slot.reported:
                slot.reported = True  # a job cancelled while it waited in the process now starts: stop it
                self._kill_child(index)
        else:
            raise ProtocolError(f"bad message from compute process {index}")

    def _start_jobs(self, now: float) -> None:
        while (started := self.pool.next_start(now)) is not None:
            slot, job = started
            frames = [self.ident_of[slot.index], P.C_TASK, job.tid, job.service.encode(), P.FLAGS.pack(job.flags),
                      *job.payload]
            try:
                send_frames(self.children, frames, zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # the process vanished between HELLO and now
                log.warning("compute process %d unreachable (%s): task waits for another", slot.index, exc)
                alive = isinstance(exc, zmq.Again)
                self.pool.requeue(slot.index, alive=alive)
                if not alive:  # unreachable yet maybe running: kill it so it is replaced
                    self._kill_child(slot.index)
                break

    def _check_deadlines(self, now: float) -> None:
        for slot in self.pool.overdue(now):
            job = slot.job
            assert job is not None and job.timeout is not None
            slot.reported = True
            self._kill_child(slot.index)
            self._report(job.tid, P.TIMEOUT, "TimeoutError", f"service {job.service!r} ran longer than its "
                         f"timeout of {job.timeout:g} s; its compute process was killed and replaced")

    def _report(self, tid: bytes, code: str, kind: str, message: str, **extra: Any) -> None:
        """A W_ERROR the daemon itself originates (the compute process could not say it)."""
        details = {"message": message, "type": kind, **extra}
        self._send_broker([P.WORKER, P.W_ERROR, tid, code.encode(), msgpack.packb(details)])

    # ---- broker ---------------------------------------------------------------------------------
    def _connect(self, now: float) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
        sock = configure(self.ctx.socket(zmq.DEALER), hwm=P.HWM, max_frame_bytes=self.cfg.max_frame_bytes)
        sock.connect(self.cfg.broker)
        self.sock = sock
        self.poller.register(sock, zmq.POLLIN)
        info = {"services": sorted(self.services), "slots": self.slots, "processes": self.pool.size,
                "host": socket.gethostname(), "pid": os.getpid(), "version": __version__}
        self._send_broker([P.WORKER, P.READY, msgpack.packb(info)])
        if self.draining:  # a re-registration while stopping must not attract new work
            self._send_broker([P.WORKER, P.DRAIN])
        self.broker_deadline = now + max(self.interval * self.liveness, self.backoff)
        self.next_beat = now + self.interval

    def _send_broker(self, frames: list[Any]) -> None:
        if self.sock is None:
            return
        try:
            send_frames(self.sock, frames, zmq.NOBLOCK)
        except zmq.Again:
            self._dropped.warning("broker link full: message to the broker dropped")

    def _on_broker(self, frames: list[Any], now: float) -> None:
        command = P.check_header(frames, P.WORKER, 2)
        self.broker_deadline = now + self.interval * self.liveness
        self.backoff = self.cfg.reconnect_min
        if command == P.TASK:
            P.check_header(frames, P.WORKER, 6)
            tid, service = P.task_id_of(frames[2]), P.service_of(frames[3])
            _attempt, timeout_ms, flags = P.parse_meta(frames[4])
            per_call = self.timeouts.get(service)
            if per_call and flags & P.FLAG_BATCH:  # the service's timeout is per call: scale it to the batch
                per_call *= max(1, batch_length(frames[5]))
            timeouts = [t for t in (timeout_ms / 1000 if timeout_ms else None, per_call) if t]
            self.pool.add(Job(tid, service, frames[5:], min(timeouts) if timeouts else None, flags=flags))
        elif command == P.HEARTBEAT:
            pass
        elif command == P.WELCOME:
            params = unpack_map(frame_bytes(frames[2])) if len(frames) > 2 else {}
            self.interval = float(params.get("heartbeat_interval", self.interval))
            self.liveness = int(params.get("liveness", self.liveness))
            self.next_beat = min(self.next_beat, now + self.interval)
            log.info("registered with broker %s at %s (heartbeat %.2f s × %d)",
                     params.get("broker_id"), self.cfg.broker, self.interval, self.liveness)
        elif command == P.DISCONNECT:
            dropped = self.pool.drop_pending()
            log.warning("broker does not know this worker: registering again (%d waiting tasks dropped)", dropped)
            self._connect(now)
        elif command == P.W_CANCEL:
            P.check_header(frames, P.WORKER, 3)
            slot = self.pool.cancel(P.task_id_of(frames[2]))
            if slot is not None:
                self._kill_child(slot.index)
        else:
            raise ProtocolError(f"unknown broker command {command!r}")

    def _heartbeat(self, now: float) -> None:
        if now >= self.broker_deadline:
            log.warning("broker silent for %.1f s: reconnecting (back-off %.1f s)",
                        self.interval * self.liveness, self.backoff)
            self.pool.drop_pending()
            self._connect(now)
            self.backoff = min(self.backoff * 2, self.cfg.reconnect_max)
            return
        self._send_broker([P.WORKER, P.HEARTBEAT, msgpack.packb(self._stats())])
        self.next_beat = now + self.interval

    def _stats(self) -> dict[str, Any]:
        cpu = rss = 0.0
        pids = [os.getpid(), *(p.pid for p in self.procs.values() if p.pid)]
        for pid in pids:
            try:
                proc = self._ps.get(pid) or self._ps.setdefault(pid, psutil.Process(pid))
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
            except psutil.Error:
                self._ps.pop(pid, None)
        for pid in set(self._ps) - set(pids):  # replaced compute processes
            del self._ps[pid]
        return {"cpu": round(cpu, 1), "rss": int(rss), "running": self.pool.running,
                "waiting": len(self.pool.pending), "processes": self.pool.size}

    # ---- loop -----------------------------------------------------------------------------------
    def run(self, stop: StopSignal) -> None:
        """Serve until stopped, then drain and hand back."""
        self.poller.register(self.children, zmq.POLLIN)
        self.poller.register(stop.fd, zmq.POLLIN)
        for index in range(self.pool.size):
            self._spawn(index)
        self.next_beat = float("inf")  # register only once every compute process said HELLO
        drain_until = float("inf")
        while True:
            if stop.requested and not self.draining:
                self.draining = True
                drain_until = time.monotonic() + self.cfg.drain_timeout
                self._send_broker([P.WORKER, P.DRAIN])
                log.info("stopping: draining %d running, %d waiting tasks (up to %.0f s)",
                         self.pool.running, len(self.pool.pending), self.cfg.drain_timeout)
            now = time.monotonic()
            if self.draining and (not self.pool.busy or now >= drain_until):
                break
            wake = min(self.next_beat, drain_until, self.pool.next_deadline() or float("inf"), now + 1.0)
            events = dict(self.poller.poll(int(max(0.0, wake - now) * 1000)))
            now = time.monotonic()
            if stop.fd in events:
                stop.clear()
            self._dispatch_events(events, now)
            if self.sock is None and all(slot.ready for slot in self.pool.slots) and not self.draining:
                self._connect(now)
            self._check_deadlines(now)
            self._start_jobs(now)
            if now >= self.next_beat:
                self._heartbeat(now)
        self._send_broker([P.WORKER, P.DISCONNECT])
        log.info("stopped: %d tasks handed back to the broker", self.pool.running + len(self.pool.pending))

    def _dispatch_events(self, events: dict[Any, int], now: float) -> None:
        for sock, handler in ((self.sock, self._on_broker), (self.children, self._on_child)):
            if sock is None or sock not in events:
                continue
            for _ in range(P.READ_BATCH):
                try:
                    frames = recv_bounded(sock, P.read_cap(self.cfg.max_frames), head=5 if sock is self.sock else 3)
                    handler(frames, now)
                except zmq.Again:
                    break
                except ProtocolError as exc:
                    self._malformed.warning("dropped malformed message: %s", exc)
                except NdpipeError:
                    raise
                except Exception:  # a bug handling one message must not stop the worker
                    log.exception("error while handling a message")
                if sock.closed:  # DISCONNECT made us reconnect: the new socket is polled next pass
                    break
        for index, proc in list(self.procs.items()):
            if proc.sentinel in events:
                self._on_child_death(index, now)

    def close(self) -> None:
        """Stop every compute process (TERM, then KILL) and release sockets and the ipc dir."""
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 2.0
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        if self.sock is not None:
            self.sock.close(linger=1000)  # let the last results and DISCONNECT reach the broker
        self.children.close(linger=0)
        shutil.rmtree(self.private_dir, ignore_errors=True)
        if self._own_ctx:
            self.ctx.term()


def private_dir() -> str:
    """A fresh directory only this uid can enter (mkdtemp makes it 0700), under systemd's
    ``$RUNTIME_DIRECTORY`` when set (removed by systemd even after kill -9), else the temp dir."""
    parent = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    return tempfile.mkdtemp(prefix=f"ndpipe-worker-{os.getpid()}-", dir=parent)


def serve(config: WorkerConfig, stop: StopSignal | None = None) -> None:
    """Entry point for the CLI and tests. Signals stay handled until the clean-up is done."""
    daemon = WorkerDaemon(config)
    with stop or StopSignal() as sig:
        try:
            daemon.run(sig)
        finally:
            daemon.close()
