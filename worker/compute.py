"""What a lane does with one task: decode, call the handler, encode; and the helpers around it.

A handler exception becomes HANDLER_ERROR with its remote traceback, an undecodable payload
BAD_REQUEST naming the problem, a result that cannot travel HANDLER_ERROR saying why; nothing
here raises except MemoryError (the lane then exits and its daemon reports it). The loop around
this is :mod:`ndpipe.worker.lane`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import resource
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from ndpipe import protocol as P
from ndpipe.codec import DEFAULT_LIMITS, Limits, RefResolver, decode, decode_batch, decode_call, encode
from ndpipe.errors import ConfigError, DecodeError, EncodeError

log = logging.getLogger("ndpipe.compute")
_limits = {"max_frame_bytes": P.MAX_FRAME_BYTES}  # set by main() from worker.max_frame_bytes
Handler = Callable[..., Any]
MAX_TRACEBACK = 16_000  # characters of constructors' tracebacks that travel in one LANE (each one's tail)


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


def add_app_dir(path: str | None, key: str = "worker.app_dir") -> None:
    """Put ``path`` first on sys.path (once), so handlers and jobs import from it; spawned lanes inherit
    the parent's sys.path. ConfigError naming ``key`` if it is not a directory."""
    if path is None:
        return
    folder = os.path.abspath(path)
    if not os.path.isdir(folder):
        raise ConfigError(f"{key}: {path} is not a directory")
    if folder not in sys.path:
        sys.path.insert(0, folder)


def check_service(name: str, spec: str, init: dict[str, Any] | None) -> None:
    """What the daemon can check without running user code: the handler imports, and ``init``
    goes with a class whose instances can be called."""
    obj = resolve(spec)
    if not inspect.isclass(obj):
        if init is not None:
            raise ConfigError(f"service {name!r}: init is for a class handler (a resident service); "
                              f"{spec!r} is a {type(obj).__name__}")
        return
    if not any("__call__" in vars(klass) for klass in obj.__mro__):
        raise ConfigError(f"service {name!r}: class {spec!r} has no __call__ method, so its instance "
                          "cannot run tasks")


def build_services(specs: dict[str, str], inits: dict[str, dict[str, Any]],
                   memory_limit: int = 0) -> tuple[dict[str, Handler], dict[str, dict[str, Any]]]:
    """(handlers, broken) for a lane: a function as it is; a class constructed once here with its
    ``init``. A constructor that raises leaves that service broken (name -> error details, with the
    traceback) instead of ending the lane, so a bad model never crash-loops a worker and the broker
    can tell its callers why."""
    handlers: dict[str, Handler] = {}
    broken: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        obj = resolve(spec)
        if not inspect.isclass(obj):
            handlers[name] = obj
            continue
        try:
            handlers[name] = cast(Handler, obj(**inits.get(name, {})))
        except MemoryError:
            why = MemoryError(f"the constructor of {spec!r} exceeded worker.memory_limit = {memory_limit} bytes")
            broken[name] = error_details(why, False)
        except Exception as exc:
            broken[name] = error_details(exc)
    for details in broken.values():  # the tails: LANE must stay a small control message however many broke
        details["message"] = details["message"][:500]
        details["traceback"] = details["traceback"][-max(200, MAX_TRACEBACK // len(broken)):]
    return handlers, broken


def error_details(exc: BaseException, with_tb: bool = True) -> dict[str, Any]:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)) if with_tb else "",
        "pid": os.getpid(),
    }


def error_frames(tid: bytes, code: str, exc: BaseException, with_tb: bool = True) -> list[Any]:
    details = error_details(exc, with_tb)
    return [P.W_ERROR, tid, code.encode(), msgpack.packb(details, use_bin_type=True, default=repr)]


