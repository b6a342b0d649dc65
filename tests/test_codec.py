"""Tests for ndpipe.codec: bit-exact roundtrips, zero-copy frames, and hostile-input rejection."""

from __future__ import annotations

import math
import pickle
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ndpipe.codec import DEFAULT_LIMITS, INLINE_MAX, Limits, decode, decode_call, encode, encode_call
from ndpipe.errors import DecodeError, EncodeError

pytestmark = pytest.mark.timeout(60)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -----------------------------------------------------------------------------------

NUMERIC_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64, 128)),
    hnp.complex_number_dtypes(endianness="?", sizes=(64, 128, 256)),
)
LAYOUTS = st.sampled_from(["C", "F", "slice", "transpose"])


@st.composite
def raw_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays filled from arbitrary bytes (NaN payloads, -0.0, odd bools) in various memory layouts."""
    dtype = draw(NUMERIC_DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    size = math.prod(shape) * dtype.itemsize
    data = draw(st.binary(min_size=size, max_size=size))
    arr: np.ndarray = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    layout = draw(LAYOUTS)
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "slice" and arr.ndim:
        arr = arr[::2]
    elif layout == "transpose":
        arr = arr.T
    return arr


def raw_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).view(np.uint8).tobytes()


def assert_bit_exact(got: Any, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype and got.dtype.str == want.dtype.str
    assert got.shape == want.shape
    assert raw_bytes(got) == raw_bytes(want)


NP_SCALARS = NUMERIC_DTYPES.flatmap(lambda dt: hnp.arrays(dt, ())).map(lambda a: a[()])
KEYS = st.one_of(
    st.text(max_size=8), st.binary(max_size=8).filter(lambda b: b != b"nd"), st.integers(-(2**63), 2**63 - 1)
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.complex_numbers(),
    st.text(),
    st.binary(),
    NP_SCALARS,
)
VALUES = st.recursive(
    LEAVES,
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.tuples(kids, kids), st.dictionaries(KEYS, kids, max_size=5)),
    max_leaves=30,
)


def assert_same(got: Any, want: Any) -> None:
    """Type-exact, bit-exact comparison; tuples come back as lists, complex as np.complex128."""
    if isinstance(want, tuple | list):
        assert type(got) is list and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, np.generic):
        assert type(got) is type(want) and got.tobytes() == want.tobytes()
    elif type(want) is complex:
        assert type(got) is np.complex128 and np.complex128(want).tobytes() == got.tobytes()
    elif type(want) is float:
        assert type(got) is float and np.float64(got).tobytes() == np.float64(want).tobytes()
    else:
        assert type(got) is type(want) and got == want


# --- roundtrips -----------------------------------------------------------------------------------


@FAST
@given(arr=raw_arrays(), inline_max=st.sampled_from([0, INLINE_MAX]))
def test_array_roundtrip_bit_exact(arr: np.ndarray, inline_max: int) -> None:
    frames = encode(arr, inline_max=inline_max)
    assert len(frames) == (1 if inline_max else 2)
    for variant in (frames, [bytes(f) for f in frames]):
        got = decode(variant)
        assert_bit_exact(got, arr)
        if arr.flags.f_contiguous and not arr.flags.c_contiguous:
            assert got.flags.f_contiguous


@FAST
@given(value=VALUES, inline_max=st.sampled_from([0, INLINE_MAX]))
def test_nested_roundtrip(value: Any, inline_max: int) -> None:
    assert_same(decode(encode(value, inline_max=inline_max)), value)


@FAST
@given(args=st.lists(VALUES, max_size=4), kwargs=st.dictionaries(st.text(max_size=8), VALUES, max_size=4))
def test_call_roundtrip(args: list[Any], kwargs: dict[str, Any]) -> None:
    got_args, got_kwargs = decode_call(encode_call(tuple(args), kwargs))
    assert_same(got_args, args)
    assert_same(got_kwargs, kwargs)


def test_mixed_structure_with_arrays() -> None:
    big = np.arange(50_000, dtype=">f8").reshape(100, 500)
    value = {"a": [big, np.asfortranarray(big), big[:, ::3]], "s": np.float32(1.5), 7: (1j, None), b"k": b"v"}
    frames = encode(value)
    assert len(frames) == 4
    got = decode(frames)
    for g, w in zip(got["a"], value["a"], strict=True):
        assert_bit_exact(g, w)
    assert got["a"][1].flags.f_contiguous
    assert type(got["s"]) is np.float32 and got["s"] == 1.5
    assert got[7] == [1j, None] and got[b"k"] == b"v"


def test_out_of_band_zero_copy_on_encode() -> None:
    c = np.arange(20_000, dtype=np.float64).reshape(100, 200)
    f = np.asfortranarray(c)
    frames = encode([c, f, c[::2]])
    header = msgpack.unpackb(frames[0])
    assert [m[b"buf"] for m in header] == [1, 2, 3]
    assert header[1][b"order"] == b"F" and b"order" not in header[0]
    assert np.shares_memory(np.asarray(frames[1]), c)
    assert np.shares_memory(np.asarray(frames[2]), f)
    assert not np.shares_memory(np.asarray(frames[3]), c)  # non-contiguous: one copy


def test_inline_arrays_are_writable_copies() -> None:
    arr = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    got = decode([bytes(encode(arr)[0])])
    assert got.flags.writeable and got.flags.f_contiguous and got.flags.owndata
    got[0, 0] = 99
    assert arr[0, 0] == 0


def test_zmq_frames_decode_writable_zero_copy() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://codec-test")
        b.connect("inproc://codec-test")
        arr = np.arange(1 << 18, dtype=np.float32)
        a.send_multipart(encode_call((arr, "x"), {"k": arr[::2]}), copy=False)
        frames = b.recv_multipart(copy=False)
        assert all(isinstance(f, zmq.Frame) for f in frames) and len(frames) == 3
        (got, s), kwargs = decode_call(frames)
        assert s == "x"
        np.testing.assert_array_equal(got, arr)
        assert got.flags.writeable and kwargs["k"].flags.writeable
        assert np.shares_memory(got, np.asarray(frames[1].buffer))
        got[0] = 42.0
        assert np.frombuffer(frames[1].buffer, np.float32)[0] == 42.0
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_msgpack_numpy_interop() -> None:
    arr = np.arange(12, dtype="<i2").reshape(3, 4)
    assert_bit_exact(decode([msgpack_numpy.packb(arr)]), arr)
    assert_bit_exact(msgpack_numpy.unpackb(encode(arr)[0]), arr)


def test_subclasses_are_normalised() -> None:
    import collections
    import enum

    class Color(enum.IntEnum):
        RED = 3

    got = decode(encode([collections.OrderedDict(a=1), Color.RED, np.str_("s"), np.bytes_(b"b"), np.float64(2.5)]))
    assert got == [{"a": 1}, 3, "s", b"b", 2.5]
    assert type(got[1]) is int and type(got[2]) is str and type(got[4]) is np.float64


# --- encode errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (np.array([1, "a"], dtype=object), "'|O'"),
        (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), "kind 'V'"),
        (np.zeros(2, dtype="datetime64[s]"), "M8"),
        (np.datetime64("2020-01-01"), "M8"),
        (np.array(["ab"]), "<U2"),
        ({1, 2}, "set"),
        (object(), "object"),
        (2**64, "int out of"),
    ],
)
def test_encode_errors(value: Any, needle: str) -> None:
    with pytest.raises(EncodeError, match="cannot encode") as info:
        encode({"x": [0, value]})
    assert needle in str(info.value)
    assert "value['x'][1]" in str(info.value)


def test_encode_call_error_names_path() -> None:
    with pytest.raises(EncodeError, match=r"set at args\[1\]\['x'\]"):
        encode_call((1, {"x": {3}}), {})
    with pytest.raises(EncodeError, match=r"kwargs\['k'\]"):
        encode_call((), {"k": np.zeros(1, dtype=object)})


# --- hostile input --------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    header: bytes = msgpack.packb(obj, use_bin_type=True)
    return header


def nd(**changes: Any) -> dict[bytes, Any]:
    """A valid inline array map for int32 [1, 2], with keys changed (value None removes the key)."""
    base: dict[bytes, Any] = {
        b"nd": True,
        b"type": "<i4",
        b"kind": b"",
        b"shape": [2],
        b"data": b"\1\0\0\0\2\0\0\0",
    }
    for key, value in changes.items():
        if value is None:
            base.pop(key.encode(), None)
        else:
            base[key.encode()] = value
    return base


def oob(index: Any = 1, **changes: Any) -> dict[bytes, Any]:
    return nd(data=None, buf=index, **changes)


def test_valid_handcrafted_maps_decode() -> None:  # guards the helpers below
    assert decode([pack(nd())]).tolist() == [1, 2]
    assert decode([pack(oob()), bytes(8)]).tolist() == [0, 0]


PICKLED = pickle.dumps(np.array([1, 2], dtype=object))


@pytest.mark.parametrize(
    ("frames", "needle"),
    [
        ([msgpack_numpy.packb(np.array([1, 2], dtype=object))], "kind b'O' refused"),
        ([pack(nd(type="|O", data=PICKLED))], "'|O' not allowed"),
        ([pack(nd(type="O", data=PICKLED, shape=[1]))], "'O' not allowed"),
        (
            [pack(nd(type=[["a", "<i4"], ["b", "|O"]], kind=b"V", shape=[1], data=bytes(12)))],
            "kind b'V' refused",
        ),
        ([pack(nd(type=[["a", "<i4"], ["b", "|O"]], shape=[1], data=bytes(12)))], "short dtype string"),
        ([pack(nd(type="<i4,<f8"))], "not allowed"),
        ([pack(nd(type="(2,)<i4"))], "not allowed"),
        ([pack(nd(type="<M8[s]"))], "not allowed"),
        ([pack(nd(type="<U2"))], "not allowed"),
        ([pack(nd(type="nonsense"))], "invalid dtype string"),
        ([pack(nd(data=bytes(7)))], "wrong byte count"),
        ([pack(nd(data=bytes(9)))], "wrong byte count"),
        ([pack(oob()), bytes(7)], "wrong byte count"),
        ([pack(oob()), bytes(9)], "wrong byte count"),
        ([pack(nd(shape=[2**40, 2**40]))], "exceeds max_array_bytes"),
        ([pack(oob(shape=[2**40, 2**40])), b""], "exceeds max_array_bytes"),
        ([pack(nd(shape=[-2]))], "non-negative"),
        ([pack(nd(shape=[2.0]))], "non-negative ints"),
        ([pack(nd(shape=[True, 2]))], "non-negative ints"),
        ([pack(nd(shape=[1] * 100))], "ndim 100 exceeds"),
        ([pack(nd(shape=2))], "shape must be a list"),
        ([pack(nd(shape="2"))], "shape must be a list"),
        ([pack(nd(shape=None))], "shape must be a list"),
        ([pack(nd(data="text"))], "must be bytes"),
        ([pack(nd(buf=1)), bytes(8)], "exactly one of"),
        ([pack(nd(data=None))], "exactly one of"),
        ([pack(nd(order=b"X"))], "order"),
        ([pack(nd(extra=1))], "unknown keys"),
        ([pack(nd(nd=1))], "True or False"),
        ([pack(oob(2)), bytes(8)], "out of range"),
        ([pack(oob(0)), bytes(8)], "out of range"),
        ([pack(oob(-1)), bytes(8)], "out of range"),
        ([pack(oob("1")), bytes(8)], "out of range"),
        ([pack(oob(1.0)), bytes(8)], "out of range"),
        ([pack(oob(True)), bytes(8)], "out of range"),
        ([pack(oob(1))], "missing frame"),
        ([pack([oob(1), oob(2)]), bytes(8)], "missing frame"),
        ([pack([oob(1), oob(1)]), bytes(8)], "referenced twice"),
        ([pack(oob(1)), bytes(8), bytes(8)], "extra frames"),
        ([pack([1, 2]), b"junk"], "extra frames"),
        ([pack({b"nd": False, b"type": "<f8", b"data": bytes(4)})], "wrong byte count"),
        ([pack({b"nd": False, b"type": "|O", b"data": bytes(8)})], "not allowed"),
        ([pack({b"nd": False, b"type": "<f8"})], "expected nd/type/data"),
        ([pack({b"nd": "yes"})], "True or False"),
        ([pack({b"nd": True, b"type": "<i4", b"shape": [0, 2**63], b"data": b""})], "bad array map"),
        ([b"\xc1garbage"], "not valid msgpack"),
        ([pack({"a": [1, 2, 3]})[:-1]], "truncated"),
        ([pack([1, 2]) + b"\x00"], "trailing bytes"),
        ([b"hello"], "trailing bytes"),
        ([b""], "truncated"),
        ([b"\xd4\x05\x00"], "max_ext_len"),
        ([b"\xc7\x00\x05"], "ext type 5 not allowed"),
        ([b"\xd6\xff\x00\x00\x00\x00"], "max_ext_len"),
        ([pack({(1,): 1})], "undecodable header"),
        ([b"\x81\x91\x01\x02"], "unhashable"),
        ([], "empty message"),
    ],
)
def test_hostile_input(frames: list[bytes], needle: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert needle in str(info.value)
    err = info.value
    if err.cause is not None:
        assert err.__cause__ is err.cause


FUZZ_BASE = encode(
    {"a": np.arange(6, dtype="<i4").reshape(2, 3), "f": np.asfortranarray(np.ones((2, 2))), "s": np.float32(1)},
    inline_max=16,
)


@FAST
@given(
    edits=st.lists(st.tuples(st.integers(0, len(FUZZ_BASE[0]) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, len(FUZZ_BASE[0])),
    extra=st.lists(st.binary(max_size=40), max_size=3),
    drop=st.booleans(),
)
def test_fuzzed_headers_only_raise_decode_error(
    edits: list[tuple[int, int]], cut: int, extra: list[bytes], drop: bool
) -> None:
    header = bytearray(FUZZ_BASE[0])
    for pos, byte in edits:
        header[pos] = byte
    frames: list[Any] = [bytes(header[:cut] if cut < len(header) and drop else header)]
    frames += [bytes(f) for f in FUZZ_BASE[1:]] + extra
    try:
        value = decode(frames)
    except DecodeError:
        return
    assert_only_plain_numeric(value)


def assert_only_plain_numeric(value: Any) -> None:
    """What a payload decodes to holds arrays and scalars of dtype kinds b, i, u, f, c only."""
    if isinstance(value, dict):
        for v in value.values():
            assert_only_plain_numeric(v)
    elif isinstance(value, list):
        for v in value:
            assert_only_plain_numeric(v)
    elif isinstance(value, (np.ndarray, np.generic)):
        assert value.dtype.kind in "biufc" and not value.dtype.hasobject, value.dtype


# Every dtype string numpy understands, in every byte order: most must be refused.
DTYPE_SPECS = sorted({order + code + size for code in np.typecodes["All"] + "USVOMm"
                      for size in ("", "1", "2", "4", "8", "16", "[s]", "[D]") for order in "<>=|"})


@FAST
@given(spec=st.sampled_from(DTYPE_SPECS), inline=st.booleans())
def test_fuzzed_dtypes_decode_only_to_allowed_kinds(spec: str, inline: bool) -> None:
    try:
        nbytes = 2 * np.dtype(spec).itemsize  # the right byte count: only the dtype may be refused
    except (TypeError, ValueError):
        nbytes = 32
    body = {b"nd": True, b"type": spec, b"kind": b"", b"shape": [2]}
    frames: list[Any] = [msgpack.packb({**body, b"data": bytes(nbytes)} if inline else {**body, b"buf": 0})]
    if not inline:
        frames.append(bytes(nbytes))
    try:
        value = decode(frames)
    except DecodeError:
        return
    assert_only_plain_numeric(value)


def test_hostile_errors_chain_their_cause() -> None:
    with pytest.raises(DecodeError) as info:
        decode([b"\xc1"])
    assert isinstance(info.value.cause, msgpack.FormatError) and info.value.__cause__ is info.value.cause
    with pytest.raises(DecodeError) as info:
        decode([pack(nd(type="nonsense"))])
    assert isinstance(info.value.cause, TypeError) and info.value.__cause__ is info.value.cause


def test_too_many_frames() -> None:
    with pytest.raises(DecodeError, match="too many frames"):
        decode([pack(None)] + [b""] * (DEFAULT_LIMITS.max_frames + 1))


def test_custom_limits() -> None:
    frames = encode([np.zeros((2, 3)), list(range(10))], inline_max=0)
    with pytest.raises(DecodeError, match="header too large"):
        decode(frames, Limits(max_header_bytes=8))
    with pytest.raises(DecodeError, match="ndim 2 exceeds"):
        decode(frames, Limits(max_ndim=1))
    with pytest.raises(DecodeError, match="max_array_bytes"):
        decode(frames, Limits(max_array_bytes=47))
    with pytest.raises(DecodeError, match="exceeds limits"):
        decode(frames, Limits(max_container_len=5))
    with pytest.raises(DecodeError, match="too many frames"):
        decode(frames, Limits(max_frames=0))
    assert decode(frames, Limits(max_array_bytes=48, max_ndim=2, max_container_len=10))[0].shape == (2, 3)


N = 2_000_000
# Each about 2 MB, built lazily so test ids and failure reports stay short. Decoded, any of them would
# take 30+ MiB of Python objects, so the 8 MiB peak below still tells a refusal from a decode; and
# tracemalloc slows the walk ~20× (10 MB headers took 12-19 s each under it, 0.5-0.8 s without).
BIG_HEADERS: dict[str, tuple[Callable[[], bytes], str]] = {
    # Refused by the object budget (ndpipe.msgcost) before msgpack sees them, or by msgpack's limits.
    "wide-array-of-maps": (lambda: b"\xdd" + N.to_bytes(4, "big") + b"\x80" * N, "too many small objects"),
    "wide-map": (lambda: b"\xdf" + N.to_bytes(4, "big") + b"\x90" * N, "more objects than it has bytes left"),
    "deep-arrays": (lambda: b"\x91" * N + b"\x90", "too many small objects"),
    "deep-maps": (lambda: b"\x81\xa1k" * (N // 3) + b"\x80", "too many small objects"),
    "huge-bin-length": (lambda: b"\xc6" + (2**31).to_bytes(4, "big") + b"x" * N, "truncated|exceeds"),
    "huge-str-length": (lambda: b"\xdb" + (2**32 - 1).to_bytes(4, "big") + b"x" * N, "truncated|exceeds"),
}


@pytest.mark.parametrize("name", sorted(BIG_HEADERS))
def test_big_hostile_headers_fail_fast(name: str) -> None:
    build, needle = BIG_HEADERS[name]
    header = build()
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=needle):
            decode([header])  # the module's timeout bounds how long this may take
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_huge_shape_does_not_allocate() -> None:
    tracemalloc.start()
    try:
        for shape in ([2**40, 2**40], [2**31, 2**31, 2**31], [2**34]):
            with pytest.raises(DecodeError, match="max_array_bytes"):
                decode([pack(nd(shape=shape, type="<f8"))])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_reserved_nd_key_in_user_dict_fails_on_decode() -> None:
    with pytest.raises(DecodeError):
        decode(encode({b"nd": 1}))
    assert decode(encode({"nd": 1})) == {"nd": 1}  # the str key is not reserved


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        [[1], {}, 3],
        [1, 2],
        ([1], {1: 2}),
        [[1], {b"k": 1}],
        [[], {"a": 1}, 1],
        {"args": [], "kwargs": {}},
    ],
)
def test_decode_call_rejects_non_call_payloads(value: Any) -> None:
    with pytest.raises(DecodeError, match="call payload"):
        decode_call([pack(value)])


def test_decode_call_accepts_call_payload() -> None:
    assert decode_call([pack([[1, "a"], {"k": b"v"}])]) == ([1, "a"], {"k": b"v"})


def test_too_deep_nesting_is_an_encode_error() -> None:
    value: list[object] = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(EncodeError):
        encode(value)


def test_a_masked_array_is_refused_instead_of_losing_its_mask() -> None:
    """Issue 13, finding 11: a masked array travelled as its filled data (999999 appeared, mask lost)."""
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    with pytest.raises(EncodeError, match="mask would be lost"):
        encode([masked])
    assert np.array_equal(decode(encode([masked.filled(0.0), np.ma.getmaskarray(masked)]))[1], [False, True, False])
