"""Socket set-up and framing helpers shared by broker, worker and master.

Defaults that bite (ANCHORS §3) are set here once: LINGER 0 so ``close`` never hangs, explicit
high-water marks, MAXMSGSIZE per frame, ROUTER_MANDATORY so an unknown peer raises instead of
silently dropping, and a frame-count cap enforced while reading.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from ndpipe import msgcost
from ndpipe import protocol as P
from ndpipe.errors import ProtocolError

OBJECT_FLOOR = 16 * 1024 * 1024  # a control map may always decode to this much (as codec.Limits)
ZERO_COPY_MIN = 64 * 1024  # below this, copying a frame is cheaper than zero-copy (pyzmq #1032)
# Plain ints: pyzmq's enum flags cost ~0.5 µs per `|`, and `sock.rcvmore` ~2 µs per frame.
_NOBLOCK, _SNDMORE, _RCVMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.RCVMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def unresolved(endpoint: str) -> str:
    """Why a tcp:// endpoint's host cannot be connected to at all ("host 'x' does not resolve: …"), or
    "" (it resolves, is a literal address, or is not tcp). libzmq retries such a connect silently
    forever, so a peer that never answers asks here once, when it first notices the silence."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or host == "*":
        return ""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return ""
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, port or None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        return f"host {host!r} does not resolve: {getattr(exc, 'strerror', None) or exc}"
    return ""


def readable(sock: zmq.Socket[Any]) -> bool:
    """A message is waiting. Cheaper than a NOBLOCK recv that ends in zmq.Again: pyzmq builds that
    exception (and an Errno enum) for every empty read, ~5 µs each on the broker's hot path."""
    return bool(int(sock.get(_EVENTS)) & _POLLIN)


def configure(
    sock: zmq.Socket[Any], hwm: int = P.HWM, max_frame_bytes: int = -1, router: bool = False,
    handover: bool = True,
) -> zmq.Socket[Any]:
    """Apply ndpipe's socket defaults; ``router`` adds ROUTER_MANDATORY and (unless ``handover`` is
    false) ROUTER_HANDOVER, which lets a reconnecting peer take over its routing id — and so lets
    anyone who can connect take over anyone's."""
    sock.linger = 0
    sock.sndhwm = hwm
    sock.rcvhwm = hwm
    if max_frame_bytes > 0:
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    if router:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    return sock


class TooManyFrames(ProtocolError):
    """A message over the frame cap; ``head`` keeps its first frames so the receiver can still
    name the task in an error reply."""

    def __init__(self, message: str, head: list[zmq.Frame]) -> None:
        super().__init__(message)
        self.head = head


def recv_bounded(sock: zmq.Socket[Any], max_frames: int, head: int = 0,
                 header: bytes | tuple[bytes, ...] | None = None, at: int = 1) -> list[Any]:
    """Read one multipart message without blocking, refusing more than ``max_frames`` frames.

    The first ``head`` frames (routing id, header, command, task id: always small) come back as
    ``bytes``, the rest as ``zmq.Frame`` so payloads stay zero-copy; a Frame object costs a few µs
    more than bytes, on every hop of every message. With ``header``, a message whose frame ``at``
    is not that protocol header (or one of them) is drained as plain bytes and refused at once: a flood of garbage
    costs the reader as little as possible, so it cannot fall behind and pile messages up.

    Raises ``zmq.Again`` when nothing is waiting, ``ProtocolError`` (after draining the rest of
    the message, so the stream stays aligned) when the cap is exceeded or the header is wrong.
    """
    return _read_rest(sock, [sock.recv(_NOBLOCK, copy=head > 0)], max_frames, head, header, at)


def recv_keyed(sock: zmq.Socket[Any], max_frames: int, head: int = 0,
               header: bytes | tuple[bytes, ...] | None = None, at: int = 1) -> tuple[list[Any], bytes]:
    """:func:`recv_bounded` on a CURVE server socket: also the sender's public key (Z85), which ZAP
    authenticated and libzmq attached to the message (its User-Id). The routing id comes back as bytes."""
    first = sock.recv(_NOBLOCK, copy=False)
    try:
        key = str(first.get("User-Id")).encode()
    except zmq.ZMQError:  # no ZAP answer attached one: nobody's key
        key = b""
    return _read_rest(sock, [first.bytes], max_frames, head, header, at), key


