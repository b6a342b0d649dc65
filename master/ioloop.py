"""The master's I/O loop: the one place that touches the context and the DEALER socket.

User threads reach it through a :class:`Channel` of small command dataclasses and a wake-up pipe;
what to do with each command, each broker message and the passing of time is decided by the
socket-free :class:`~ndpipe.master.state.MasterState`. The loop carries it out: send the frames the
state returns, open a new socket when it asks (the broker went silent), tell it when the socket
monitor saw the link drop and come back.

Who runs the loop: whoever holds :attr:`IOLoop.lock`. The I/O thread takes it for each pass and
waits for the next event *without* it, on plain file descriptors (the sockets' ZMQ_FD and the wake
pipe), never on the sockets themselves. So a user thread with one call to make finds the lock free
and runs the pass itself: its SUBMIT leaves from its own thread (:meth:`IOLoop.run_posted`), and
while it waits in ``result()`` it reads the answer itself (:meth:`IOLoop.drive`): a lone call pays
no hand-off between threads. Under load the lock is busy and commands go through the channel as
before. The mutex is the full memory barrier libzmq asks for when a socket changes threads; every
holder reads the sockets until they have nothing left before it lets go (ZMQ_FD is edge-triggered:
a message left unread would wake nobody).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from ndpipe import protocol as P
from ndpipe import security
from ndpipe.config import MasterConfig
from ndpipe.errors import NdpipeError, ProtocolError
from ndpipe.master.iterate import IterRun, resolve
from ndpipe.master.state import Frames, MasterState, Pending
from ndpipe.runtime import drain_pipe, ring_pipe
from ndpipe.transport import LinkWatch, Throttle, configure, readable, recv_bounded, send_frames

log = logging.getLogger("ndpipe.master")
READ_BATCH = 1024  # broker messages read per poll wake-up before the inbox and the clock get a turn
USER_QUIET = 0.002  # seconds the I/O thread leaves socket events to a user thread that just ran a pass
DRIVE_WAIT = 0.005  # seconds a waiting user thread waits for the loop before it waits for its future instead


# ---- commands from user threads ----------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Submit:
    pending: Pending


@dataclass(slots=True, frozen=True)
class Cancel:
    tid: bytes


@dataclass(slots=True, frozen=True)
class Status:
    request: bytes
    future: Future[dict[str, Any]]


@dataclass(slots=True, frozen=True)
class StatusWithdrawn:
    request: bytes


@dataclass(slots=True, frozen=True)
class Ack:
    tid: bytes
    seq: int


@dataclass(slots=True, frozen=True)
class Put:
    digest: bytes
    meta: bytes
    array: Any


@dataclass(slots=True, frozen=True)
class Release:
    digest: bytes


@dataclass(slots=True, frozen=True)
class IterStart:
    run: IterRun


@dataclass(slots=True, frozen=True)
class IterStop:
    rid: bytes


@dataclass(slots=True, frozen=True)
class Close:
    pass


Command = Submit | Cancel | Status | StatusWithdrawn | Ack | Put | Release | IterStart | IterStop | Close


class Channel:
    """Commands from user threads to the I/O thread: a deque and a non-blocking wake-up pipe.

    One pipe write per wake-up, not per command: ``_wake_pending`` is set by the poster that writes
    and cleared by the I/O thread after emptying the pipe and before reading the deque, so a command
    posted after that point finds the flag clear and writes again. Posters serialise on the master's
    lock; ``append`` and ``popleft`` on a deque are atomic.
    """

    def __init__(self) -> None:
        self.items: deque[Command] = deque()
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False

    def post(self, command: Command) -> None:
        self.items.append(command)
        if self._wake_pending:  # the I/O thread has a wake-up it has not consumed: it will see this
            return
        self._wake_pending = True
        try:
            ring_pipe(self._wake_w)
        except BaseException:
            self._wake_pending = False  # interrupted before the write: the next post must write
            raise

    def ring(self) -> None:
        """Wake whoever waits on the pipe, whatever the flag says (the loop is closing, or a pass run by a
        user thread made the I/O thread's sleep too long)."""
        ring_pipe(self._wake_w)

    def woken(self) -> None:
        """I/O thread: empty the pipe; commands posted from now on write a new wake-up."""
        drain_pipe(self.wake_r)
        self._wake_pending = False

    def take(self) -> list[Command]:
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out

    def fail_unread(self, error: BaseException) -> None:
        """Fail what user threads posted but the I/O thread will never read."""
        for command in self.take():
            if isinstance(command, Submit):
                resolve(command.pending.future, error=error)
            elif isinstance(command, Status):
                resolve(command.future, error=error)
            elif isinstance(command, IterStart):
                command.run.fail(error)

    def close(self) -> None:
        os.close(self.wake_r)
        os.close(self._wake_w)


class IOLoop:
    """Create it in the I/O thread (the socket must be made where it is used), then :meth:`run`."""

    def __init__(self, cfg: MasterConfig, endpoint: str, ident: bytes, hwm: int, channel: Channel,
                 curve: security.Curve | None = None) -> None:
        self.cfg = cfg
        self.curve = curve
        self.endpoint = endpoint
        self.ident = ident
        self.hwm = hwm
        self.channel = channel
        self.state = MasterState(cfg, endpoint, time.monotonic())
        self.ctx: zmq.Context[Any] = zmq.Context()
        try:
            self.sock = self._new_socket()
            self.watch = LinkWatch(self.sock)
        except BaseException:  # e.g. an endpoint libzmq refuses: release the context, then say why
            self.ctx.destroy(linger=0)
            raise
        self.closing = False
        self.lock = threading.Lock()  # held by whichever thread runs the loop (see the module docstring)
        self.owner = 0  # that thread's ident while it holds the lock
        self.sleep_until = 0.0  # when the I/O thread's current wait ends at the latest
        self.user_pass = 0.0  # when a user thread last ran a pass
        self.malformed = Throttle(log)
        self.dropped = Throttle(log)

    def _new_socket(self) -> zmq.Socket[Any]:
        sock = configure(self.ctx.socket(zmq.DEALER), hwm=self.hwm, max_frame_bytes=-1)
        security.client(sock, self.curve)
        sock.setsockopt(zmq.ROUTING_ID, self.ident)  # kept across sockets: the broker knows us by it
        sock.connect(self.endpoint)
        return sock

    # ---- who runs the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """The I/O thread: a pass under the lock, then wait without it until the next event."""
        while True:
            with self.lock:
                self.owner = threading.get_ident()
                try:
                    if self.closing:
                        break
                    self._pass()
                    fds, until = self._fds(), self.state.next_wake()
                    if time.monotonic() - self.user_pass < USER_QUIET:
                        # A user thread runs the loop right now (it reads what its call brought): do
                        # not wake up for every socket event it causes, only for the pipe, and look
                        # again shortly (an answer nobody waits for in result() must still be read).
                        fds, until = fds[:1], min(until, time.monotonic() + USER_QUIET)
                    self.sleep_until = until
                finally:
                    self.owner = 0
            self._wait(fds, until)
        with self.lock:
            self._send_all([[P.MASTER, P.BYE]])
            self.sock.close(linger=200)
            self.state.fail_all(NdpipeError("master closed before the task finished"))

    def run_posted(self, command: Command) -> bool:
        """A user thread: run ``command`` (and whatever the channel holds before it) here and now if
        the loop is free; False if it is busy (post the command to the channel instead)."""
        if not self.lock.acquire(timeout=DRIVE_WAIT):
            return False
        try:
            self.owner = threading.get_ident()
            self.channel.items.append(command)
            self._foreign_pass()
        finally:
            self.owner = 0
            self.lock.release()
        return True

    def drive(self, future: Future[Any], deadline: float | None) -> bool:
        """A user thread waiting for ``future``: run the loop here until it is done (or ``deadline``).
        False if the loop is busy elsewhere (then wait on the future as usual: the runner resolves it)."""
        if self.owner == threading.get_ident():
            raise NdpipeError("cannot wait for a result inside a Future callback (it runs the master's loop)")
        # The I/O thread holds the lock only for a pass (often the one our own SUBMIT's socket event
        # woke it for): worth waiting out. A user thread driving for its own future holds it longer.
        if not self.lock.acquire(timeout=DRIVE_WAIT):
            return False
        try:
            self.owner = threading.get_ident()
            while not self.closing:
                self._foreign_pass()
                now = time.monotonic()
                if future.done() or (deadline is not None and now >= deadline):
                    break
                until = self.state.next_wake() if deadline is None else min(deadline, self.state.next_wake())
                self._wait(self._fds(), until)
        finally:
            self.owner = 0
            self.lock.release()
        return True

    def _foreign_pass(self) -> None:
        """A pass in a user thread. If it brought a deadline or a PING before the time the I/O thread
        sleeps until, wake it (no socket event would wake it for that)."""
        self._pass()
        self.user_pass = time.monotonic()
        if self.state.next_wake() < self.sleep_until:
            self.channel.ring()

    def _fds(self) -> list[int]:
        return [self.channel.wake_r, int(self.sock.get(zmq.FD)), int(self.watch.monitor.get(zmq.FD))]

    @staticmethod
    def _wait(fds: list[int], until: float) -> None:
        waiter = select.poll()
        for fd in fds:
            waiter.register(fd, select.POLLIN)
        waiter.poll(max(0.0, until - time.monotonic()) * 1000)

    def _pass(self) -> None:
        """Commands, broker messages, the link monitor, time: everything due, until the sockets have
        nothing left to read (sends may consume the edge a later wait would need)."""
        self.channel.woken()
        self._commands()
        self._receive()
        if readable(self.watch.monitor) and self.watch.came_back():
            self._send_all(self.state.link_came_back(time.monotonic()))
        self.state.refused = self.watch.refused
        tick = self.state.tick(time.monotonic())
        if tick.reconnect:
            self._replace_socket()
        self._send_all(tick.send)
        while readable(self.sock) and not self.closing:
            self._receive()

    def close(self) -> None:
        self.watch.close()
        self.sock.close(linger=0)
        self.ctx.term()

    def _commands(self) -> None:
        now = time.monotonic()
        for command in self.channel.take():
            if isinstance(command, Submit):
                self._send_all(self.state.submit(command.pending, now))
            elif isinstance(command, Cancel):
                self._send_all(self.state.cancel(command.tid))
            elif isinstance(command, Status):
                self._send_all(self.state.status(command.request, command.future))
            elif isinstance(command, StatusWithdrawn):
                self.state.status_withdrawn(command.request)
            elif isinstance(command, Ack):
                self._send_all(self.state.ack(command.tid, command.seq))
            elif isinstance(command, Put):
                self.state.put(command.digest, command.meta, command.array)
            elif isinstance(command, Release):
                self.state.release(command.digest)
            elif isinstance(command, IterStart):
                self._send_all(self.state.iter_start(command.run, now))
            elif isinstance(command, IterStop):
                self._send_all(self.state.iter_stop(command.rid))
            else:
                self.closing = True
                self.channel.ring()  # the I/O thread must see it, even if a user thread runs this pass

    def _receive(self) -> None:
        for _ in range(READ_BATCH):
            if not readable(self.sock):  # cheaper than the zmq.Again a recv would raise
                return
            try:
                frames = recv_bounded(self.sock, P.read_cap(self.cfg.max_frames), head=3)
                self._send_all(self.state.on_message(frames, time.monotonic()))
            except zmq.Again:
                return
            except ProtocolError as exc:
                self.malformed.warning("dropped malformed message from broker: %s", exc)
            except Exception:  # a bug handling one message must not kill the I/O thread
                log.exception("error while handling a message from the broker")

    def _replace_socket(self) -> None:
        """The broker went silent: a half-open link would swallow everything, so start afresh."""
        self.watch.close()
        self.sock.close(linger=0)
        self.sock = self._new_socket()
        self.watch = LinkWatch(self.sock)

    def _send_all(self, messages: list[Frames]) -> None:
        for frames in messages:
            try:
                send_frames(self.sock, frames, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped.warning("broker link full: message dropped (tasks are resent after a reconnect)")
