"""The protocol module's constants and parsers, and the error codes' mapping to exceptions."""

from __future__ import annotations

import pytest

from ndpipe import errors
from ndpipe import protocol as P
from ndpipe.errors import ProtocolError

pytestmark = pytest.mark.timeout(30)

COMMANDS = [P.SUBMIT, P.CANCEL, P.PING, P.STATUS, P.BYE, P.PONG, P.RESULT, P.ERROR, P.STATUS_REPLY,
            P.READY, P.WELCOME, P.TASK, P.W_RESULT, P.W_ERROR, P.HEARTBEAT, P.DRAIN, P.DISCONNECT, P.W_CANCEL]


def test_command_bytes_are_distinct_single_octets() -> None:
    assert len(set(COMMANDS)) == len(COMMANDS) and all(len(c) == 1 for c in COMMANDS)


@pytest.mark.parametrize("frames, problem", [
    ([b"NDPM01"], "at least 2 frames"),
    ([b"NDPX01", P.PING], "bad protocol header"),
    ([P.MASTER, P.SUBMIT, b"svc"], "at least 6 frames"),
])
def test_check_header_rejects(frames: list[bytes], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        P.check_header(frames, P.MASTER, 6 if frames[1:2] == [P.SUBMIT] else 2)


@pytest.mark.parametrize("parse, value, problem", [
    (P.task_id_of, b"", "task id"), (P.task_id_of, b"x" * 65, "task id"),
    (P.service_of, b"", "service name"), (P.service_of, b"\xff", "UTF-8"), (P.service_of, b"s" * 256, "service"),
    (P.parse_options, b"\x00" * 7, "options frame"), (P.parse_meta, b"\x00" * 7, "meta frame"),
    (P.error_code_of, b"", "bad error code"), (P.error_code_of, b"lower", "bad error code"),
    (P.error_code_of, b"X" * 33, "bad error code"), (P.error_code_of, b"___", "bad error code"),
])
def test_field_parsers_reject(parse, value: bytes, problem: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError, match=problem):
        parse(value)


def test_fixed_structs_round_trip() -> None:
    assert P.parse_options(P.OPTIONS.pack(1500, 3, 0)) == (1500, 3, 0)
    assert P.parse_meta(P.META.pack(2, 99, P.FLAG_BATCH)) == (2, 99, P.FLAG_BATCH)
    assert P.parse_options(P.OPTIONS.pack(0, 0, P.FLAG_BATCH)) == (0, 0, P.FLAG_BATCH)
    with pytest.raises(ProtocolError, match="unknown task flags 0x0002"):
        P.parse_options(P.OPTIONS.pack(0, 0, 0x0003))
    assert P.error_code_of(b"SOME_NEW_CODE") == "SOME_NEW_CODE"  # forwarded, not dropped


def test_every_code_a_master_can_receive_has_its_exception() -> None:
    for code in P.ERROR_CODES - {P.CRASHED}:  # CRASHED never leaves the broker
        err = errors.error_from_code(code, "t1", {"message": "m"})
        assert type(err) is not errors.TaskError and err.code == code and "m" in str(err)
    unknown = errors.error_from_code("FUTURE_CODE", "t1", {"message": "m"})
    assert type(unknown) is errors.TaskError and unknown.code == "FUTURE_CODE"
