"""What a msgpack header would cost once decoded, found before decoding it.

Why: msgpack's own limits bound lengths, not objects. One byte (``0x80``, an empty map) becomes a
64-byte dict, so a 7.6 MiB header of empty maps decoded to +551 MiB (issue 12). This walks the
header's structure without building anything, skipping over string and binary bodies, and adds up
what CPython would allocate for each object (sizes of CPython 3.11 on 64 bits, rounded up, plus
the 8-byte slot its container holds it in). :func:`check` refuses a header whose estimate exceeds
its budget, so the decoder's memory stays within a small factor of the frame it came in.

Cost: one step per object, not per byte; callers skip it for headers too small to matter.
"""

from __future__ import annotations

from ndpipe.errors import DecodeError

MAX_PER_BYTE = 80  # the most one byte of msgpack can cost (0x80, an empty map: 64 + its slot)
SLOT = 8  # the pointer a list, dict or tuple keeps per element
_INT, _FLOAT, _STR, _BYTES = 36, 32, 57, 41  # int beyond the cached small ones; float; str, bytes + body
_LIST, _DICT, _DICT_ITEM = 56, 64, 64  # empty list / dict; each dict entry (its hash table share, amortised)
# Fixed-size scalars: first byte -> (bytes after it, cost).
_FIXED = {0xC0: (0, SLOT), 0xC2: (0, SLOT), 0xC3: (0, SLOT), 0xCA: (4, _FLOAT + SLOT), 0xCB: (8, _FLOAT + SLOT),
          0xCC: (1, _INT + SLOT), 0xCD: (2, _INT + SLOT), 0xCE: (4, _INT + SLOT), 0xCF: (8, _INT + SLOT),
          0xD0: (1, _INT + SLOT), 0xD1: (2, _INT + SLOT), 0xD2: (4, _INT + SLOT), 0xD3: (8, _INT + SLOT),
          0xD4: (2, SLOT), 0xD5: (3, SLOT), 0xD6: (5, SLOT), 0xD7: (9, SLOT), 0xD8: (17, SLOT)}
_SIZED = {0xC4: (1, _BYTES), 0xC5: (2, _BYTES), 0xC6: (4, _BYTES), 0xC7: (1, SLOT), 0xC8: (2, SLOT),
          0xC9: (4, SLOT), 0xD9: (1, _STR), 0xDA: (2, _STR), 0xDB: (4, _STR)}  # length octets, cost
_CONTAINERS = {0xDC: (2, False), 0xDD: (4, False), 0xDE: (2, True), 0xDF: (4, True)}  # length octets, map?


def estimate(header: bytes | memoryview, budget: int) -> int:
    """The estimated decoded size of ``header`` in bytes, or a DecodeError as soon as it passes
    ``budget``. A truncated or malformed header is left for msgpack to refuse (its message is better)."""
    data = memoryview(header).cast("B") if not isinstance(header, bytes) else header
    end, pos, cost = len(data), 0, 0
    pending = 1  # objects still to read: the top one, then each container's elements
    while pending and pos < end and cost <= budget:
        pending -= 1
        lead = data[pos]
        pos += 1
        if lead <= 0x7F or lead >= 0xE0:  # fixint: a cached small int
            cost += SLOT
            continue
        if lead <= 0x8F or 0x90 <= lead <= 0x9F:  # fixmap, fixarray
            n, is_map = lead & 0x0F, lead <= 0x8F
        elif 0xA0 <= lead <= 0xBF:  # fixstr
            n = lead & 0x1F
            pos += n
            cost += SLOT if n <= 1 else _STR + n  # "" and one character are cached
            continue
        elif lead in _FIXED:
            skip, price = _FIXED[lead]
            pos += skip
            cost += price
            continue
        elif lead in _SIZED:
            width, price = _SIZED[lead]
            n = int.from_bytes(data[pos:pos + width], "big")
            pos += width + n
            if pos > end:  # a body longer than what is there: truncated
                return cost
            cost += price + n
            continue
        elif lead in _CONTAINERS:
            width, is_map = _CONTAINERS[lead]
            n = int.from_bytes(data[pos:pos + width], "big")
            pos += width
        else:  # 0xC1, never used: msgpack refuses it
            return cost
        if is_map:
            cost += _DICT + SLOT + _DICT_ITEM * n
            pending += 2 * n
        else:  # its elements' slots are counted with them
            cost += _LIST + SLOT
            pending += n
    if cost > budget:
        raise DecodeError(f"header of {len(data)} bytes would decode to over {budget} bytes of Python objects: "
                          "too many small objects (send numbers as numpy arrays)")
    return cost
