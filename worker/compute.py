"""A compute process: runs handlers for the worker daemon, one task at a time.

The daemon binds a ROUTER on an ipc endpoint private to its uid; each compute process connects a
DEALER whose identity is its slot index and a token fresh for each spawn, says HELLO, then loops:
TASK in, RESULT or ERROR out.
Decoding and encoding happen here, so the daemon (and the broker) only move frames. A handler
exception becomes HANDLER_ERROR with its remote traceback; the process carries on. If the process
dies instead (segfault, OOM kill, ``kill -9``) the daemon sees its sentinel and reports CRASHED.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import resource
import signal
import traceback
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from ndpipe import protocol as P
from ndpipe.codec import DEFAULT_LIMITS, Limits, decode_batch, decode_call, encode
from ndpipe.errors import ConfigError, DecodeError, EncodeError
from ndpipe.transport import configure, send_frames

log = logging.getLogger("ndpipe.compute")
_limits = {"max_frame_bytes": P.MAX_FRAME_BYTES}  # set by main() from worker.max_frame_bytes
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


def error_details(exc: BaseException, with_tb: bool = True) -> dict[str, Any]:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)) if with_tb else "",
        "pid": os.getpid(),
    }


def error_frames(tid: bytes, code: str, exc: BaseException, with_tb: bool = True) -> list[Any]:
    details = error_details(exc, with_tb)
    return [P.C_ERROR, tid, code.encode(), msgpack.packb(details, use_bin_type=True, default=repr)]


def run_task(
    handlers: dict[str, Handler], tid: bytes, service: str, payload: list[Any], max_frames: int = P.MAX_FRAMES,
    flags: int = 0,
) -> list[Any]:
    """Decode, call, encode; every failure becomes an error message, never an exception."""
    handler = handlers.get(service)
    if handler is None:
        return error_frames(tid, P.BAD_REQUEST, LookupError(f"this worker has no service {service!r}"), False)
    if flags & P.FLAG_BATCH:
        return run_batch(handler, tid, service, payload, max_frames)
    try:
        args, kwargs = decode_call(payload, Limits(max_frames=max_frames))
    except DecodeError as exc:
        return error_frames(tid, P.BAD_REQUEST, exc, False)
    try:
        result = handler(*args, **kwargs)
    except MemoryError:
        raise  # the process's memory is exhausted: main() exits and the daemon reports it
    except Exception as exc:
        return error_frames(tid, P.HANDLER_ERROR, exc)
    try:
        frames = encode(result)
        _check_sizes(frames, max_frames)
        return [P.C_RESULT, tid, *frames]
    except Exception as exc:  # EncodeError, or anything odd a result can do while being encoded
        wrapped = EncodeError(f"result of service {service!r} cannot be sent: {exc}")
        return error_frames(tid, P.HANDLER_ERROR, wrapped, False)


def _check_sizes(frames: list[Any], max_frames: int) -> None:
    """Refuse here what would break the way back: a frame over worker.max_frame_bytes makes libzmq
    cut the link (the task would then crash every worker in turn), a header over the master's
    decoder limit would be refused there (a batch is then split by the master and retried)."""
    if len(frames) - 1 > max_frames:
        raise EncodeError(f"{len(frames) - 1} large arrays (buffer frames) exceed max_frames {max_frames}")
    for i, frame in enumerate(frames):
        size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        if size > _limits["max_frame_bytes"]:
            raise EncodeError(f"a result frame of {size} bytes exceeds worker.max_frame_bytes = "
                              f"{_limits['max_frame_bytes']}")
        if i == 0 and size > DEFAULT_LIMITS.max_header_bytes:
            raise EncodeError(f"a result header of {size} bytes exceeds the master's limit of "
                              f"{DEFAULT_LIMITS.max_header_bytes} (max_header_bytes)")


def _encode_result(tid: bytes, result: Any, max_frames: int) -> list[Any] | str:
    """C_RESULT frames, or why the value cannot be sent within the limits."""
    try:
        frames = encode(result)
        _check_sizes(frames, max_frames)
    except Exception as exc:  # EncodeError, or anything odd a value can do while being encoded
        return str(exc)
    return [P.C_RESULT, tid, *frames]


def run_batch(handler: Handler, tid: bytes, service: str, payload: list[Any], max_frames: int) -> list[Any]:
    """Run every call of a batch in order; a raising call fails alone.

    The result is ``[values, errors]``: one value per call in call order (None where it failed) and
    ``{index: [code, details]}`` for the calls that failed. A value that cannot be encoded becomes
    that call's error; if the whole batch still exceeds ``max_frames`` (too many large arrays for one
    message) the batch fails as a whole and the master resubmits its calls one by one.
    """
    try:
        calls, kwargs = decode_batch(payload, Limits(max_frames=max_frames))
    except DecodeError as exc:
        return error_frames(tid, P.BAD_REQUEST, exc, False)
    values: list[Any] = []
    errors: dict[int, list[Any]] = {}
    for args in calls:
        try:
            values.append(handler(*args, **kwargs))
        except MemoryError:
            raise
        except Exception as exc:
            errors[len(values)] = [P.HANDLER_ERROR, error_details(exc)]
            values.append(None)
    frames = _encode_result(tid, [values, errors], max_frames)
    if isinstance(frames, str):  # find the values that cannot travel (slow path, errors only)
        for i, value in enumerate(values):
            problem = _encode_result(tid, value, max_frames) if i not in errors else None
            if isinstance(problem, str):
                why = EncodeError(f"result of service {service!r} (batch call {i}) cannot be sent: {problem}")
                errors[i], values[i] = [P.HANDLER_ERROR, error_details(why, False)], None
        frames = _encode_result(tid, [values, errors], max_frames)
    if isinstance(frames, str):
        why = EncodeError(f"the {len(values)} results of a batch of service {service!r} cannot be sent "
                          f"together ({frames}); the master resubmits them one by one")
        return error_frames(tid, P.HANDLER_ERROR, why, False)
    return frames


def limit_memory(limit: int) -> None:
    """Cap this process's address space (RLIMIT_AS) so a runaway handler fails here, alone, with
    MemoryError, instead of dragging the host into the kernel's OOM killer."""
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def routing_id(index: int, token: str) -> bytes:
    """A compute process's identity on the daemon's socket: its slot and a token fresh for each spawn."""
    return b"c%d-%s" % (index, token.encode())


