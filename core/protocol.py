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
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import zmq

from ndpipe.errors import ProtocolError

# --- protocol headers (frame 0) ------------------------------------------------------------------
MASTER: Final = b"NDPM01"
WORKER: Final = b"NDPW03"  # 03: lanes (each compute process its own connection, PROTOCOL.md §10)
OLD_WORKERS: Final = (b"NDPW01", b"NDPW02")  # refused with a log line that says why

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
FETCH: Final = b"\x0a"  # B->M  request (8 octets), digest: a worker needs the bytes of an array ref
DATA: Final = b"\x0b"  # M->B  request, digest, description, bytes (description empty: bytes = why not)
PART: Final = b"\x0c"  # B->M  task_id, seq (u32), payload...: one part of a streamed result
ACK: Final = b"\x0d"  # M->B  task_id, seq (u32): parts up to seq were consumed (stream back-pressure)
# Iterations (Master.iterate, PROTOCOL.md §5.7): run id (16 octets), a control map, then payload frames
IT_PLACE: Final = b"\x0e"  # M->B  run, ctl, state + inbox frames: put partition ctl.part on a lane
IT_DONE: Final = b"\x0f"  # B->M  run, ctl: every partition finished round ctl.round (metrics, bytes)
IT_ROUND: Final = b"\x20"  # M->B  run, ctl: run round ctl.round on every partition
IT_END: Final = b"\x21"  # M->B  run, ctl: gather the final states (ctl.gather) or just free the run
IT_STATE: Final = b"\x22"  # B->M  run, ctl, state + inbox frames: a checkpoint's or the result's partition
IT_FAIL: Final = b"\x23"  # B->M  run, ctl: the run's epoch failed (LOST: recoverable; other codes: final)

# --- worker <-> broker commands (frame 1) ---------------------------------------------------------
# A worker is a daemon connection (READY, HEARTBEAT, DRAIN, LANE_GONE, reports) and one connection per
# lane (LANE, then TASK in, W_RESULT / W_ERROR out). One connection MAY be both (a one-lane worker).
READY: Final = b"\x11"  # W->B  info (msgpack map: id, services, lanes, credit, pid, host, version)
WELCOME: Final = b"\x12"  # B->W  params (msgpack map: heartbeat_interval, liveness, broker_id, key)
TASK: Final = b"\x13"  # B->W  task_id, service, meta, payload...
W_RESULT: Final = b"\x14"  # W->B  task_id, payload...
W_ERROR: Final = b"\x15"  # W->B  task_id, code, details
HEARTBEAT: Final = b"\x16"  # both; W->B may add one stats frame (msgpack map)
DRAIN: Final = b"\x17"  # W->B  send me no new tasks (graceful stop)
DISCONNECT: Final = b"\x18"  # both; B->W means "unknown to me: register again"
W_CANCEL: Final = b"\x19"  # B->W  task_id: stop running it, no reply needed (to the lane and its daemon)
LANE: Final = b"\x1a"  # W->B  lane info (msgpack map: key, lane, pid[, broken]): this connection is lane i
LANE_GONE: Final = b"\x1b"  # W->B  lane info (msgpack map: lane, pid): that lane's process ended
W_FETCH: Final = b"\x1c"  # W->B  task_id, digest: the bytes of an array ref in that task's arguments
W_DATA: Final = b"\x1d"  # B->W  digest, description, bytes (description empty: bytes = why not)
W_PART: Final = b"\x1e"  # W->B  task_id, seq (u32), payload...: one part of a streamed result
W_ACK: Final = b"\x1f"  # B->W  task_id, seq (u32): the master consumed parts up to seq
W_PLACE: Final = b"\x30"  # B->W  run, ctl, state + inbox frames: hold this partition (§5.7)
W_STEP: Final = b"\x31"  # B->W  run, ctl: run round ctl.round of the partitions this lane holds
W_INBOX: Final = b"\x32"  # B->W  run, ctl, frames: messages for this lane's partitions, next round
W_END: Final = b"\x33"  # B->W  run, ctl: send the final states (ctl.gather), then drop the run
W_STEPPED: Final = b"\x34"  # W->B  run, ctl, frames: a round's metrics, remote messages, checkpoints
W_STATE: Final = b"\x35"  # W->B  run, ctl, state frames: a partition's final state (after W_END gather)


