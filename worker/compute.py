"""A compute process: runs handlers for the worker daemon, one task at a time.

The daemon binds a ROUTER on an ipc endpoint private to it; each compute process connects a
DEALER whose identity is its slot index, says HELLO, then loops: TASK in, RESULT or ERROR out.
Decoding and encoding happen here, so the daemon (and the broker) only move frames. A handler
exception becomes HANDLER_ERROR with its remote traceback; the process carries on. If the process
dies instead (segfault, OOM kill, ``kill -9``) the daemon sees its sentinel and reports CRASHED.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import traceback
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from ndpipe import protocol as P
from ndpipe.codec import Limits, decode_call, encode
from ndpipe.errors import ConfigError, DecodeError, EncodeError
from ndpipe.transport import configure, send_frames

log = logging.getLogger("ndpipe.compute")
Handler = Callable[..., Any]


def resolve(spec: str) -> Handler:
    """Import ``package.module:function`` (dotted attribute paths allowed after the colon)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"handler {spec!r}: expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"handler {spec!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(f"handler {spec!r}: {module_name!r} has no attribute {attr!r}") from exc
    if not callable(obj):
        raise ConfigError(f"handler {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the daemon dies, so no orphan keeps computing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def error_frames(tid: bytes, code: str, exc: BaseException, with_tb: bool = True) -> list[Any]:
    details = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)) if with_tb else "",
        "pid": os.getpid(),
    }
    return [P.C_ERROR, tid, code.encode(), msgpack.packb(details, use_bin_type=True, default=repr)]


def run_task(
    handlers: dict[str, Handler], tid: bytes, service: str, payload: list[Any], max_frames: int = P.MAX_FRAMES
) -> list[Any]:
    """Decode, call, encode; every failure becomes an error message, never an exception."""
    handler = handlers.get(service)
    if handler is None:
        return error_frames(tid, P.BAD_REQUEST, LookupError(f"this worker has no service {service!r}"), False)
    try:
        args, kwargs = decode_call(payload, Limits(max_frames=max_frames))
    except DecodeError as exc:
        return error_frames(tid, P.BAD_REQUEST, exc, False)
    try:
        result = handler(*args, **kwargs)
    except Exception as exc:
        return error_frames(tid, P.HANDLER_ERROR, exc)
    try:
        frames = encode(result)
        if len(frames) - 1 > max_frames:
            raise EncodeError(f"{len(frames) - 1} large arrays (buffer frames) exceed max_frames {max_frames}")
        return [P.C_RESULT, tid, *frames]
    except Exception as exc:  # EncodeError, or anything odd a result can do while being encoded
        wrapped = EncodeError(f"result of service {service!r} cannot be sent: {exc}")
        return error_frames(tid, P.HANDLER_ERROR, wrapped, False)


def main(endpoint: str, index: int, services: dict[str, str], parent: int, max_frames: int = P.MAX_FRAMES) -> None:
    """Process entry point (spawned by the daemon)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    handlers = {name: resolve(spec) for name, spec in services.items()}
    ctx = zmq.Context()
    sock = configure(ctx.socket(zmq.DEALER), hwm=1000)
    sock.setsockopt(zmq.ROUTING_ID, b"c%d" % index)
    sock.connect(endpoint)
    sock.send_multipart([P.C_HELLO, str(os.getpid()).encode()])
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:
                    return
                continue
            frames = sock.recv_multipart(copy=False)
            if len(frames) < 4 or frames[0].bytes != P.C_TASK:
                log.error("compute %d: unexpected message of %d frames", index, len(frames))
                continue
            tid, service = frames[1].bytes, frames[2].bytes.decode()
            send_frames(sock, run_task(handlers, tid, service, frames[3:], max_frames))
    finally:
        sock.close(linger=0)
        ctx.term()
