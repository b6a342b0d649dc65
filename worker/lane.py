"""A lane: one compute process with its own connection to the broker (PROTOCOL.md §10).

Tasks and results travel between the broker and the lane directly; the worker daemon is not on
that path (it was two of the six hops of every task). The daemon stays the lane's supervisor, and
talks to it over two private channels that no other process can reach — both inherited at spawn,
neither has a name to connect to:

* a **pipe**: the lane says HELLO once its handlers are loaded; the daemon says JOIN (the key the
  broker gave it, and the heartbeat settings) and DRAIN;
* a **shared slot** (:class:`LaneSlot`, a few bytes of shared memory the lane writes and the daemon
  reads): what the lane is running, since when, with what timeout. The daemon reads it when the lane
  dies (to report the task it was running), on W_CANCEL (to kill the lane running that task), and
  to enforce deadlines as a backstop.

Deadlines are the kernel's: before a handler with a timeout runs, the lane arms ``ITIMER_REAL`` with
SIGALRM left at its default action, so a handler that holds the GIL or sits in C code is still
stopped on time; the daemon sees the death and reports TIMEOUT. A lane never heartbeats (a handler
may hold the GIL for minutes): its daemon's heartbeats keep it alive at the broker.

The lane's link: if its connection drops (broker restart, link cut, a frame libzmq refused) or the
broker says DISCONNECT (it does not know this lane), tasks may have been lost on the way, so the lane
exits with EXIT_LINK_LOST: its daemon reports it (LANE_GONE: the broker hands its tasks back) and
starts a fresh lane, which joins again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np
import zmq

from ndpipe import protocol as P
from ndpipe import rounds as R
from ndpipe import security
from ndpipe.codec import batch_length
from ndpipe.errors import DecodeError, ProtocolError
from ndpipe.logsetup import setup_logging
from ndpipe.refs import Ref
from ndpipe.runtime import die_with_parent
from ndpipe.transport import LinkWatch, Repeats, Throttle, configure, readable, recv_bounded, send_frames, unpack_map
from ndpipe.worker import compute
from ndpipe.worker.partitions import Partitions

log = logging.getLogger("ndpipe.lane")

STARTING, IDLE, RUNNING, LINK_LOST = 0, 1, 2, 3
CONTROL_EVERY = 16  # tasks run back to back between two looks at the pipe and the link monitor


class LaneSlot(ctypes.Structure):
    """What a lane is doing, in shared memory. One writer (the lane), one reader (the daemon): the
    writer makes ``seq`` odd while it writes, so the reader retries a torn read (a seqlock)."""

    _fields_ = [
        ("seq", ctypes.c_uint64),
        ("state", ctypes.c_uint8),
        ("tid_len", ctypes.c_uint8),
        ("tid", ctypes.c_ubyte * P.MAX_TASK_ID),  # the running task, or the last one answered
        ("started", ctypes.c_double),  # time.monotonic() (CLOCK_MONOTONIC: one clock for every process)
        ("timeout", ctypes.c_double),  # seconds; 0 = none
        ("done", ctypes.c_uint64),  # tasks answered since the lane started
        ("failed", ctypes.c_uint64),  # of those, answered with an error (the handler raised, or bad input)
        ("service", ctypes.c_uint16),  # the running task's service: an index into LaneArgs.services (NO_SERVICE)
    ]


NO_SERVICE = 0xFFFF  # the slot's service when none of the lane's services is running (a step, a stray name)


@dataclass(frozen=True, slots=True)
class SlotView:
    state: int
    tid: bytes
    started: float
    timeout: float
    done: int
    failed: int = 0
    service: int = NO_SERVICE


def read_slot(slot: LaneSlot) -> SlotView:
    """A consistent copy of the slot (the daemon's side)."""
    for _ in range(1000):
        seq = slot.seq
        if seq % 2 == 0:
            view = SlotView(slot.state, bytes(slot.tid)[: slot.tid_len], slot.started, slot.timeout, slot.done,
                            slot.failed, slot.service)
            if slot.seq == seq:
                return view
    return SlotView(slot.state, b"", 0.0, 0.0, slot.done, slot.failed)  # a writer stuck mid-write: being killed


def write_slot(slot: LaneSlot, state: int, tid: bytes | None = None, timeout: float = 0.0,
               service: int = NO_SERVICE) -> None:
    slot.seq += 1
    slot.state = state
    if tid is not None:
        ctypes.memmove(ctypes.addressof(slot) + LaneSlot.tid.offset, tid, len(tid))
        slot.tid_len = len(tid)
        slot.started = time.monotonic()
        slot.timeout = timeout
        slot.service = service
    slot.seq += 1


@dataclass(frozen=True, slots=True)
class StepCall:
    """A W_STEP waiting in the lane's queue (it runs in order with the tasks)."""

    run: bytes
    ctl: dict[str, Any]
    tid: bytes = b""  # never a task's id: a W_CANCEL does not match it


@dataclass(frozen=True, slots=True)
class LaneArgs:
    """What a lane needs from the worker's configuration (pickled to the spawned process)."""

    index: int
    broker: str
    services: dict[str, str]  # name -> "module:function" (or "module:Class", a resident service)
    timeouts: dict[str, float | None]  # per call, from the worker's YAML
    parent: int
    max_frames: int = P.MAX_FRAMES
    max_frame_bytes: int = P.MAX_FRAME_BYTES
    memory_limit: int = 0
    init: dict[str, dict[str, Any]] = field(default_factory=dict)  # resident services' constructor kwargs
    curve: security.Curve | None = None  # the worker's key pair and the broker key it pins (CurveZMQ)
    logging: tuple[str, str] | None = None  # the daemon's (level, format): a spawned lane sets it up again


class Lane:
    """The lane's loop: read what the broker sent, run it in order, answer; look at the pipe and the
    link between tasks."""

    def __init__(self, args: LaneArgs, conn: Connection, slot: LaneSlot, handlers: dict[str, compute.Handler],
                 broken: dict[str, dict[str, Any]] | None = None) -> None:
        self.args = args
        self.conn = conn
        self.slot = slot
        self.handlers = handlers
        self.broken = broken or {}  # services whose constructor failed here: the broker routes none to us
        self.refs: dict[bytes, tuple[mmap.mmap | None, bytes]] = {}  # arrays sent once: digest -> (map, meta)
        self.deferred: list[bytes] = []  # pipe messages that came while a task waited for an array
        self.tid = b""  # the task running (a fetch names it: the broker asks that task's master)
        self.denied: tuple[bytes, str] | None = None  # the last L_NODATA: (digest, why)
        self.acked = 0  # the running stream: parts its master has consumed (W_ACK)
        self.stopped = False  # the running stream was cancelled (W_CANCEL): stop its generator
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock: zmq.Socket[Any] | None = None
        self.watch: LinkWatch | None = None
        self.queue: deque[P.TaskMsg | StepCall] = deque()
        self.partitions = Partitions(handlers, args.max_frames)  # iterations' partitions held here
        self.draining = False
        self.poller = zmq.Poller()
        self.poller.register(conn.fileno(), zmq.POLLIN)
        self._bad = Throttle(log)
        self._service_index = {name: i for i, name in enumerate(args.services)}  # for the slot (the daemon's logs)
        self._debug = log.isEnabledFor(logging.DEBUG)  # one line per task: asked once, not per task
        self._failures = Repeats()  # failures at INFO: once a second per service and exception type

    # ---- control ---------------------------------------------------------------------------------
    def _join(self, params: dict[str, Any]) -> None:
        """(Re)join the broker on a fresh connection; what the old one brought is the broker's again."""
        self._close_link()
        self.queue.clear()
        self.partitions.held.clear()  # a new connection: the broker forgot this lane and what it held
        sock = configure(self.ctx.socket(zmq.DEALER), hwm=P.HWM, max_frame_bytes=self.args.max_frame_bytes)
        security.client(sock, self.args.curve)
        # A random routing id, new per connection (as the ROUTER's own would be), but not guessable from
        # another's: the broker's ROUTER_HANDOVER gives an id to whoever presents it (PROTOCOL.md §13).
        sock.routing_id = b"L" + os.urandom(15)
        sock.connect(self.args.broker)
        self.sock, self.watch = sock, LinkWatch(sock)
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.watch.monitor, zmq.POLLIN)
        info = {"key": params["key"], "lane": self.args.index, "pid": os.getpid(), "broken": self.broken}
        send_frames(sock, [P.WORKER, P.LANE, msgpack.packb(info, use_bin_type=True)])

    def _close_link(self, linger: int = 0) -> None:
        if self.sock is not None and self.watch is not None:
            self.poller.unregister(self.sock)
            self.poller.unregister(self.watch.monitor)
            self.watch.close()
            self.sock.close(linger=linger)
            self.sock = self.watch = None

    def _on_pipe(self) -> bool:
        """Messages from the daemon; False when it is gone (the pipe closed)."""
        try:
            while self.deferred or self.conn.poll(0):
                msg = self.deferred.pop(0) if self.deferred else self.conn.recv_bytes()
                if msg[:1] == P.L_JOIN:
                    self._join(unpack_map(msg[1:]))
                elif msg[:1] == P.L_DRAIN:
                    self.draining = True
                else:
                    self._on_ref_message(msg)
        except (EOFError, OSError):
            return False
        return True

    # ---- arrays sent once (Master.put) ---------------------------------------------------------------
    def _on_ref_message(self, msg: bytes) -> None:
        """L_DATA (map the memfd that follows it), L_NODATA (kept in ``denied``), L_EVICT."""
        if msg[:1] == P.L_DATA:
            info = unpack_map(msg[1:])
            fd = reduction.recv_handle(self.conn)  # always taken, or the next message would be misread
            try:
                size = int(info["size"])
                self.refs[info["digest"]] = (mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None, info["meta"])
            finally:
                os.close(fd)
        elif msg[:1] == P.L_NODATA:
            info = unpack_map(msg[1:])
            self.denied = (bytes(info["digest"]), str(info["why"]))
        elif msg[:1] == P.L_EVICT:
            self.refs.pop(msg[1:], None)  # a handler still holding the array keeps the mapping alive

    def _ref(self, ref: Ref) -> Any:
        """The array a ref names, read-only: mapped from the host's copy, fetched first if needed."""
        if ref.digest not in self.refs:
            self._fetch(ref.digest)
        mm, meta = self.refs[ref.digest]
        if meta != ref.meta():
            raise DecodeError(f"array ref {ref.digest.hex()}: the bytes under that digest describe another array")
        if mm is None:
            arr = np.empty(ref.shape, ref.dtype)
            arr.setflags(write=False)
            return arr
        flat = np.frombuffer(mm, ref.dtype, ref.nbytes // np.dtype(ref.dtype).itemsize)
        return flat.reshape(ref.shape, order="F" if ref.fortran else "C")

    def _fetch(self, digest: bytes) -> None:
        """Ask the daemon and wait for its answer (bounded: it answers within FETCH_TIMEOUT); other
        pipe messages meanwhile are kept for after the task."""
        self.conn.send_bytes(P.L_FETCH + msgpack.packb({"tid": self.tid, "digest": digest}, use_bin_type=True))
        self.denied = None
        deadline = time.monotonic() + P.FETCH_TIMEOUT + 10
        while digest not in self.refs:
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                raise DecodeError(f"array ref {digest.hex()}: no answer from the worker daemon")
            msg = self.conn.recv_bytes()
            if msg[:1] in (P.L_DATA, P.L_NODATA, P.L_EVICT):
                self._on_ref_message(msg)
                if self.denied is not None and self.denied[0] == digest:
                    raise DecodeError(f"array ref {digest.hex()} cannot be had: {self.denied[1]}")
            else:
                self.deferred.append(msg)

    def _link_lost(self, why: str) -> None:
        """Tasks may have been lost on the way: start over as a fresh lane (the daemon respawns us and
        tells the broker, which hands back what this lane held)."""
        log.warning("lane %d: %s: exiting to be replaced", self.args.index, why)
        write_slot(self.slot, LINK_LOST)
        os._exit(P.EXIT_LINK_LOST)

    # ---- tasks -----------------------------------------------------------------------------------
    def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        for _ in range(P.READ_BATCH):
            if not readable(sock):
                return
            try:
                frames = recv_bounded(sock, P.read_cap(self.args.max_frames), head=5, header=P.WORKER, at=0)
                command = P.check_header(frames, P.WORKER, 2)
                if command == P.TASK:
                    self.queue.append(P.parse_task(frames))
                elif command in (P.W_PLACE, P.W_STEP, P.W_INBOX, P.W_END):
                    self._on_iteration(command, frames)
                elif command == P.W_CANCEL:
                    tid = P.parse_task_ref(frames, P.WORKER)
                    self.queue = deque(t for t in self.queue if t.tid != tid)
                    self.stopped = self.stopped or tid == self.tid  # a stream under way stops
                elif command == P.W_ACK:
                    tid, seq = P.parse_ack(frames, P.WORKER)
                    if tid == self.tid:
                        self.acked = max(self.acked, seq + 1)
                elif command == P.DISCONNECT:
                    self._link_lost("the broker does not know this lane")
                elif command != P.HEARTBEAT:
                    raise ProtocolError(f"unexpected command {command!r} on a lane")
            except zmq.Again:
                return
            except ProtocolError as exc:
                self._bad.warning("lane %d: dropped malformed message: %s", self.args.index, exc)

    def _on_iteration(self, command: bytes, frames: list[Any]) -> None:
        """Placement, messages and the end are taken at once; a round waits its turn in the queue."""
        run, ctl, payload = R.parse(frames, P.WORKER)
        if command == P.W_STEP:
            self.queue.append(StepCall(run, ctl))
            return
        if command == P.W_PLACE:
            replies = self.partitions.place(run, ctl, payload)
        elif command == P.W_INBOX:
            self.partitions.inbox(run, ctl, payload)
            replies = []
        else:
            replies = self.partitions.end(run, ctl)
        for reply in replies:
            if self.sock is not None:
                send_frames(self.sock, reply)

    def _timeout(self, task: P.TaskMsg) -> float:
        per_call = self.args.timeouts.get(task.service)
        if per_call and task.flags & P.FLAG_BATCH:  # the service's timeout is per call: scale it to the batch
            per_call *= max(1, batch_length(task.payload[0]))
        limits = [t for t in (task.timeout_ms / 1000 if task.timeout_ms else None, per_call) if t]
        return min(limits) if limits else 0.0

    @contextlib.contextmanager
    def _running(self, tid: bytes, timeout: float, service: int = NO_SERVICE) -> Iterator[None]:
        """The slot says what runs and until when; the kernel's timer ends the process at the deadline
        (SIGALRM's default action: a handler that holds the GIL is still stopped)."""
        write_slot(self.slot, RUNNING, tid, timeout, service)
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            yield
        except MemoryError:
            # Exhausted memory leaves a process in no state to go on: exit with a status the daemon
            # turns into a CRASHED report that says why (retried, then MAX_ATTEMPTS).
            os._exit(P.EXIT_OUT_OF_MEMORY)
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
        write_slot(self.slot, IDLE)

    def _run(self, task: P.TaskMsg | StepCall) -> None:
        if isinstance(task, StepCall):
            self._step(task)
            return
        started = time.monotonic()
        with self._running(task.tid, self._timeout(task), self._service_index.get(task.service, NO_SERVICE)):
            self.tid = task.tid
            if task.flags & P.FLAG_STREAM:
                reply = self._stream(task)
            else:
                reply = compute.run_task(self.handlers, task.tid, task.service, task.payload, self.args.max_frames,
                                         task.flags, self._ref)
            self.slot.done += 1
            failed = bool(reply) and reply[0] == P.W_ERROR
            if failed:
                self.slot.failed += 1
        if self.sock is not None and reply:  # the answer first: a slow journal must not delay it
            send_frames(self.sock, [P.WORKER, *reply])
        if failed or self._debug:
            self._log_task(task, reply, time.monotonic() - started, failed)

    def _log_task(self, task: P.TaskMsg, reply: list[Any], seconds: float, failed: bool) -> None:
        """A failure at INFO with the exception's first line (an operator's journal shows what broke and
        which task); every task at DEBUG with its service, duration and outcome."""
        outcome = "ok" if reply else "cancelled"
        if failed:
            try:
                details = msgpack.unpackb(reply[3], raw=False)
                first = str(details.get("message", "")).strip().splitlines()
                kind = str(details.get("type", "")).removeprefix("builtins.")
                outcome = f"{bytes(reply[2]).decode(errors='replace')}: {kind}: {first[0] if first else ''}"
            except Exception:  # what we built ourselves; a surprise here must not lose the answer
                outcome = "failed"
        level = logging.INFO if failed and self._failures.due((task.service, outcome.split(":")[:2])) else logging.DEBUG
        log.log(level, "lane %d: task %s %r %s in %.1f ms%s", self.args.index, task.tid.hex(), task.service,
                f"failed ({outcome})" if failed else outcome, seconds * 1000,
                self._failures.since() if level == logging.INFO else "")

    def _step(self, call: StepCall) -> None:
        """One round of this lane's partitions of a run, under the run's round_timeout (a hung step ends
        the process, as a task's timeout does; the broker then says LOST)."""
        timeout = call.ctl.get("timeout_ms", 0)
        timeout = timeout / 1000 if isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0 else 0.0
        with self._running(call.run, timeout):
            try:
                replies = self.partitions.step(call.run, call.ctl)
            except ProtocolError as exc:
                self._bad.warning("lane %d: dropped malformed W_STEP: %s", self.args.index, exc)
                replies = []
        for reply in replies:
            if self.sock is not None:
                send_frames(self.sock, reply)

    # ---- streams ----------------------------------------------------------------------------------
    def _stream(self, task: P.TaskMsg) -> list[Any]:
        """Send each part the handler yields as W_PART, at most STREAM_WINDOW ahead of its master's
        acks (a slow consumer slows the generator); then W_RESULT with the number of parts. A
        W_CANCEL for it (its master closed the stream) closes the generator: no reply."""
        parts = compute.start_stream(self.handlers, task.tid, task.service, task.payload, self.args.max_frames,
                                     self._ref)
        if isinstance(parts, list):
            return parts
        self.acked, self.stopped, seq = 0, False, 0
        try:
            for value in parts:
                frames = compute.part_frames(value, self.args.max_frames)
                if self.sock is None:
                    return []
                send_frames(self.sock, [P.WORKER, P.W_PART, task.tid, seq.to_bytes(4, "big"), *frames])
                seq += 1
                self._read()
                while not self.stopped and seq - self.acked >= P.STREAM_WINDOW:
                    self._await_broker()
                if self.stopped:
                    return []
        except MemoryError:
            raise
        except Exception as exc:  # the generator raised after some parts: they stand, this ends the stream
            return compute.error_frames(task.tid, P.HANDLER_ERROR, exc)
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()  # runs the generator's finally blocks now, also when the stream was cancelled
        return [P.W_RESULT, task.tid, *compute.part_frames(seq, self.args.max_frames)]

    def _await_broker(self) -> None:
        """Wait (up to 1 s) for what the broker sends next: acks, a cancel, more tasks."""
        if self.sock is None or self.watch is None:
            self.stopped = True
            return
        poller = zmq.Poller()  # not self.poller: a pipe message waiting would wake it at once, every time
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)
        events = dict(poller.poll(1000))
        if self.watch.monitor in events and (self.watch.came_back() or self.watch.dropped):
            self._link_lost("the connection to the broker dropped")
        if self.sock in events:
            self._read()

    def run(self) -> None:
        count = 0
        while True:
            if not self.queue or count % CONTROL_EVERY == 0:
                events = dict(self.poller.poll(0 if self.queue else 1000))
                if not events and not self.queue and os.getppid() != self.args.parent:
                    return  # the daemon is gone (PR_SET_PDEATHSIG covers most cases; this the rest)
                if (self.deferred or self.conn.fileno() in events) and not self._on_pipe():
                    return
                if self.watch is not None and self.watch.monitor in events:
                    back = self.watch.came_back()
                    if self.watch.dropped or back:
                        self._link_lost("the connection to the broker dropped")
            count += 1
            if self.sock is not None:
                self._read()
            if self.queue:
                self._run(self.queue.popleft())
            elif self.draining:
                if self.sock is not None:  # what is still on its way here goes back to the queue
                    send_frames(self.sock, [P.WORKER, P.DISCONNECT])
                    self._close_link(linger=1000)
                return


def main(args: LaneArgs, conn: Connection, slot: LaneSlot) -> None:
    """Process entry point (spawned by the daemon)."""
    die_with_parent()
    if args.logging is not None:
        setup_logging(*args.logging)
    compute.set_frame_limit(args.max_frame_bytes)
    compute.limit_memory(args.memory_limit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the deadline timer ends the process, GIL or not
    handlers, broken = compute.build_services(args.services, args.init, args.memory_limit)
    write_slot(slot, IDLE)
    lane = Lane(args, conn, slot, handlers, broken)
    conn.send_bytes(P.L_HELLO + msgpack.packb({"pid": os.getpid(), "broken": broken}, use_bin_type=True,
                                              default=repr))
    try:
        lane.run()
    finally:
        lane._close_link()
        lane.ctx.term()

