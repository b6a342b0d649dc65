"""Bounded decoding (issue 12, item 5): a header's Python objects are estimated before msgpack builds
them, and a header that would decode to far more than its size is refused without being decoded."""

from __future__ import annotations

import resource
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest

from ndpipe.codec import Limits, decode, encode
from ndpipe.errors import DecodeError
from ndpipe.msgcost import estimate

pytestmark = pytest.mark.timeout(60)

SHAPES: dict[str, Any] = {
    "empty maps": [{}] * 20_000,
    "empty lists": [[]] * 20_000,
    "short strings": ["ab"] * 20_000,
    "small ints": list(range(100)) * 200,
    "floats": [1.5] * 20_000,
    "large ints": [10**12] * 20_000,
    "str-keyed dict": {str(i): i for i in range(10_000)},
    "bytes": [b"abcdefgh"] * 10_000,
    "nested": [[{"a": [1, 2]}]] * 5_000,
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_estimate_is_within_a_factor_of_two_of_what_msgpack_allocates(name: str) -> None:
    header = msgpack.packb(SHAPES[name], use_bin_type=True)
    tracemalloc.start()
    try:
        value = msgpack.unpackb(header, raw=False, strict_map_key=False)
        real, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value is not None
    assert real / 2 <= estimate(header, 1 << 40) <= 2 * real


def test_the_amplification_payload_is_refused_before_it_is_decoded() -> None:
    """The issue's reproduction: 7.6 MiB of empty maps decoded to +551 MiB. Now refused, and the
    process did not grow on the way (max RSS is measured around the call)."""
    header = msgpack.packb([{}] * 7_600_000, use_bin_type=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DecodeError, match="too many small objects"):
        decode([header])
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"max RSS grew {grown_kib} KiB"


def test_ordinary_payloads_pass_and_arrays_in_frames_are_not_counted() -> None:
    big = np.arange(4_000_000, dtype=np.float64)  # 32 MB in its own frame: a view, not objects
    value = {"x": big, "ids": list(range(50_000)), "names": [f"n{i}" for i in range(20_000)]}
    out = decode(encode(value))
    assert np.array_equal(out["x"], big) and out["ids"][-1] == 49_999
    tight = Limits(max_amplification=2, object_bytes_floor=1024)
    with pytest.raises(DecodeError, match="too many small objects"):
        decode(encode(list(range(50_000))), tight)


def test_truncated_or_odd_headers_are_refused_cleanly() -> None:
    for raw in (b"\xdd\xff\xff\xff\xff", b"\xc1", b"\xdf\x00\x00\x00\x05\xa1a", b"\xc6\xff\xff\xff\xff"):
        try:
            estimate(raw, 1 << 30)  # terminates; a DecodeError of its own or a figure
        except DecodeError:
            pass
        with pytest.raises(DecodeError):
            decode([raw])


def test_nested_containers_declaring_more_than_the_header_holds_are_refused_before_msgpack_reserves() -> None:
    """msgpack reserves a list's slots from its declared length before reading the elements: 1,000
    nested array headers each declaring 1,000,000 elements (5 KB) took 76 MiB before it noticed."""
    header = b"\xdd\x00\x0f\x42\x40" * 1000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="more objects than it has bytes left"):
            decode([header])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    small = b"\xdd\x00\x00\x01\x00" * 100  # under the walk's threshold: msgpack's own caps hold
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            decode([small])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_runs_of_one_octet_objects_are_counted_exactly() -> None:
    """A list of small ints, nils and bools is one slot per octet (the walk takes such runs whole)."""
    values = [*range(100), None, True, False, -3] * 25_000
    header = msgpack.packb([values, [1, 2]], use_bin_type=True)
    assert estimate(header, 1 << 40) == 8 * (len(values) + 2) + 3 * 64