def _read_rest(sock: zmq.Socket[Any], frames: list[Any], max_frames: int, head: int,
               header: bytes | tuple[bytes, ...] | None, at: int) -> list[Any]:
    headers = (header,) if isinstance(header, bytes) else header
    too_many = False
    while sock.get(_RCVMORE):
        if headers is not None and len(frames) == at + 1 and frames[at] not in headers:
            while sock.get(_RCVMORE):
                sock.recv()
            raise ProtocolError(f"bad protocol header {frame_bytes(frames[at])[:16]!r}, expected {header!r}")
        frame = sock.recv(copy=len(frames) < head)
        if len(frames) < max_frames:
            frames.append(frame)
        else:
            too_many = True
    if too_many:
        raise TooManyFrames(f"message has more than {max_frames} frames", frames[:8])
    return frames


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send a multipart message; large buffers go zero-copy, small ones are copied."""
    last = len(frames) - 1
    flags = int(flags)
    for i, frame in enumerate(frames):
        more = _SNDMORE if i < last else 0
        if isinstance(frame, zmq.Frame):
            sock.send(frame, flags | more, copy=False)
        else:
            size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
            sock.send(frame, flags | more, copy=size < ZERO_COPY_MIN)


def frame_bytes(frame: Any) -> bytes:
    """The bytes of a frame, whatever its type."""
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def unpack_map(raw: bytes, limit: int = P.CONTROL_MAX) -> dict[str, Any]:
    """Decode a small control map (READY info, stats, error details) with explicit msgpack limits.

    Raises ProtocolError for anything that is not a msgpack map within ``limit`` bytes.
    """
    if len(raw) > limit:
        raise ProtocolError(f"control map of {len(raw)} bytes exceeds {limit}")
    size = len(raw)
    try:
        if size > msgcost.SMALL:  # ERROR details may be 16 MiB at a master: bound their objects too (§4.4)
            msgcost.estimate(raw, max(OBJECT_FLOOR, 16 * size))
        value = msgpack.unpackb(raw, raw=False, max_str_len=limit, max_bin_len=limit,
                                max_array_len=min(limit, size), max_map_len=min(limit, size // 2), max_ext_len=0,
                                strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"control map is not valid msgpack: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"control frame is a {type(value).__name__}, not a msgpack map")
    return value


class Throttle:
    """At most one log line per ``every`` seconds for a recurring problem, with a running count,
    so a flood of garbage cannot flood the journal too."""

    def __init__(self, log: logging.Logger, every: float = 5.0) -> None:
        self.log = log
        self.every = every
        self.count = 0
        self._next = 0.0

    def warning(self, msg: str, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now >= self._next:
            self.log.warning(msg + " (%d so far)", *args, self.count)
            self._next = now + self.every


class Repeats:
    """Which failures earn an INFO line: the first of each kind (service, code, exception type), then at
    most one a second with the count of those since, so a master sending bad input to every task does
    not turn each lane's journal into a copy of its traffic (each one is still at DEBUG)."""

    EVERY = 1.0

    def __init__(self) -> None:
        self._next: dict[Any, float] = {}
        self._skipped: dict[Any, int] = {}
        self._last: Any = None

    def due(self, kind: Any) -> bool:
        kind = repr(kind)
        now, self._last = time.monotonic(), kind
        if now >= self._next.get(kind, 0.0):
            if len(self._next) > 1000:  # kinds are user data: bounded
                self._next.clear()
                self._skipped.clear()
            self._next[kind] = now + self.EVERY
            return True
        self._skipped[kind] = self._skipped.get(kind, 0) + 1
        return False

    def since(self) -> str:
        """For the line just allowed: how many of its kind were not logged at INFO before it."""
        skipped = self._skipped.pop(self._last, 0)
        return f" ({skipped} more like it since the last such line)" if skipped else ""


class LinkWatch:
    """Notices when a connect-side socket's link dropped and came back.

    ZeroMQ reconnects silently, and messages in flight at the drop are lost both ways. A master
    keeps its routing id across reconnects, so the broker cannot tell either: the master must
    resend its outstanding tasks itself when the link returns.
    """

    EVENTS = int(zmq.EVENT_DISCONNECTED) | int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    FAILED = {int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "the broker refused this program's key",
              int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "the handshake failed (a broker with another key, "
                                                        "or curve on at one end only)",
              int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "the handshake failed"}

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(self.EVENTS | sum(self.FAILED))
        self.dropped = False
        self.refused = ""  # why the last handshake failed, until one succeeds: the likely reason for silence

    def came_back(self) -> bool:
        """Read pending events; True when a handshake completed after a drop."""
        back = False
        while True:
            try:
                event = recv_monitor_message(self.monitor, _NOBLOCK)["event"]
            except zmq.Again:
                return back
            if event == zmq.EVENT_DISCONNECTED:
                self.dropped = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.refused = ""
                if self.dropped:
                    self.dropped, back = False, True
            elif event in self.FAILED:
                self.refused = self.FAILED[event]

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