# --- error codes (ASCII frame in ERROR / W_ERROR) -------------------------------------------------
HANDLER_ERROR: Final = "HANDLER_ERROR"  # the handler raised; not retried
TIMEOUT: Final = "TIMEOUT"  # the task's timeout passed
MAX_ATTEMPTS: Final = "MAX_ATTEMPTS"  # the task was lost with its worker max_attempts times
QUEUE_FULL: Final = "QUEUE_FULL"  # the service's queue is at its bound
BAD_REQUEST: Final = "BAD_REQUEST"  # malformed submission or undecodable payload; not retried
CRASHED: Final = "CRASHED"  # W->B only: the compute process died; the broker retries
UNAVAILABLE: Final = "UNAVAILABLE"  # no live lane can serve the service: its constructor failed there
STREAM_BROKEN: Final = "STREAM_BROKEN"  # a stream's lane was lost after it had delivered parts: not rerun
LOST: Final = "LOST"  # IT_FAIL: partitions of the run's epoch were lost (a lane died): roll back and replay
ERROR_CODES: Final = frozenset(
    {HANDLER_ERROR, TIMEOUT, MAX_ATTEMPTS, QUEUE_FULL, BAD_REQUEST, CRASHED, UNAVAILABLE, STREAM_BROKEN, LOST}
)

# --- fixed binary fields --------------------------------------------------------------------------
OPTIONS: Final = struct.Struct("!IHH")  # timeout_ms (0 = none), max_attempts (0 = default), flags
META: Final = struct.Struct("!HIH")  # attempt (1-based), timeout_ms (0 = none), flags (from OPTIONS)

# --- task flags (OPTIONS, META) ------------------------------------------------------------------
FLAG_BATCH: Final = 0x0001  # the payload is a batch of calls; the result is a list of outcomes
FLAG_PIPELINE: Final = 0x0002  # SUBMIT: frame 2 is a msgpack array of stages; each stage's result feeds the next
FLAG_CHAINED: Final = 0x0004  # TASK only: the payload is one value (the previous stage's result), the argument
FLAG_STREAM: Final = 0x0008  # the handler yields parts: each travels as it is made (W_PART, PART)
KNOWN_FLAGS: Final = FLAG_BATCH | FLAG_PIPELINE | FLAG_STREAM  # any other bit in a SUBMIT: BAD_REQUEST
STREAM_WINDOW: Final = 8  # parts of one stream sent and not yet acknowledged by its master, at most
MAX_STAGES: Final = 16  # services in one pipeline
MAX_TASK_ID: Final = 64  # bytes
REQUEST_ID_MAX: Final = 64  # bytes: a STATUS request id, echoed in STATUS_REPLY
MAX_SERVICE: Final = 255  # bytes, UTF-8
RUN_ID_BYTES: Final = 16  # an iteration's run id
MAX_PARTITIONS: Final = 4096  # partitions of one iteration
ITER_CONTROL_MAX: Final = 4 << 20  # bytes of one iteration control map (message index of a round)