def run_task(
    handlers: dict[str, Handler], tid: bytes, service: str, payload: list[Any], max_frames: int = P.MAX_FRAMES,
    flags: int = 0, refs: RefResolver | None = None,
) -> list[Any]:
    """Decode (``refs`` turns array refs into arrays), call, encode; every failure becomes an error
    message, never an exception."""
    handler = handlers.get(service)
    if handler is not None and flags & P.FLAG_BATCH:
        return run_batch(handler, tid, service, payload, max_frames, refs)
    called = _call(handler, tid, service, payload, max_frames, flags, refs)
    if isinstance(called, _Failed):
        return called.frames
    try:
        frames = encode(called)
        _check_sizes(frames, max_frames)
        return [P.W_RESULT, tid, *frames]
    except Exception as exc:  # EncodeError, or anything odd a result can do while being encoded
        wrapped = EncodeError(f"result of service {service!r} cannot be sent: {exc}")
        return error_frames(tid, P.HANDLER_ERROR, wrapped, False)


@dataclass(frozen=True, slots=True)
class _Failed:
    frames: list[Any]  # the W_ERROR to send instead of a result


def _call(handler: Handler | None, tid: bytes, service: str, payload: list[Any], max_frames: int, flags: int,
          refs: RefResolver | None) -> Any:
    """Decode the call and run the handler: its return value, or :class:`_Failed` with the error to
    send (unknown service, undecodable payload, the handler raised). MemoryError propagates: the
    process's memory is exhausted, its main() exits and the daemon reports it."""
    if handler is None:
        return _Failed(error_frames(tid, P.BAD_REQUEST, LookupError(f"this worker has no service {service!r}"), False))
    kwargs: dict[str, Any] = {}
    try:
        if flags & P.FLAG_CHAINED:  # a pipeline stage after the first: the previous stage's result is the argument
            args = [decode(payload, Limits(max_frames=max_frames), refs)]
        else:
            args, kwargs = decode_call(payload, Limits(max_frames=max_frames), refs)
    except DecodeError as exc:
        return _Failed(error_frames(tid, P.BAD_REQUEST, exc, False))
    try:
        return handler(*args, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:
        return _Failed(error_frames(tid, P.HANDLER_ERROR, exc))


def start_stream(handlers: dict[str, Handler], tid: bytes, service: str, payload: list[Any],
                 max_frames: int = P.MAX_FRAMES, refs: RefResolver | None = None) -> Iterator[Any] | list[Any]:
    """FLAG_STREAM: call the handler and return the iterator of its parts, or the error frames to
    send instead (unknown service, undecodable payload, a handler that raised or returned no iterable)."""
    parts = _call(handlers.get(service), tid, service, payload, max_frames, 0, refs)
    if isinstance(parts, _Failed):
        return parts.frames
    try:
        return iter(cast(Iterable[Any], parts))
    except TypeError:
        why = TypeError(f"service {service!r} was called as a stream but returned a {type(parts).__name__}, "
                        "not an iterable (make it a generator)")
        return error_frames(tid, P.HANDLER_ERROR, why, False)


def part_frames(value: Any, max_frames: int) -> list[Any]:
    """One part of a stream, encoded and checked like a result (raises EncodeError)."""
    frames = encode(value)
    _check_sizes(frames, max_frames)
    return frames


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
    """W_RESULT frames, or why the value cannot be sent within the limits."""
    try:
        frames = encode(result)
        _check_sizes(frames, max_frames)
    except Exception as exc:  # EncodeError, or anything odd a value can do while being encoded
        return str(exc)
    return [P.W_RESULT, tid, *frames]


def run_batch(handler: Handler, tid: bytes, service: str, payload: list[Any], max_frames: int,
              refs: RefResolver | None = None) -> list[Any]:
    """Run every call of a batch in order; a raising call fails alone.

    The result is ``[values, errors]``: one value per call in call order (None where it failed) and
    ``{index: [code, details]}`` for the calls that failed. A value that cannot be encoded becomes
    that call's error; if the whole batch still exceeds ``max_frames`` (too many large arrays for one
    message) the batch fails as a whole and the master resubmits its calls one by one.
    """
    try:
        calls, kwargs = decode_batch(payload, Limits(max_frames=max_frames), refs)
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


def set_frame_limit(max_frame_bytes: int) -> None:
    """The largest result frame this process may send (worker.max_frame_bytes)."""
    _limits["max_frame_bytes"] = max_frame_bytes
