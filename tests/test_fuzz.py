"""Fuzzing the codec and the broker's message handling (issue 12, item 7).

A short run is part of the suite; the long one is the same tests with more examples:

    NDPIPE_FUZZ_EXAMPLES=200000 python -m pytest tests/test_fuzz.py -p no:cacheprovider

Properties: whatever bytes arrive, the decoder returns a value or raises DecodeError (nothing else,
and within its object budget); encode then decode gives the value back; and the broker's handlers,
fed any frames a master or a worker could send, raise nothing but ProtocolError (what its loop logs
and drops) and leave its books consistent.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ndpipe import protocol as P
from ndpipe.broker.server import Broker
from ndpipe.codec import Limits, decode, decode_call, encode
from ndpipe.config import BrokerConfig
from ndpipe.errors import DecodeError, ProtocolError
from ndpipe.msgcost import estimate

pytestmark = pytest.mark.timeout(600)
EXAMPLES = int(os.environ.get("NDPIPE_FUZZ_EXAMPLES", "300"))  # per property
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | \
    st.text(max_size=20) | st.binary(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=6), max_leaves=40)
arrays = st.builds(lambda shape, kind, seed: np.random.default_rng(seed).integers(0, 100, shape).astype(kind),
                   st.lists(st.integers(0, 5), max_size=3), st.sampled_from(["i1", "u2", "i8", "f4", "f8", "c16", "?"]),
                   st.integers(0, 2**32))


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.binary(max_size=64), max_size=3))
def test_any_bytes_decode_to_a_value_or_a_decode_error(header: bytes, buffers: list[bytes]) -> None:
    try:
        decode([header, *buffers], Limits(object_bytes_floor=1 << 20))
    except DecodeError:
        pass


@FUZZ
@given(st.binary(max_size=4096), st.integers(0, 1 << 20))
def test_the_object_estimate_terminates_on_any_bytes(header: bytes, budget: int) -> None:
    try:
        cost = estimate(header, budget)
    except DecodeError:
        return
    assert 0 <= cost <= budget


@FUZZ
@given(st.recursive(scalars | st.builds(lambda: {}) | st.builds(list),
                    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(scalars, inner, max_size=8),
                    max_leaves=200))
def test_structured_msgpack_decodes_or_is_refused_cleanly(value: Any) -> None:
    """Well-formed msgpack of any shape, including maps with the reserved array key in odd forms."""
    header = msgpack.packb(value, use_bin_type=True)
    try:
        decode([header], Limits(max_container_len=100, object_bytes_floor=1 << 14))
    except DecodeError:
        pass


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@FUZZ
@given(st.recursive(scalars | arrays, lambda inner: st.lists(inner, max_size=5) |
                    st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=30))
def test_what_encode_makes_decode_gives_back(value: Any) -> None:
    assert _same(decode(encode(value)), value)


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_a_call_payload_of_any_frames_is_a_call_or_a_decode_error(frames: list[bytes]) -> None:
    try:
        args, kwargs = decode_call(frames or [b""])
        assert isinstance(args, list) and isinstance(kwargs, dict)
    except DecodeError:
        pass


# ---- the broker's handlers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def broker() -> Any:
    b = Broker(BrokerConfig(frontend="inproc://fuzz-f", backend="inproc://fuzz-b", max_frames=8))
    yield b
    b.close()


COMMANDS_M = [P.SUBMIT, P.CANCEL, P.PING, P.STATUS, P.BYE, P.ACK, P.DATA, P.IT_PLACE, P.IT_ROUND, P.IT_END, b"\x7f"]
COMMANDS_W = [P.READY, P.LANE, P.HEARTBEAT, P.W_RESULT, P.W_ERROR, P.W_PART, P.W_FETCH, P.W_STEPPED, P.W_STATE,
              P.DRAIN, P.LANE_GONE, P.DISCONNECT, b"\x7f"]
field = st.binary(max_size=24) | st.sampled_from([b"", b"\x00" * 16, P.OPTIONS.pack(0, 0, 0), b"echo"]) | \
    st.builds(lambda v: msgpack.packb(v, use_bin_type=True), values)


from_master = st.tuples(st.just("_on_master"), st.sampled_from([b"M1", b"M2"]), st.just(P.MASTER),
                        st.sampled_from(COMMANDS_M), st.lists(field, max_size=7))
from_worker = st.tuples(st.just("_on_worker"), st.sampled_from([b"W1", b"W2", b"L1"]), st.just(P.WORKER),
                        st.sampled_from(COMMANDS_W), st.lists(field, max_size=6))


@settings(FUZZ, max_examples=2 * EXAMPLES)  # as many per socket as the two tests this replaced had
@given(from_master | from_worker)
def test_any_master_or_worker_message_is_handled_or_refused_as_malformed(
        broker: Any, message: tuple[str, bytes, bytes, bytes, list[bytes]]) -> None:
    handler, peer, header, command, rest = message
    try:
        getattr(broker, handler)([peer, header, command, *rest])
    except ProtocolError:
        pass
    _books_balance(broker)


def _books_balance(broker: Any) -> None:
    state = broker.state
    assert state.budget.held == sum(t.nbytes for t in state.tasks.values())
    assert sum(state.budget.by_master.values()) == state.budget.held == sum(state.budget.by_service.values())
    assert all(t.master_tid for t in state.tasks.values())
    for lane in state.lanes.values():
        assert all(tid in state.tasks for tid in lane.inflight)