# --- defaults -------------------------------------------------------------------------------------
HEARTBEAT_INTERVAL: Final = 1.0  # seconds; the broker tells workers this value in WELCOME
LIVENESS: Final = 3  # missed intervals before a peer is dead
MAX_ATTEMPTS_DEFAULT: Final = 3
RECONNECT_MIN: Final = 0.5  # seconds, doubled up to RECONNECT_MAX
RECONNECT_MAX: Final = 8.0
MAX_FRAMES: Final = 1024  # payload frames per message
MAX_QUEUED: Final = 100_000  # tasks per service
MAX_SERVICES: Final = 10_000  # services with queued tasks; names are free text, so this bounds the broker
UNROUTABLE_TIMEOUT: Final = 30.0  # seconds a task waits for a service no live lane serves, then UNAVAILABLE
MAX_FRAME_BYTES: Final = 1 << 30  # one frame; libzmq drops the link on a bigger one (ZMQ_MAXMSGSIZE)
MAX_SLOTS: Final = 100_000  # READY's credit per lane, at most
MAX_LANES: Final = 1024  # READY's lanes, at most
DIGEST_BYTES: Final = 16  # an array ref's digest (BLAKE2b-128)
FETCH_MAX: Final = 10_000  # fetches in flight at the broker (W_FETCH forwarded, no DATA yet)
FETCH_TIMEOUT: Final = 60.0  # seconds a worker daemon waits for W_DATA before its lanes get an error
CACHE_BYTES: Final = 1 << 30  # worker.cache_bytes: array refs one host keeps in shared memory
LANE_CREDIT_MAX: Final = 64  # the reference worker's credit per lane (1 + its share of worker.prefetch)
KEY_BYTES: Final = 16  # WELCOME's key: what a lane presents to join its worker
HWM: Final = 100_000  # messages queued per peer on a host-to-host socket (sndhwm = rcvhwm)
READ_BATCH: Final = 256  # messages a poll loop reads from one socket before turning to the others
CONTROL_MAX: Final = 64 * 1024  # bytes of one control map (READY info, HEARTBEAT stats, ...)
ENVELOPE_FRAMES: Final = 8  # frames around a payload (routing id, header, command, ids, options), with room


def read_cap(max_frames: int) -> int:
    """Frames a receiver reads of one message before it drops the rest: the payload limit plus the
    envelope (PROTOCOL.md §2.3 and §11: `max_frames + 8`, counting the routing id)."""
    return max_frames + ENVELOPE_FRAMES

# --- worker daemon <-> its lanes (internal, one host: a pipe each, inherited, and a shared slot) ---
L_HELLO: Final = b"H"  # lane -> daemon: + msgpack map {pid, broken}: services built, ready to join
L_JOIN: Final = b"J"  # daemon -> lane: + msgpack map {key, heartbeat_interval, liveness}: (re)join
L_DRAIN: Final = b"D"  # daemon -> lane: finish what you hold, say DISCONNECT, exit 0
L_FETCH: Final = b"F"  # lane -> daemon: + msgpack map {tid, digest}: I need this array's bytes
L_DATA: Final = b"R"  # daemon -> lane: + msgpack map {digest, meta, size}, then its memfd (SCM_RIGHTS)
L_NODATA: Final = b"N"  # daemon -> lane: + msgpack map {digest, why}: it cannot be had
L_EVICT: Final = b"E"  # daemon -> lane: + digest: out of the host cache, drop your mapping
EXIT_OUT_OF_MEMORY: Final = 86  # a lane's exit status after a handler's MemoryError
EXIT_LINK_LOST: Final = 87  # a lane's broker connection broke, or the broker did not know it

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


# --- message layouts: parse and build helpers (frames after the ROUTER's routing id) --------------
SUBMIT_FRAMES: Final = 6  # header, command, service, task id, options, payload header


class BadSubmit(ProtocolError):
    """A SUBMIT that names a valid task id but is wrong otherwise: its master gets BAD_REQUEST."""

    def __init__(self, message: str, tid: bytes) -> None:
        super().__init__(message)
        self.tid = tid


@dataclass(frozen=True, slots=True)
class SubmitMsg:
    service: str
    tid: bytes
    timeout_ms: int
    max_attempts: int
    flags: int
    payload: list[Any]
    stages: tuple[str, ...] = ()  # FLAG_PIPELINE: every stage, ``service`` the first