def main(endpoint: str, ident: bytes, services: dict[str, str], parent: int, max_frames: int = P.MAX_FRAMES,
         memory_limit: int = 0, max_frame_bytes: int = P.MAX_FRAME_BYTES) -> None:
    """Process entry point (spawned by the daemon)."""
    index = int(ident[1:].split(b"-")[0])
    die_with_parent()
    _limits["max_frame_bytes"] = max_frame_bytes
    limit_memory(memory_limit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    handlers = {name: resolve(spec) for name, spec in services.items()}
    ctx = zmq.Context()
    sock = configure(ctx.socket(zmq.DEALER), hwm=P.COMPUTE_HWM)
    sock.setsockopt(zmq.ROUTING_ID, ident)
    sock.connect(endpoint)
    sock.send_multipart([P.C_HELLO, str(os.getpid()).encode()])
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:
                    return
                continue
            frames = sock.recv_multipart(copy=False)
            if len(frames) < 5 or frames[0].bytes != P.C_TASK or len(frames[3].bytes) != P.FLAGS.size:
                log.error("compute %d: unexpected message of %d frames", index, len(frames))
                continue
            tid, service = frames[1].bytes, frames[2].bytes.decode()
            (flags,) = P.FLAGS.unpack(frames[3].bytes)
            try:
                reply = run_task(handlers, tid, service, frames[4:], max_frames, flags)
            except MemoryError:
                # Exhausted memory leaves a process in no state to go on: exit with a status the
                # daemon turns into a CRASHED report that says why (retried, then MAX_ATTEMPTS).
                sock.close(linger=1000)  # the previous answer may still be in the socket: send it first
                os._exit(P.EXIT_OUT_OF_MEMORY)
            send_frames(sock, reply)
    finally:
        sock.close(linger=0)
        ctx.term()
