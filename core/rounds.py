"""The frames of an iteration (``Master.iterate``, PROTOCOL.md §5.7), shared by master, broker and lanes.

Every iteration message is ``header, command, run id (16 octets), control map, payload frames...``.
The control map is msgpack (at most ``ITER_CONTROL_MAX`` octets); where payload frames follow, the map
says how many belong to each value (``state``: frames of the partition's state; index lists such as
``[[src, dst, n], ...]``: ``n`` frames for the message from ``src`` to ``dst``), and the counts must add
up to the frames present exactly. The command constants live in :mod:`ndpipe.protocol`; this module
builds and checks the rest, and raises :class:`~ndpipe.errors.ProtocolError` for anything malformed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from ndpipe import protocol as P
from ndpipe.errors import ProtocolError

Frames = list[Any]


def frames(header: bytes, command: bytes, run: bytes, ctl: dict[str, Any], payload: Sequence[Any] = ()) -> Frames:
    """One iteration message (without the routing id)."""
    return [header, command, run, msgpack.packb(ctl, use_bin_type=True), *payload]


def parse(msg: Sequence[Any], header: bytes) -> tuple[bytes, dict[str, Any], list[Any]]:
    """(run id, control map, payload frames) of an iteration message."""
    P.check_header(msg, header, 4)
    run = P._b(msg[2])
    if len(run) != P.RUN_ID_BYTES:
        raise ProtocolError(f"an iteration's run id is {P.RUN_ID_BYTES} octets, got {len(run)}")
    raw = P._b(msg[3])
    if len(raw) > P.ITER_CONTROL_MAX:
        raise ProtocolError(f"iteration control map of {len(raw)} octets (at most {P.ITER_CONTROL_MAX})")
    try:
        ctl = msgpack.unpackb(raw, raw=False, strict_map_key=False, max_map_len=P.MAX_PARTITIONS * 4 + 64,
                              max_array_len=P.MAX_PARTITIONS * P.MAX_PARTITIONS + 64, max_str_len=1 << 20)
    except Exception as exc:
        raise ProtocolError(f"iteration control map is not msgpack: {exc}") from exc
    if not isinstance(ctl, dict):
        raise ProtocolError(f"iteration control must be a map, got {type(ctl).__name__}")
    return run, ctl, list(msg[4:])


def num(ctl: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """An int field of a control map, within [lo, hi]."""
    value = ctl.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"iteration control needs {key} (int {lo}..{hi}), got {value!r:.80}")
    return value


def part_of(ctl: dict[str, Any], parts: int, key: str = "part") -> int:
    return num(ctl, key, 0, parts - 1)


def index(ctl: dict[str, Any], key: str, width: int, parts: int) -> list[tuple[int, ...]]:
    """A list of ``[p1, ..., n]`` entries (``width - 1`` partition numbers and a frame count >= 1)."""
    raw = ctl.get(key, [])
    if not isinstance(raw, list):
        raise ProtocolError(f"iteration control {key} must be a list, got {type(raw).__name__}")
    out = []
    for entry in raw:
        if (not isinstance(entry, list) or len(entry) != width
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
                or not all(0 <= v < parts for v in entry[:-1]) or not 1 <= entry[-1] <= P.MAX_FRAMES + 1):
            raise ProtocolError(f"iteration control {key}: bad entry {entry!r:.80} (partitions < {parts})")
        out.append(tuple(entry))
    return out


def split(payload: Sequence[Any], counts: Sequence[int]) -> list[list[Any]]:
    """Cut ``payload`` into consecutive runs of ``counts`` frames; they must use every frame."""
    if sum(counts) != len(payload):
        raise ProtocolError(f"iteration message: the control map names {sum(counts)} frames, {len(payload)} came")
    out, at = [], 0
    for n in counts:
        out.append(list(payload[at:at + n]))
        at += n
    return out