def pack_stages(stages: Sequence[str]) -> bytes:
    """SUBMIT frame 2 of a pipeline: a msgpack array of its services."""
    return bytes(msgpack.packb(list(stages), use_bin_type=True))


def parse_stages(frame: Frame) -> tuple[str, ...]:
    raw = _b(frame)
    if len(raw) > MAX_STAGES * (MAX_SERVICE + 3) + 3:
        raise ProtocolError(f"pipeline stages frame of {len(raw)} octets is too long")
    try:
        stages = msgpack.unpackb(raw, raw=False, max_array_len=MAX_STAGES + 1, max_str_len=MAX_SERVICE)
    except Exception as exc:
        raise ProtocolError(f"pipeline stages are not a msgpack array of service names: {exc}") from exc
    if (not isinstance(stages, list) or not 2 <= len(stages) <= MAX_STAGES
            or not all(isinstance(s, str) and 0 < len(s.encode()) <= MAX_SERVICE for s in stages)):
        raise ProtocolError(f"a pipeline names 2..{MAX_STAGES} services (str of 1..{MAX_SERVICE} octets), "
                            f"got {stages!r:.120}")
    return tuple(stages)


def submit_id(frames: Sequence[Frame]) -> bytes:
    """The task id of what claims to be a SUBMIT (header and command checked by the caller), or b""."""
    try:
        return task_id_of(frames[3]) if len(frames) > 3 else b""
    except ProtocolError:
        return b""


def parse_submit(frames: Sequence[Frame], max_frames: int) -> SubmitMsg:
    """SUBMIT: service, task id, options, payload (1 + at most ``max_frames`` frames). Raises
    :class:`BadSubmit` when the task id is usable (so the master can be told), else ProtocolError."""
    tid = task_id_of(frames[3]) if len(frames) > 3 else b""
    try:
        if len(frames) < SUBMIT_FRAMES:
            raise ProtocolError(f"SUBMIT needs at least {SUBMIT_FRAMES} frames, got {len(frames)}")
        if len(frames) - SUBMIT_FRAMES > max_frames:
            raise ProtocolError(f"SUBMIT has {len(frames) - SUBMIT_FRAMES} payload buffer frames (limit {max_frames})")
        timeout_ms, max_attempts, flags = parse_options(frames[4])
        stages = parse_stages(frames[2]) if flags & FLAG_PIPELINE else ()
        if bin(flags & KNOWN_FLAGS).count("1") > 1:
            raise ProtocolError("a task is at most one of a batch, a pipeline and a stream")
        service = stages[0] if stages else service_of(frames[2])
    except ProtocolError as exc:
        if tid:
            raise BadSubmit(str(exc), tid) from exc
        raise
    return SubmitMsg(service, tid, timeout_ms, max_attempts, flags, list(frames[5:]), stages)


def parse_status(frames: Sequence[Frame]) -> bytes:
    """STATUS: the optional request id (0..64 octets; a longer one is malformed, not cut short: a
    shortened echo would match no request)."""
    request = _b(frames[2]) if len(frames) > 2 else b""
    if len(request) > REQUEST_ID_MAX:
        raise ProtocolError(f"STATUS request id of {len(request)} octets (at most {REQUEST_ID_MAX})")
    return request

def _map_field(info: dict[str, Any], key: str, lo: int, hi: int, what: str) -> int:
    value = info.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{what} needs {key} (int {lo}..{hi}), got {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True)
class ReadyInfo:
    """A worker daemon's READY: what its lanes offer and how much credit each gets."""

    services: tuple[str, ...]
    lanes: int
    credit: int  # tasks in flight per lane
    name: str  # the worker's id in addresses "name/lane" (defaults to host:pid)
    info: dict[str, Any]


