"""The one error hierarchy of ndpipe.

Every error a user can catch derives from :class:`NdpipeError`. Errors that cross the wire carry
one of the codes in :mod:`ndpipe.protocol` (``ErrorCode``); :func:`error_from_code` turns a code and
its details back into the matching exception on the master side.
"""

from __future__ import annotations

from typing import Any


class NdpipeError(Exception):
    """Base class of every ndpipe error."""


class ConfigError(NdpipeError):
    """The YAML file or an environment override is invalid; the message names file and key."""


class AddressInUse(ConfigError):
    """An endpoint to bind is held by another process (EADDRINUSE). Often brief (a previous broker still
    stopping, a port taken at boot), so the CLI exits 75 (EX_TEMPFAIL) and the unit restarts it,
    where other config errors exit 2 and are not retried."""


class ProtocolError(NdpipeError):
    """A multipart message does not follow PROTOCOL.md (frame count, header, command, sizes)."""


class DecodeError(NdpipeError):
    """A payload could not be decoded (hostile or corrupt input). ``cause`` names the problem."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class EncodeError(NdpipeError):
    """A value cannot be encoded (unsupported type or dtype); nothing was sent."""


class BrokerUnreachable(NdpipeError):
    """The master could not reach a broker within its retry budget."""


class TaskError(NdpipeError):
    """A task ended without a result. ``code`` is the wire error code, ``details`` its map."""

    code: str = "ERROR"

    def __init__(self, message: str, task_id: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.details: dict[str, Any] = details or {}

    @property
    def remote_type(self) -> str:
        return str(self.details.get("type", ""))

    @property
    def remote_traceback(self) -> str:
        return str(self.details.get("traceback", ""))

    def __str__(self) -> str:
        text = super().__str__()
        tb = self.remote_traceback
        return f"{text}\n--- remote traceback ---\n{tb}" if tb else text


class TaskFailed(TaskError):
    """The handler raised. ``remote_type`` and ``remote_traceback`` say how."""

    code = "HANDLER_ERROR"


class ServiceUnavailable(TaskError):
    """No live worker can serve the service: its constructor (a resident service's ``__init__``)
    failed on every lane that offers it. ``remote_traceback`` is the constructor's."""

    code = "UNAVAILABLE"


class StreamBroken(TaskError):
    """A stream's worker was lost after some parts were delivered; it is not rerun (its parts would
    come twice). ``details["parts"]``: how many were delivered, all of them before this error."""

    code = "STREAM_BROKEN"


class TaskTimeout(TaskError):
    """The task did not finish within its timeout."""

    code = "TIMEOUT"


class TaskCrashed(TaskError):
    """The task killed every compute process it ran in, ``max_attempts`` times."""

    code = "MAX_ATTEMPTS"


class QueueFull(TaskError):
    """The broker's queue for the service is at its bound; submit again later or raise the bound."""

    code = "QUEUE_FULL"


class BadRequest(TaskError):
    """The broker or worker could not use the request (undecodable payload, unknown service…)."""

    code = "BAD_REQUEST"


class IterationLost(TaskError):
    """An iteration lost partitions (lanes died, the broker restarted, a round outlasted its timeout)
    more often than its ``max_recoveries``; each time it had rolled back to its last checkpoint."""

    code = "LOST"


_BY_CODE: dict[str, type[TaskError]] = {
    cls.code: cls for cls in (TaskFailed, TaskTimeout, TaskCrashed, QueueFull, BadRequest, ServiceUnavailable,
                              StreamBroken, IterationLost)
}


def error_from_code(code: str, task_id: str, details: dict[str, Any]) -> TaskError:
    """Build the exception for a wire ERROR message (unknown codes become a plain TaskError)."""
    cls = _BY_CODE.get(code, TaskError)
    message = str(details.get("message", code))
    err = cls(f"task {task_id}: {code}: {message}", task_id, details)
    if cls is TaskError:
        err.code = code
    return err


def iteration_error(code: str, run_id: str, details: dict[str, Any]) -> TaskError:
    """The exception an iteration fails with (the message names the partition and round where known)."""
    cls = _BY_CODE.get(code, TaskError)
    err = cls(f"iteration {run_id}: {code}: {details.get('message', code)}", run_id, details)
    if cls is TaskError:
        err.code = code
    return err
