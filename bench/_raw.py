"""The raw-pyzmq baselines the benchmarks divide ndpipe by: nothing but libzmq on the way.

ndpipe makes 2 hops each way: master → broker → lane (a task crosses 4 process boundaries per
round trip; before lanes it made 3 hops, through the worker daemon). The baselines make 2 or, with
``relay=True``, 3:

* ``broker="proxy"`` (default): a DEALER client (this process) → a C ``zmq.proxy`` ROUTER/DEALER
  device (its own spawn process) → ``workers`` DEALER echo processes: 2 hops each way;
* ``relay=True`` puts a C ``zmq.proxy`` DEALER/DEALER relay process between the broker and the echo
  processes, where ndpipe had its worker daemon before lanes: 3 hops each way (the relay costs
  libzmq only);
* ``broker="python"`` replaces the proxy with a minimal pure-Python ROUTER/ROUTER broker (issue 3's
  floor for any broker in Python), with or without the relay.

All on ipc in a short temp dir, every HWM at 1,000,000 (a ROUTER drops what it cannot queue) and
linger 0. It generalises ``RawBaseline`` of ``w1.py`` to numpy payloads:

* a payload is ``bytes``, a numpy array, or a list of these (one frame each, sent as one multipart
  message). Parts of ``ZERO_COPY_MIN`` (64 KiB) or more are sent zero-copy (``send(arr, copy=False)``)
  and the replies received zero-copy; smaller ones are copied, which is cheaper (ndpipe's
  ``transport.send_frames`` draws the same line, so both sides pay the same per-frame costs);
* the echo receives with ``recv_multipart(copy=False)`` and sends the same frames back (libzmq
  reference counting, no copy); the client rebuilds each array with ``np.frombuffer`` (no copy) and
  checks it cheaply: dtype, shape and the first and last element (:func:`same`). Where the
  benchmark checks ndpipe's results after its clock stops, it passes ``check_after=True`` so the
  raw replies are kept and checked after the clock stops too;
* ``handler="module:function"`` makes the echo processes run that function instead: it gets the
  payload frames (a list of ``zmq.Frame``; ``.bytes`` / ``.buffer`` read them) and returns the frames
  to send back (bytes, buffers, numpy arrays or the ``zmq.Frame`` s it got). With a handler the
  replies are not checked against the payload (they need not be equal).

:meth:`RawBaseline.run` / :meth:`RawBaseline.run_for` measure a pipelined batch (at most ``window``
in flight), :meth:`RawBaseline.roundtrip` one sequential call, :meth:`RawBaseline.echo` returns a
reply for a full check outside the timing. The process targets live in this importable module so
``spawn`` can pickle them however the benchmark was started; every process is stopped by pid.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import zmq

from ndpipe.bench._common import stop_process
from ndpipe.transport import ZERO_COPY_MIN

RAW_HWM = 1_000_000
PROBE = b"\x00ndpipe-raw-probe"  # echo processes answer this with their pid
PAYLOAD = b"x" * 64
STALL_TIMEOUT_MS = 120_000  # a 64 MiB message there and back on a loaded VM can take seconds
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)  # pyzmq enum flags cost ~0.5 µs per `|`

Part = bytes | memoryview | np.ndarray
Payload = Part | Sequence[Part]
Handler = Callable[[list[zmq.Frame]], Sequence[Any]]


def resolve_handler(spec: str) -> Handler:
    """Import ``package.module:function`` (the same form as ndpipe's service handlers)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"handler {spec!r}: expected 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for name in attr.split("."):
        obj = getattr(obj, name)
    if not callable(obj):
        raise TypeError(f"handler {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _size(part: Any) -> int:
    return part.nbytes if isinstance(part, (memoryview, np.ndarray)) else len(part)


def send_parts(sock: zmq.Socket[Any], parts: Sequence[Any]) -> None:
    """One multipart message; received frames are re-sent by reference, big buffers zero-copy."""
    last = len(parts) - 1
    for i, part in enumerate(parts):
        more = _SNDMORE if i < last else 0
        if isinstance(part, zmq.Frame):
            sock.send(part, more, copy=False)
        else:
            sock.send(part, more, copy=_size(part) < ZERO_COPY_MIN)


# ---- spawn process targets ----------------------------------------------------------------------
def _socket(ctx: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.sndhwm = sock.rcvhwm = RAW_HWM
    sock.linger = 0
    return sock


def _proxy_main(front: str, back: str) -> None:
    ctx = zmq.Context()
    router, dealer = _socket(ctx, zmq.ROUTER), _socket(ctx, zmq.DEALER)
    router.bind(front)
    dealer.bind(back)
    zmq.proxy(router, dealer)  # C loop; ends with the process (SIGTERM)


def _relay_main(front: str, back: str) -> None:
    """The hop ndpipe's worker daemon makes, in C: a DEALER to the broker, a DEALER to the echoes."""
    ctx = zmq.Context()
    upstream, downstream = _socket(ctx, zmq.DEALER), _socket(ctx, zmq.DEALER)
    upstream.connect(front)
    downstream.bind(back)
    zmq.proxy(upstream, downstream)  # envelopes pass through unchanged, both ways


READY = b"READY"  # an echo's first message to the Python broker (the C proxy never sees one)


def _pybroker_main(front: str, back: str) -> None:
    """The minimal pure-Python ROUTER/ROUTER broker of issue 3's table: requests go round robin to
    the workers that said READY (queued while there are none), replies go back by client id. No
    heartbeats, no requeue, no bookkeeping: the floor for any broker written in Python."""
    ctx = zmq.Context()
    frontend, backend = _socket(ctx, zmq.ROUTER), _socket(ctx, zmq.ROUTER)
    frontend.bind(front)
    backend.bind(back)
    workers: list[bytes] = []
    waiting: deque[list[Any]] = deque()
    turn = 0
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if backend in events:
            while int(backend.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                frames = backend.recv_multipart(copy=False)  # [worker id, client id, payload...]
                if len(frames) == 2 and frames[1].bytes == READY:
                    workers.append(frames[0].bytes)
                    while waiting:
                        turn = (turn + 1) % len(workers)
                        backend.send_multipart([workers[turn], *waiting.popleft()], copy=False)
                else:
                    frontend.send_multipart(frames[1:], copy=False)
        if frontend in events:
            while int(frontend.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                frames = frontend.recv_multipart(copy=False)  # [client id, payload...]
                if not workers:
                    waiting.append(frames)
                    continue
                turn = (turn + 1) % len(workers)
                backend.send_multipart([workers[turn], *frames], copy=False)


def _echo_main(back: str, handler: str | None, ready: bool = False) -> None:
    fn = resolve_handler(handler) if handler else None
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    sock.connect(back)
    if ready:
        sock.send(READY)
    pid = str(os.getpid()).encode()
    while True:
        frames = sock.recv_multipart(copy=False)  # [client routing id, payload frames...]
        body = frames[1:]
        if len(body) == 1 and len(body[0]) == len(PROBE) and body[0].bytes == PROBE:
            sock.send_multipart([frames[0], pid])
        elif fn is None:
            send_parts(sock, frames)
        else:
            send_parts(sock, [frames[0], *fn(body)])


# ---- the client ---------------------------------------------------------------------------------
def same(got: Any, want: Any) -> bool:
    """A cheap equality check: for arrays dtype, shape, first and last element; bytes compared whole."""
    if isinstance(want, np.ndarray):
        if not isinstance(got, np.ndarray) or got.dtype != want.dtype or got.shape != want.shape:
            return False
        return want.size == 0 or bool(got.flat[0] == want.flat[0] and got.flat[-1] == want.flat[-1])
    return bytes(got) == bytes(want)


class _Message:
    """A payload prepared once per measurement: its parts, how to send them, how to read a reply."""

    def __init__(self, payload: Payload, check: bool) -> None:
        single = isinstance(payload, (bytes, memoryview, np.ndarray))
        raw_parts: list[Any] = [payload] if single else list(payload)
        self.parts: list[Any] = [np.ascontiguousarray(p) if isinstance(p, np.ndarray) else p for p in raw_parts]
        self.copies = [_size(p) < ZERO_COPY_MIN for p in self.parts]
        self.copy_reply = all(self.copies)  # a reply with any big part is received zero-copy
        self.check = check

    def send(self, sock: zmq.Socket[Any]) -> None:
        if len(self.parts) == 1:
            sock.send(self.parts[0], 0, copy=self.copies[0])
            return
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            sock.send(part, _SNDMORE if i < last else 0, copy=self.copies[i])

    def recv(self, sock: zmq.Socket[Any], flags: int = 0) -> list[Any]:
        if len(self.parts) == 1 and self.check:
            return [sock.recv(flags, copy=self.copy_reply)]
        return sock.recv_multipart(flags, copy=self.copy_reply)

    def rebuild(self, reply: list[Any]) -> list[Any]:
        """The reply's parts as the payload's types: arrays via ``np.frombuffer`` (no copy), else bytes."""
        if len(reply) != len(self.parts):
            raise AssertionError(f"raw echo returned {len(reply)} frames for {len(self.parts)}")
        out: list[Any] = []
        for frame, want in zip(reply, self.parts, strict=True):
            buf = frame.buffer if isinstance(frame, zmq.Frame) else frame
            if isinstance(want, np.ndarray):
                if len(buf) != want.nbytes:
                    raise AssertionError(f"raw echo returned {len(buf)} bytes for an array of {want.nbytes}")
                out.append(np.frombuffer(buf, want.dtype).reshape(want.shape))
            else:
                out.append(bytes(buf))
        return out

    def verify(self, reply: list[Any]) -> None:
        if self.check:
            for got, want in zip(self.rebuild(reply), self.parts, strict=True):
                if not same(got, want):
                    raise AssertionError("raw echo returned a different payload")


class RawBaseline:
    """The broker (C proxy or minimal Python), optionally a relay, and ``workers`` echo processes
    (running ``handler``, default identity).

    >>> with RawBaseline(workers=2, relay=True) as raw:              # doctest: +SKIP
    ...     seconds = raw.run(10_000, window=1000)
    """

    def __init__(self, workers: int = 2, handler: str | None = None, broker: str = "proxy",
                 relay: bool = False) -> None:
        if handler is not None:
            resolve_handler(handler)  # fail here, not silently inside a spawn process
        if broker not in ("proxy", "python"):
            raise ValueError(f"broker must be 'proxy' (C zmq.proxy) or 'python' (minimal Python), got {broker!r}")
        self.broker = broker
        self.workers = workers
        self.handler = handler
        self.relay = relay
        self.ctx = mp.get_context("spawn")
        self.proxy: BaseProcess | None = None
        self.relay_proc: BaseProcess | None = None
        self.echoes: list[BaseProcess] = []
        self.tmp = ""
        self.zctx: zmq.Context[Any] | None = None
        self.sock: zmq.Socket[Any] | None = None

    def __enter__(self) -> RawBaseline:
        self.tmp = tempfile.mkdtemp(prefix="ndpr-")  # short: ipc paths must fit in 107 bytes
        front, back = f"ipc://{self.tmp}/f", f"ipc://{self.tmp}/b"
        try:
            python = self.broker == "python"
            self.proxy = self.ctx.Process(target=_pybroker_main if python else _proxy_main, args=(front, back),
                                          name=f"raw-{self.broker}")
            self.proxy.start()
            if self.relay:
                self.relay_proc = self.ctx.Process(target=_relay_main, args=(back, f"ipc://{self.tmp}/r"),
                                                   name="raw-relay")
                self.relay_proc.start()
                back = f"ipc://{self.tmp}/r"
            for i in range(self.workers):
                proc = self.ctx.Process(target=_echo_main, args=(back, self.handler, python), name=f"raw-echo-{i}")
                proc.start()
                self.echoes.append(proc)
            self.zctx = zmq.Context()
            self.sock = _socket(self.zctx, zmq.DEALER)
            self.sock.connect(front)
            self._wait_all_echoes()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the client socket, stop the echo processes and the proxy, remove the temp dir. Idempotent."""
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.zctx is not None:
            self.zctx.term()
            self.zctx = None
        for proc in [*self.echoes, self.relay_proc, self.proxy]:
            if proc is not None:
                stop_process(proc)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""

    @property
    def _sock(self) -> zmq.Socket[Any]:
        if self.sock is None:
            raise RuntimeError("RawBaseline is not started (use it as a context manager)")
        return self.sock

    @property
    def socket(self) -> zmq.Socket[Any]:
        """The client DEALER, for a benchmark that drives its own message pattern (``_rawbatch``)."""
        return self._sock

    @property
    def hops(self) -> int:
        """Hops each way between the client and an echo process: 2, or 3 with the relay (ndpipe: 3)."""
        return 3 if self.relay else 2

    @property
    def path(self) -> str:
        """The hops, spelled out, for the printed headers."""
        broker = "Python broker" if self.broker == "python" else "C zmq.proxy"
        return f"client → {broker}{' → C relay' if self.relay else ''} → echo ({self.hops} hops each way)"

    def _wait_all_echoes(self, timeout: float = 60.0) -> None:
        """Probe until every echo process has answered (so no early connecter gets the whole batch)."""
        sock = self._sock
        seen: set[bytes] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < self.workers:
            procs = [self.proxy, self.relay_proc, *self.echoes]
            dead = [p.name for p in procs if p is not None and p.exitcode is not None]
            if dead:
                raise RuntimeError(f"raw baseline process(es) exited early: {dead}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(seen)} of {self.workers} echo processes answered")
            sock.send(PROBE)
            if sock.poll(100):
                while sock.poll(0):
                    seen.add(sock.recv())
        time.sleep(0.1)
        while sock.poll(50):  # late probe answers
            sock.recv()

    # ---- measurements ---------------------------------------------------------------------------
    def _pipeline(self, msg: _Message, n: int, window: int, seconds: float | None, min_tasks: int,
                  check_after: bool = False) -> tuple[int, float]:
        sock = self._sock
        kept: list[list[Any]] = []  # with check_after: the replies, checked once the clock has stopped
        sent = received = 0
        limit = n
        deadline = None if seconds is None else time.perf_counter() + seconds
        t0 = time.perf_counter()
        while received < limit:
            while sent < limit and sent - received < window:
                msg.send(sock)
                sent += 1
            if not sock.poll(STALL_TIMEOUT_MS):
                raise TimeoutError(f"raw baseline stalled at {received}/{sent} replies")
            while received < sent:
                try:
                    reply = msg.recv(sock, _NOBLOCK)
                except zmq.Again:
                    break
                if check_after:
                    kept.append(reply)
                else:
                    msg.verify(reply)
                received += 1
            if deadline is not None and sent >= min_tasks and limit > sent and time.perf_counter() >= deadline:
                limit = sent  # time is up: stop sending, collect what is in flight
        elapsed = time.perf_counter() - t0
        for reply in kept:
            msg.verify(reply)
        return received, elapsed

    def run(self, n: int, window: int, payload: Payload = PAYLOAD, check_after: bool = False) -> float:
        """Send ``n`` payloads with at most ``window`` in flight; return elapsed seconds. Each reply is
        checked as it arrives, or (``check_after``) kept and checked after the clock stops."""
        msg = _Message(payload, self.handler is None)
        return self._pipeline(msg, n, window, None, n, check_after)[1]

    def run_for(self, seconds: float, window: int, payload: Payload = PAYLOAD, min_tasks: int = 1) -> tuple[int, float]:
        """Like :meth:`run`, sending until ``seconds`` have passed (and ``min_tasks`` were sent);
        return (tasks done, elapsed seconds including the drain of those in flight)."""
        return self._pipeline(_Message(payload, self.handler is None), 2**62, window, seconds, min_tasks)

    def roundtrip(self, payload: Payload = PAYLOAD) -> float:
        """One sequential call: send, wait for the reply, check it cheaply; return elapsed seconds."""
        msg = _Message(payload, self.handler is None)
        sock = self._sock
        t0 = time.perf_counter()
        msg.send(sock)
        if not sock.poll(STALL_TIMEOUT_MS):
            raise TimeoutError("raw baseline: no reply")
        msg.verify(msg.recv(sock))
        return time.perf_counter() - t0

    def roundtrips(self, n: int, payload: Payload = PAYLOAD) -> list[float]:
        """``n`` sequential calls; the seconds of each, from send to reply (each reply is checked
        after its clock stops, as W2/W3 check ndpipe's)."""
        msg = _Message(payload, self.handler is None)
        sock = self._sock
        out: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            msg.send(sock)
            if not sock.poll(STALL_TIMEOUT_MS):
                raise TimeoutError("raw baseline: no reply")
            reply = msg.recv(sock)
            out.append(time.perf_counter() - t0)
            msg.verify(reply)
        return out

    def echo(self, payload: Payload = PAYLOAD) -> list[Any]:
        """One call, untimed: the reply's parts rebuilt (arrays with ``np.frombuffer``), for a full check."""
        msg = _Message(payload, check=False)
        sock = self._sock
        msg.send(sock)
        if not sock.poll(STALL_TIMEOUT_MS):
            raise TimeoutError("raw baseline: no reply")
        reply = msg.recv(sock)
        if self.handler is not None:
            return [f.bytes if isinstance(f, zmq.Frame) else f for f in reply]
        return msg.rebuild(reply)

    def pids(self) -> dict[str, list[int]]:
        """{"broker": [proxy pid], "workers": [relay pid], "compute": [echo pids]}, the roles of
        Cluster.pids() (the relay stands where ndpipe's worker daemon does)."""
        proxy = [self.proxy.pid] if self.proxy is not None and self.proxy.pid is not None else []
        relay = [self.relay_proc.pid] if self.relay_proc is not None and self.relay_proc.pid is not None else []
        return {"broker": proxy, "workers": relay, "compute": [p.pid for p in self.echoes if p.pid is not None]}