def parse_ready(info: dict[str, Any]) -> ReadyInfo:
    services = info.get("services")
    if not isinstance(services, list) or not services or not all(isinstance(s, str) and s for s in services):
        raise ProtocolError(f"READY needs services (non-empty list of str), got {services!r:.200}")
    lanes = _map_field(info, "lanes", 1, MAX_LANES, "READY")
    credit = _map_field(info, "credit", 1, MAX_SLOTS, "READY")
    name = info.get("id", f"{info.get('host', '?')}:{info.get('pid', '?')}")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SERVICE:
        raise ProtocolError(f"READY id must be a str of 1..{MAX_SERVICE} characters, got {name!r:.80}")
    return ReadyInfo(tuple(services), lanes, credit, name, info)


@dataclass(frozen=True, slots=True)
class LaneInfo:
    """A LANE message: the key of the daemon it belongs to, its index and pid, and the services it
    cannot serve because their constructor failed there (name -> error details: type, message,
    traceback)."""

    key: bytes
    index: int
    pid: int
    broken: dict[str, dict[str, Any]]


def parse_lane(info: dict[str, Any]) -> LaneInfo:
    key = info.get("key")
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ProtocolError(f"LANE needs key ({KEY_BYTES} octets, bin), got {key!r:.80}")
    broken = info.get("broken", {})
    if not isinstance(broken, dict) or not all(
            isinstance(k, str) and 0 < len(k) <= MAX_SERVICE and isinstance(v, dict) for k, v in broken.items()):
        raise ProtocolError(f"LANE broken must map service names to error maps, got {broken!r:.120}")
    index, pid = _map_field(info, "lane", 0, MAX_LANES - 1, "LANE"), _map_field(info, "pid", 0, 1 << 31, "LANE")
    return LaneInfo(key, index, pid, broken)


def parse_lane_gone(info: dict[str, Any]) -> tuple[int, int]:
    """(lane index, pid) from a LANE_GONE info map."""
    return _map_field(info, "lane", 0, MAX_LANES - 1, "LANE_GONE"), _map_field(info, "pid", 0, 1 << 31, "LANE_GONE")


def task_frames(tid: bytes, service: bytes, attempt: int, timeout_ms: int, flags: int,
                payload: Sequence[Frame]) -> list[Frame]:
    """TASK as the broker sends it to a lane (without the routing id)."""
    return [WORKER, TASK, tid, service, META.pack(attempt, timeout_ms, flags), *payload]


@dataclass(frozen=True, slots=True)
class TaskMsg:
    tid: bytes
    service: str
    attempt: int
    timeout_ms: int
    flags: int
    payload: list[Any]


def parse_task(frames: Sequence[Frame]) -> TaskMsg:
    """A TASK as a lane receives it: header, command, task id, service, meta, payload (≥ 1 frame)."""
    check_header(frames, WORKER, 6)
    attempt, timeout_ms, flags = parse_meta(frames[4])
    return TaskMsg(task_id_of(frames[2]), service_of(frames[3]), attempt, timeout_ms, flags, list(frames[5:]))


def parse_answer(frames: Sequence[Frame]) -> tuple[bytes, str | None, list[Any]]:
    """W_RESULT -> (task id, None, payload); W_ERROR -> (task id, code, [details])."""
    command = check_header(frames, WORKER, 4)
    tid = task_id_of(frames[2])
    if command == W_RESULT:
        return tid, None, list(frames[3:])
    if len(frames) < 5:
        raise ProtocolError(f"W_ERROR needs 5 frames, got {len(frames)}")
    return tid, error_code_of(frames[3]), [frames[4]]


def parse_part(frames: Sequence[Frame], header: bytes) -> tuple[bytes, int, list[Any]]:
    """W_PART (worker header) or PART (master header): (task id, seq, payload frames)."""
    check_header(frames, header, 5)
    return task_id_of(frames[2]), _seq_of(frames[3]), list(frames[4:])


def parse_ack(frames: Sequence[Frame], header: bytes) -> tuple[bytes, int]:
    """ACK (master header) or W_ACK (worker header): (task id, seq)."""
    check_header(frames, header, 4)
    return task_id_of(frames[2]), _seq_of(frames[3])


