"""Every frame constant, default timing and message layout of the ndpipe wire protocol (NDP/1).

PROTOCOL.md is the specification; this module is its only implementation of constants. No other
module writes a raw command byte. Parsers here check frame counts and headers and raise
:class:`~ndpipe.errors.ProtocolError`; they never decode payload frames (the codec does that, and
only at the master and in compute processes — the broker forwards payloads untouched).

Sockets: masters use DEALER → broker frontend ROUTER; workers use DEALER → broker backend ROUTER.
No empty delimiter frame (as in MDP/0.2). Frames below are listed after the ROUTER's identity frame.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import zmq

from ndpipe.errors import ProtocolError

# --- protocol headers (frame 0) ------------------------------------------------------------------
MASTER: Final = b"NDPM01"
WORKER: Final = b"NDPW02"

# --- master <-> broker commands (frame 1) ---------------------------------------------------------
SUBMIT: Final = b"\x01"  # M->B  service, task_id, options, payload...
CANCEL: Final = b"\x02"  # M->B  task_id
PING: Final = b"\x03"  # M->B  (nothing)
STATUS: Final = b"\x04"  # M->B  (nothing)
BYE: Final = b"\x05"  # M->B  (nothing): the master leaves; its queued tasks are dropped
PONG: Final = b"\x06"  # B->M  session token (16 bytes), interval_ms (u32 big-endian)
RESULT: Final = b"\x07"  # B->M  task_id, payload...
ERROR: Final = b"\x08"  # B->M  task_id, code, details
STATUS_REPLY: Final = b"\x09"  # B->M  body (msgpack map)

# --- worker <-> broker commands (frame 1) ---------------------------------------------------------
READY: Final = b"\x11"  # W->B  info (msgpack map: services, slots, pid, host, version)
WELCOME: Final = b"\x12"  # B->W  params (msgpack map: heartbeat_interval, liveness, broker_id)
TASK: Final = b"\x13"  # B->W  task_id, service, meta, payload...
W_RESULT: Final = b"\x14"  # W->B  task_id, payload...
W_ERROR: Final = b"\x15"  # W->B  task_id, code, details
HEARTBEAT: Final = b"\x16"  # both; W->B may add one stats frame (msgpack map)
DRAIN: Final = b"\x17"  # W->B  send me no new tasks (graceful stop)
DISCONNECT: Final = b"\x18"  # both; B->W means "unknown to me: register again"
W_CANCEL: Final = b"\x19"  # B->W  task_id: stop running it, no reply needed


# --- error codes (ASCII frame in ERROR / W_ERROR) -------------------------------------------------
HANDLER_ERROR: Final = "HANDLER_ERROR"  # the handler raised; not retried
TIMEOUT: Final = "TIMEOUT"  # the task's timeout passed
MAX_ATTEMPTS: Final = "MAX_ATTEMPTS"  # the task was lost with its worker max_attempts times
QUEUE_FULL: Final = "QUEUE_FULL"  # the service's queue is at its bound
BAD_REQUEST: Final = "BAD_REQUEST"  # malformed submission or undecodable payload; not retried
CRASHED: Final = "CRASHED"  # W->B only: the compute process died; the broker retries
ERROR_CODES: Final = frozenset(
    {HANDLER_ERROR, TIMEOUT, MAX_ATTEMPTS, QUEUE_FULL, BAD_REQUEST, CRASHED}
)

# --- fixed binary fields --------------------------------------------------------------------------
OPTIONS: Final = struct.Struct("!IHH")  # timeout_ms (0 = none), max_attempts (0 = default), flags
META: Final = struct.Struct("!HIH")  # attempt (1-based), timeout_ms (0 = none), flags (from OPTIONS)
FLAGS: Final = struct.Struct("!H")  # C_TASK: the task's flags

# --- task flags (OPTIONS, META, C_TASK) -----------------------------------------------------------
FLAG_BATCH: Final = 0x0001  # the payload is a batch of calls; the result is a list of outcomes
KNOWN_FLAGS: Final = FLAG_BATCH  # a SUBMIT with any other bit set gets BAD_REQUEST
MAX_TASK_ID: Final = 64  # bytes
REQUEST_ID_MAX: Final = 64  # bytes: a STATUS request id, echoed in STATUS_REPLY
MAX_SERVICE: Final = 255  # bytes, UTF-8

# --- defaults -------------------------------------------------------------------------------------
HEARTBEAT_INTERVAL: Final = 1.0  # seconds; the broker tells workers this value in WELCOME
LIVENESS: Final = 3  # missed intervals before a peer is dead
MAX_ATTEMPTS_DEFAULT: Final = 3
RECONNECT_MIN: Final = 0.5  # seconds, doubled up to RECONNECT_MAX
RECONNECT_MAX: Final = 8.0
MAX_FRAMES: Final = 1024  # payload frames per message
MAX_QUEUED: Final = 100_000  # tasks per service
MAX_SERVICES: Final = 10_000  # services with queued tasks; names are free text, so this bounds the broker
MAX_FRAME_BYTES: Final = 1 << 30  # one frame; libzmq drops the link on a bigger one (ZMQ_MAXMSGSIZE)
MAX_SLOTS: Final = 100_000  # READY's slots, at most
HWM: Final = 100_000  # messages queued per peer on a host-to-host socket (sndhwm = rcvhwm)
CHILD_HWM: Final = 10_000  # the worker daemon's ROUTER to its compute processes
COMPUTE_HWM: Final = 1_000  # a compute process's DEALER to its daemon
READ_BATCH: Final = 256  # messages a poll loop reads from one socket before turning to the others
ENVELOPE_FRAMES: Final = 8  # frames around a payload (routing id, header, command, ids, options), with room


def read_cap(max_frames: int) -> int:
    """Frames a receiver reads of one message before it drops the rest: the payload limit plus the
    envelope (PROTOCOL.md §9: `max_frames + 8`, counting the routing id)."""
    return max_frames + ENVELOPE_FRAMES

# --- daemon <-> compute process (internal, one host, ipc) -----------------------------------------
C_HELLO: Final = b"H"  # C->D  the compute process is ready
C_TASK: Final = b"T"  # D->C  task_id, service, flags, payload... (the daemon enforces deadlines)
C_RESULT: Final = b"R"  # C->D  task_id, payload...
C_ERROR: Final = b"E"  # C->D  task_id, code, details
EXIT_OUT_OF_MEMORY: Final = 86  # a compute process's exit status after a handler's MemoryError

Frame = bytes | zmq.Frame | memoryview


def _b(frame: Frame) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def check_header(frames: Sequence[Frame], header: bytes, minimum: int) -> bytes:
    """Check protocol header and minimum frame count; return the command byte."""
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames, got {len(frames)}")
    if _b(frames[0]) != header:
        raise ProtocolError(f"bad protocol header {_b(frames[0])[:16]!r}, expected {header!r}")
    command = _b(frames[1])
    if len(frames) < minimum:
        raise ProtocolError(f"command {command!r}: expected at least {minimum} frames, got {len(frames)}")
    return command


def task_id_of(frame: Frame) -> bytes:
    """Validate a task id frame (1..64 bytes)."""
    tid = _b(frame)
    if not 0 < len(tid) <= MAX_TASK_ID:
        raise ProtocolError(f"task id must be 1..{MAX_TASK_ID} bytes, got {len(tid)}")
    return tid


def service_of(frame: Frame) -> str:
    """Validate a service name frame (1..255 bytes of UTF-8)."""
    raw = _b(frame)
    if not 0 < len(raw) <= MAX_SERVICE:
        raise ProtocolError(f"service name must be 1..{MAX_SERVICE} bytes, got {len(raw)}")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("service name is not UTF-8") from exc


def parse_options(frame: Frame) -> tuple[int, int, int]:
    """(timeout_ms, max_attempts, flags) from a SUBMIT options frame."""
    raw = _b(frame)
    if len(raw) != OPTIONS.size:
        raise ProtocolError(f"options frame must be {OPTIONS.size} bytes, got {len(raw)}")
    timeout_ms, max_attempts, flags = OPTIONS.unpack(raw)
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown task flags 0x{flags & ~KNOWN_FLAGS:04x} in options")
    return timeout_ms, max_attempts, flags


def parse_meta(frame: Frame) -> tuple[int, int, int]:
    """(attempt, timeout_ms, flags) from a TASK meta frame."""
    raw = _b(frame)
    if len(raw) != META.size:
        raise ProtocolError(f"meta frame must be {META.size} bytes, got {len(raw)}")
    attempt, timeout_ms, flags = META.unpack(raw)
    return attempt, timeout_ms, flags


def error_code_of(frame: Frame) -> str:
    """Validate an error code frame: 1..32 upper-case ASCII letters and underscores.

    Codes outside ERROR_CODES are forwarded as they are (the master raises a plain TaskError), so a
    newer worker's code never leaves a task hanging.
    """
    raw = _b(frame)
    if not 0 < len(raw) <= 32 or not raw.replace(b"_", b"").isalpha() or not raw.isupper():
        raise ProtocolError(f"bad error code {raw[:32]!r}")
    return raw.decode("ascii")
