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

import re

from ndpipe.errors import DecodeError

SMALL = 1024  # headers up to this size are not walked: at most ~80 bytes of objects per octet, and
# msgpack's reservations are capped by the header's size (codec._unpack), so they stay small
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


_ONE_BYTE = re.compile(rb"[\x00-\x7f\xe0-\xff\xc0\xc2\xc3]+")  # fixints, nil, bools: one octet, one slot


def estimate(header: bytes | memoryview, budget: int) -> int:
    """The estimated decoded size of ``header`` in bytes; a DecodeError as soon as it passes ``budget``,
    or when its containers declare more elements than it has octets left (msgpack reserves a list's
    slots from its declared length before reading them: 1,000 nested truncated array headers, 5 KB,
    took 76 MiB). Other malformed input is left for msgpack to refuse (its message is better)."""
    data = header if isinstance(header, bytes) else bytes(header)
    end, pos, cost = len(data), 0, 0
    pending = 1  # objects still to read: the top one, then each container's elements
    while pending and pos < end and cost <= budget:
        lead = data[pos]
        if lead <= 0x7F or lead >= 0xE0 or lead in (0xC0, 0xC2, 0xC3):  # a run of one-octet objects, at C speed
            run = _ONE_BYTE.match(data, pos)
            assert run is not None
            k = min(run.end() - pos, pending)
            pos, pending, cost = pos + k, pending - k, cost + SLOT * k
            continue
        pending -= 1
        pos += 1
        if lead <= 0x9F:  # fixmap 0x80-0x8f, fixarray 0x90-0x9f
            n, is_map = lead & 0x0F, lead <= 0x8F
        elif lead <= 0xBF:  # fixstr
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
        if pending > end - pos:
            raise DecodeError(f"header of {end} bytes declares {pending} more objects than it has bytes left "
                              f"({end - pos}): truncated, or built to make the decoder reserve memory")
    if cost > budget:
        raise DecodeError(f"header of {len(data)} bytes would decode to over {budget} bytes of Python objects: "
                          "too many small objects (send numbers as numpy arrays)")
    return cost
