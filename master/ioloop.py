"""The master's I/O thread: one poll loop that alone owns the context and the DEALER socket.

User threads reach it only through a :class:`Channel` of small command dataclasses and a wake-up
pipe; what to do with each command, each broker message and the passing of time is decided by the
socket-free :class:`~ndpipe.master.state.MasterState`. The loop carries it out: send the frames the
state returns, open a new socket when it asks (the broker went silent), tell it when the socket
monitor saw the link drop and come back.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from ndpipe import protocol as P
from ndpipe.config import MasterConfig
from ndpipe.errors import NdpipeError, ProtocolError
from ndpipe.master.state import Frames, MasterState, Pending, resolve
from ndpipe.runtime import drain_pipe
from ndpipe.transport import LinkWatch, Throttle, configure, recv_bounded, send_frames

log = logging.getLogger("ndpipe.master")
READ_BATCH = 1024  # broker messages read per poll wake-up before the inbox and the clock get a turn


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
class Close:
    pass


Command = Submit | Cancel | Status | StatusWithdrawn | Close


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
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        except BaseException:
            self._wake_pending = False  # interrupted before the write: the next post must write
            raise

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

    def close(self) -> None:
        os.close(self.wake_r)
        os.close(self._wake_w)


class IOLoop:
    """Create it in the I/O thread (the socket must be made where it is used), then :meth:`run`."""

    def __init__(self, cfg: MasterConfig, endpoint: str, ident: bytes, hwm: int, channel: Channel) -> None:
        self.cfg = cfg
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
        self.malformed = Throttle(log)
        self.dropped = Throttle(log)

    def _new_socket(self) -> zmq.Socket[Any]:
        sock = configure(self.ctx.socket(zmq.DEALER), hwm=self.hwm, max_frame_bytes=-1)
        sock.setsockopt(zmq.ROUTING_ID, self.ident)  # kept across sockets: the broker knows us by it
        sock.connect(self.endpoint)
        return sock

    def run(self) -> None:
        poller = zmq.Poller()
        for fd in (self.channel.wake_r, self.sock, self.watch.monitor):
            poller.register(fd, zmq.POLLIN)
        while not self.closing:
            timeout = max(0.0, self.state.next_wake() - time.monotonic())
            events = dict(poller.poll(int(timeout * 1000)))
            if self.channel.wake_r in events:
                self.channel.woken()
            self._commands()
            if self.sock in events:
                self._receive()
            if self.watch.monitor in events and self.watch.came_back():
                self._send_all(self.state.link_came_back(time.monotonic()))
            tick = self.state.tick(time.monotonic())
            if tick.reconnect:
                self._replace_socket(poller)
            self._send_all(tick.send)
        self._send_all([[P.MASTER, P.BYE]])
        self.sock.close(linger=200)
        self.state.fail_all(NdpipeError("master closed before the task finished"))

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
            else:
                self.closing = True

    def _receive(self) -> None:
        for _ in range(READ_BATCH):
            try:
                frames = recv_bounded(self.sock, P.read_cap(self.cfg.max_frames), head=3)
                self._send_all(self.state.on_message(frames, time.monotonic()))
            except zmq.Again:
                return
            except ProtocolError as exc:
                self.malformed.warning("dropped malformed message from broker: %s", exc)
            except Exception:  # a bug handling one message must not kill the I/O thread
                log.exception("error while handling a message from the broker")

    def _replace_socket(self, poller: zmq.Poller) -> None:
        """The broker went silent: a half-open link would swallow everything, so start afresh."""
        poller.unregister(self.sock)
        poller.unregister(self.watch.monitor)
        self.watch.close()
        self.sock.close(linger=0)
        self.sock = self._new_socket()
        self.watch = LinkWatch(self.sock)
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)

    def _send_all(self, messages: list[Frames]) -> None:
        for frames in messages:
            try:
                send_frames(self.sock, frames, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped.warning("broker link full: message dropped (tasks are resent after a reconnect)")