def _seq_of(frame: Frame) -> int:
    raw = _b(frame)
    if len(raw) != 4:
        raise ProtocolError(f"a part's seq is 4 octets, got {len(raw)}")
    return int.from_bytes(raw, "big")


def parse_task_ref(frames: Sequence[Frame], header: bytes) -> bytes:
    """CANCEL (master header) or W_CANCEL (worker header): header, command, task id."""
    check_header(frames, header, 3)
    return task_id_of(frames[2])


def _digest_of(frame: Frame) -> bytes:
    digest = _b(frame)
    if len(digest) != DIGEST_BYTES:
        raise ProtocolError(f"an array ref digest is {DIGEST_BYTES} octets, got {len(digest)}")
    return digest


def parse_fetch(frames: Sequence[Frame]) -> tuple[bytes, bytes]:
    """FETCH (broker -> master): (request, digest)."""
    check_header(frames, MASTER, 4)
    request = _b(frames[2])
    if not 0 < len(request) <= 16:
        raise ProtocolError(f"FETCH request id must be 1..16 octets, got {len(request)}")
    return request, _digest_of(frames[3])


def parse_data(frames: Sequence[Frame]) -> tuple[bytes, bytes, bytes, Frame]:
    """DATA (master -> broker): (request, digest, description, bytes frame, untouched)."""
    check_header(frames, MASTER, 6)
    return _b(frames[2]), _digest_of(frames[3]), _b(frames[4]), frames[5]


def parse_w_fetch(frames: Sequence[Frame]) -> tuple[bytes, bytes]:
    """W_FETCH (worker -> broker): (task id, digest)."""
    check_header(frames, WORKER, 4)
    return task_id_of(frames[2]), _digest_of(frames[3])


def parse_w_data(frames: Sequence[Frame]) -> tuple[bytes, bytes, Frame]:
    """W_DATA (broker -> worker): (digest, description, bytes frame)."""
    check_header(frames, WORKER, 5)
    return _digest_of(frames[2]), _b(frames[3]), frames[4]


def control_frame(frames: Sequence[Frame], header: bytes, optional: bool = False) -> bytes:
    """Frame 2 of READY, WELCOME, LANE, LANE_GONE, HEARTBEAT (optional there): a control map's bytes."""
    if optional and len(frames) < 3:
        return b""
    check_header(frames, header, 3)
    return _b(frames[2])


def parse_result(frames: Sequence[Frame]) -> tuple[bytes, list[Any]]:
    """RESULT at the master: (task id, payload frames)."""
    check_header(frames, MASTER, 4)
    return task_id_of(frames[2]), list(frames[3:])


def parse_error(frames: Sequence[Frame]) -> tuple[bytes, str, bytes, int | None]:
    """ERROR at the master: (task id, code as sent, details bytes, the pipeline stage that failed or
    None). The code is taken as it comes (a newer broker's code fails the task as a plain TaskError)."""
    check_header(frames, MASTER, 5)
    stage = int.from_bytes(_b(frames[5]), "big") if len(frames) > 5 and len(_b(frames[5])) == 2 else None
    return task_id_of(frames[2]), _b(frames[3]).decode("ascii", "replace"), _b(frames[4]), stage


def parse_pong(frames: Sequence[Frame]) -> tuple[bytes, float]:
    """PONG: (session token, the broker's heartbeat interval in seconds, at least 10 ms)."""
    check_header(frames, MASTER, 4)
    return _b(frames[2]), max(0.01, int.from_bytes(_b(frames[3]), "big") / 1000)


def parse_status_reply(frames: Sequence[Frame]) -> tuple[bytes, bytes]:
    """STATUS_REPLY: (body bytes, the request id it answers)."""
    check_header(frames, MASTER, 4)
    return _b(frames[2]), _b(frames[3])
