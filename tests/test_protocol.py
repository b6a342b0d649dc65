"""The protocol module's constants and parsers, and the error codes' mapping to exceptions."""

from __future__ import annotations

from typing import Any

import pytest

from ndpipe import errors
from ndpipe import protocol as P
from ndpipe.errors import ProtocolError

pytestmark = pytest.mark.timeout(30)

COMMANDS = [P.SUBMIT, P.CANCEL, P.PING, P.STATUS, P.BYE, P.PONG, P.RESULT, P.ERROR, P.STATUS_REPLY,
            P.READY, P.WELCOME, P.TASK, P.W_RESULT, P.W_ERROR, P.HEARTBEAT, P.DRAIN, P.DISCONNECT, P.W_CANCEL,
            P.LANE, P.LANE_GONE]


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
    with pytest.raises(ProtocolError, match="unknown task flags 0x0004"):
        P.parse_options(P.OPTIONS.pack(0, 0, 0x0007))  # FLAG_CHAINED is the broker's, never a master's
    assert P.error_code_of(b"SOME_NEW_CODE") == "SOME_NEW_CODE"  # forwarded, not dropped


def test_every_code_a_master_can_receive_has_its_exception() -> None:
    for code in P.ERROR_CODES - {P.CRASHED}:  # CRASHED never leaves the broker
        err = errors.error_from_code(code, "t1", {"message": "m"})
        assert type(err) is not errors.TaskError and err.code == code and "m" in str(err)
    unknown = errors.error_from_code("FUTURE_CODE", "t1", {"message": "m"})
    assert type(unknown) is errors.TaskError and unknown.code == "FUTURE_CODE"


def test_task_frames_and_parse_task_round_trip() -> None:
    frames = P.task_frames(b"t1", b"svc", 2, 1500, P.FLAG_BATCH, [b"head", b"buf"])
    task = P.parse_task(frames)
    assert (task.tid, task.service, task.attempt, task.timeout_ms, task.flags, task.payload) == (
        b"t1", "svc", 2, 1500, P.FLAG_BATCH, [b"head", b"buf"])


def test_a_bad_submit_with_a_usable_task_id_names_it_and_one_without_does_not() -> None:
    good = [P.MASTER, P.SUBMIT, b"svc", b"t1", P.OPTIONS.pack(0, 0, 0), b"payload"]
    assert P.parse_submit(good, 4).tid == b"t1"
    with pytest.raises(P.BadSubmit) as err:
        P.parse_submit([*good[:4], b"short options", b"payload"], 4)
    assert err.value.tid == b"t1"
    with pytest.raises(P.BadSubmit, match="payload buffer frames"):
        P.parse_submit([*good, b"1", b"2"], 1)
    with pytest.raises(ProtocolError) as plain:
        P.parse_submit([P.MASTER, P.SUBMIT, b"svc"], 4)
    assert not isinstance(plain.value, P.BadSubmit)


@pytest.mark.parametrize("info", [
    {"services": ["a"], "lanes": 1, "credit": True},  # a bool is an int to Python
    {"services": ["a"], "lanes": 0, "credit": 1},
    {"services": ["a"], "lanes": P.MAX_LANES + 1, "credit": 1},
    {"services": [], "lanes": 1, "credit": 1},
    {"services": ["a", ""], "lanes": 1, "credit": 1},
    {"services": ["a"], "lanes": 1, "credit": 1, "id": ""},
    {"services": ["a"], "slots": 4},  # NDPW02's READY
])
def test_ready_info_is_checked(info: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        P.parse_ready(info)


def test_lane_info_needs_a_key_of_16_octets_and_an_index() -> None:
    assert P.parse_lane({"key": b"k" * 16, "lane": 3, "pid": 9}) == P.LaneInfo(b"k" * 16, 3, 9, {})
    why = {"type": "TypeError", "message": "no"}
    assert P.parse_lane({"key": b"k" * 16, "lane": 0, "pid": 9, "broken": {"lm": why}}).broken == {"lm": why}
    for bad in ({"key": b"k" * 15, "lane": 0, "pid": 1}, {"key": "k" * 16, "lane": 0, "pid": 1},
                {"key": b"k" * 16, "lane": -1, "pid": 1}, {"key": b"k" * 16, "lane": 0},
                {"key": b"k" * 16, "lane": 0, "pid": 1, "broken": ["lm"]},
                {"key": b"k" * 16, "lane": 0, "pid": 1, "broken": {"lm": "TypeError"}},
                {"key": b"k" * 16, "lane": 0, "pid": 1, "broken": {"": {}}}):
        with pytest.raises(ProtocolError):
            P.parse_lane(bad)
