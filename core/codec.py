"""Payload codec: Python/numpy values <-> a list of ZeroMQ frames, without pickle.

Frame 0 is a msgpack header (``use_bin_type=True``); frames 1.. are raw array buffers, so large
arrays travel zero-copy. Arrays and numpy scalars use msgpack-numpy's map format::

    {b"nd": True, b"type": dtype.str, b"kind": b"", b"shape": [...], b"data": <bytes>}  # inline
    {b"nd": True, b"type": dtype.str, b"kind": b"", b"shape": [...], b"buf": i}  # in frame i
    {b"nd": False, b"type": dtype.str, b"data": <bytes>}  # numpy scalar

plus ``b"order": b"F"`` for Fortran-ordered arrays, and for an array sent once
(:class:`~ndpipe.refs.Ref`, ``Master.put``)::

    {b"nd": True, b"ref": <16-octet digest>, b"type": dtype.str, b"kind": b"", b"shape": [...]}

which only a decoder given ``refs`` (a worker's lane, which fetches and caches the bytes) turns into
the array; anywhere else it is a DecodeError. Python ``complex`` travels as a numpy
complex128 scalar; tuples decode as lists. Only dtype kinds b, i, u, f, c are supported; a masked
array is refused (EncodeError: its mask would be lost), send its filled values and its mask.

Reserved: a map with the bytes key ``b"nd"`` is always read as one of the maps above, so user dicts
must not use that key (the str key ``"nd"`` is fine). ``encode`` does not scan for it (hot path);
such a dict fails in ``decode`` with :class:`DecodeError`. Dict keys should be str, bytes or int:
tuple keys are sent as lists and cannot be decoded.

Decoding treats input as hostile: msgpack runs with explicit limits, every array map is checked
(dtype, shape, declared size, frame use) before a buffer is touched, and every failure is a
:class:`DecodeError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zmq

from ndpipe import msgcost
from ndpipe.errors import DecodeError, EncodeError
from ndpipe.protocol import DIGEST_BYTES
from ndpipe.refs import Ref

__all__ = [
    "DEFAULT_LIMITS", "INLINE_MAX", "Limits", "batch_length", "decode", "decode_batch", "decode_call",
    "decode_outcomes", "encode", "encode_batch", "encode_call",
]

INLINE_MAX: int = 64 * 1024
"""Arrays with fewer bytes than this travel inside the header; larger ones in their own frame."""

Frames = Sequence[bytes | memoryview | zmq.Frame]

_KINDS = frozenset("biufc")
_ARRAY_KEYS = frozenset({b"nd", b"type", b"kind", b"shape", b"data", b"buf", b"order", b"ref"})
RefResolver = Callable[[Ref], Any]  # a lane's: the array a ref names, read-only (DecodeError if gone)
_SCALAR_KEYS = frozenset({b"nd", b"type", b"data"})
_PLAIN: tuple[type[Any], ...] = (dict, str, bytes, float, int)  # targets for subclasses (strict_types)
_DTYPE_CACHE: dict[str, np.dtype[Any]] = {}  # dtypes that passed the checks; bounded by _DTYPE_CACHE_MAX
_DTYPE_CACHE_MAX = 256


@dataclass(frozen=True)
class Limits:
    """Bounds applied while decoding, so hostile input cannot exhaust memory or CPU."""

    max_header_bytes: int = 64 * 1024 * 1024
    max_frames: int = 1024  # buffer frames per message
    max_ndim: int = 32
    max_array_bytes: int = 2**34  # declared size of one array
    max_container_len: int = 1_000_000  # msgpack array/map length
    # Python objects a header may create, in estimated bytes (ndpipe.msgcost): at most
    # ``max_amplification`` times the header's size, or ``object_bytes_floor`` for a small header.
    # Arrays in their own frames are not counted: they are views of the frames, not copies.
    max_amplification: int = 16
    object_bytes_floor: int = 16 * 1024 * 1024


DEFAULT_LIMITS = Limits()


# --- encoding -------------------------------------------------------------------------------------


def _unsupported(obj: Any) -> EncodeError:
    if isinstance(obj, (np.ndarray, np.generic)):
        kind = obj.dtype.kind
        return EncodeError(f"unsupported numpy dtype {obj.dtype.str!r} (kind {kind!r}), {type(obj).__name__}")
    return EncodeError(f"unsupported type {type(obj).__module__}.{type(obj).__qualname__}")


def _encode_array(arr: np.ndarray[Any, Any], inline_max: int, bufs: list[bytes | memoryview]) -> Any:
    """Inline small arrays; give large ones their own zero-copy frame (one copy if non-contiguous)."""
    if arr.dtype.kind not in _KINDS:
        raise _unsupported(arr)
    fortran = arr.flags.f_contiguous and not arr.flags.c_contiguous
    out: dict[bytes, Any] = {b"nd": True, b"type": arr.dtype.str, b"kind": b"", b"shape": list(arr.shape)}
    if arr.nbytes < inline_max:
        out[b"data"] = arr.tobytes(order="F" if fortran else "C")
    else:
        flat = arr.ravel(order="F") if fortran else np.ascontiguousarray(arr).ravel()  # views unless copied
        bufs.append(flat.view(np.uint8).data)
        out[b"buf"] = len(bufs)
    if fortran:
        out[b"order"] = b"F"
    return out


def _encode_generic(obj: np.generic[Any]) -> Any:
    kind = obj.dtype.kind
    if kind in _KINDS:
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    if kind in "US":  # np.str_ / np.bytes_ are plain strings on the wire
        return obj.item()
    raise _unsupported(obj)


def _make_default(inline_max: int, bufs: list[bytes | memoryview]) -> Callable[[Any], Any]:
    """Build the packb ``default`` hook; it appends out-of-band buffers to ``bufs``."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if isinstance(obj, np.ma.MaskedArray):  # its data alone would arrive with the mask lost
                raise EncodeError("a masked array cannot be sent: its mask would be lost (the filled values, "
                                  "e.g. 999999, would arrive as data); send arr.filled(value) and arr.mask "
                                  "(np.ma.getmaskarray) as two arrays")
            return _encode_array(obj, inline_max, bufs)
        if isinstance(obj, Ref):
            out = {b"nd": True, b"ref": obj.digest, b"type": obj.dtype, b"kind": b"", b"shape": list(obj.shape)}
            return {**out, b"order": b"F"} if obj.fortran else out
        if isinstance(obj, np.generic):
            return _encode_generic(obj)
        if isinstance(obj, complex):
            return _encode_generic(np.complex128(obj))
        if isinstance(obj, (tuple, list)):
            return list(obj)
        for plain in _PLAIN:  # strict_types routes subclasses (IntEnum, OrderedDict...) here
            if isinstance(obj, plain):
                return plain(obj)
        raise _unsupported(obj)

    return default


def _locate(obj: Any, path: str, depth: int = 0) -> tuple[str, str] | None:
    """Slow path after a failed encode: find the first offending value and its path."""
    if depth > 600:
        return path, "nesting too deep"
    if obj is None or isinstance(obj, (bool, float, complex, str, bytes, bytearray, memoryview)):
        return None
    if isinstance(obj, int):
        return None if -(2**63) <= obj < 2**64 else (path, "int out of int64/uint64 range")
    if isinstance(obj, Ref):
        return None
    if isinstance(obj, (np.ndarray, np.generic)):
        ok = obj.dtype.kind in _KINDS or (isinstance(obj, np.generic) and obj.dtype.kind in "US")
        return None if ok else (path, str(_unsupported(obj)))
    if isinstance(obj, dict):
        pairs = [(k, f"{path} key {k!r}") for k in obj] + [(v, f"{path}[{k!r}]") for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        pairs = [(item, f"{path}[{i}]") for i, item in enumerate(obj)]
    else:
        return path, str(_unsupported(obj))
    return next(filter(None, (_locate(item, where, depth + 1) for item, where in pairs)), None)


def _pack(obj: Any, inline_max: int, roots: Callable[[], list[tuple[Any, str]]]) -> list[bytes | memoryview]:
    bufs: list[bytes | memoryview] = []
    try:
        default = _make_default(inline_max, bufs)
        header = msgpack.packb(obj, default=default, use_bin_type=True, strict_types=True)
    except Exception as exc:
        try:
            found = next(filter(None, (_locate(value, name) for value, name in roots())), None)
        except RecursionError:  # too deep to even point at the culprit
            found = None
        where = f"{found[1]} at {found[0]}" if found else f"{type(exc).__name__}: {exc}"
        raise EncodeError(f"cannot encode {where}") from exc
    return [header, *bufs]


def encode(obj: Any, inline_max: int = INLINE_MAX) -> list[bytes | memoryview]:
    """Encode ``obj`` as [header, buffer frames...]; arrays of ``inline_max`` bytes or more go out-of-band."""
    return _pack(obj, inline_max, lambda: [(obj, "value")])


def encode_call(
    args: Sequence[Any], kwargs: Mapping[str, Any], inline_max: int = INLINE_MAX
) -> list[bytes | memoryview]:
    """Encode a task's arguments: the header holds ``[list(args), dict(kwargs)]``."""
    return _pack([list(args), dict(kwargs)], inline_max, lambda: [(args, "args"), (kwargs, "kwargs")])


def encode_batch(
    calls: Sequence[Sequence[Any]], kwargs: Mapping[str, Any] | None = None, inline_max: int = INLINE_MAX
) -> list[bytes | memoryview]:
    """Encode a batch (FLAG_BATCH) of calls sharing ``kwargs``: the header is ``[[args, ...], kwargs]``.

    One msgpack call for the whole batch, no per-call map: per call this costs about what the values
    themselves cost to pack, which is what makes ``Master.map`` fast on tiny tasks. Large arrays still
    go out-of-band, with buffer indexes shared by the whole batch.
    """
    body = [[list(a) for a in calls], dict(kwargs or {})]
    return _pack(body, inline_max, lambda: [(body[0], "batch"), (body[1], "kwargs")])


# --- decoding -------------------------------------------------------------------------------------


def _dtype(spec: Any) -> np.dtype[Any]:
    """Parse a wire dtype string, allowing only plain numeric/bool dtypes (never object/void)."""
    dt = _DTYPE_CACHE.get(spec) if type(spec) is str else None
    if dt is not None:
        return dt
    if type(spec) is not str or len(spec) > 32:
        raise DecodeError(f"array dtype must be a short dtype string, got {type(spec).__name__} {spec!r:.40}")
    try:
        dt = np.dtype(spec)
    except Exception as exc:
        raise DecodeError(f"invalid dtype string {spec!r}: {exc}", exc) from exc
    if dt.kind not in _KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise DecodeError(f"dtype {spec!r} not allowed (kind {dt.kind!r}; only b, i, u, f, c)")
    if len(_DTYPE_CACHE) < _DTYPE_CACHE_MAX:
        _DTYPE_CACHE[spec] = dt
    return dt


def _nbytes(buf: Any) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _scalar(obj: dict[Any, Any]) -> Any:
    if obj.keys() != _SCALAR_KEYS:
        raise DecodeError(f"numpy scalar map has keys {sorted(map(repr, obj))}, expected nd/type/data")
    dt = _dtype(obj[b"type"])
    data = obj[b"data"]
    if type(data) is not bytes or len(data) != dt.itemsize:
        raise DecodeError(f"numpy scalar of dtype {dt.str!r}: wrong byte count in data")
    return np.frombuffer(data, dt)[0]


def _declared_nbytes(shape: Any, dt: np.dtype[Any], limits: Limits) -> int:
    """Check a wire shape and return its byte size, before anything is allocated."""
    if type(shape) is not list:
        raise DecodeError(f"array shape must be a list, got {type(shape).__name__}")
    if len(shape) > limits.max_ndim:
        raise DecodeError(f"array ndim {len(shape)} exceeds max_ndim {limits.max_ndim}")
    nbytes = dt.itemsize
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise DecodeError(f"array shape must hold non-negative ints, got {dim!r:.40}")
        nbytes *= dim
    if nbytes > limits.max_array_bytes:
        raise DecodeError(f"declared array size {nbytes} exceeds max_array_bytes {limits.max_array_bytes}")
    return nbytes


def _array_source(obj: dict[Any, Any], bufs: Sequence[Any], used: list[bool]) -> Any:
    """Return the inline bytes or the referenced frame buffer, marking the frame used."""
    if (b"data" in obj) == (b"buf" in obj):
        raise DecodeError("array map needs exactly one of b'data' (inline) or b'buf' (frame index)")
    if b"data" in obj:
        if type(obj[b"data"]) is not bytes:
            raise DecodeError(f"inline array data must be bytes, got {type(obj[b'data']).__name__}")
        return obj[b"data"]
    index = obj[b"buf"]
    if type(index) is not int or not 1 <= index <= len(bufs):
        raise DecodeError(f"buf index {index!r:.20} out of range: {len(bufs)} buffer frames (missing frame?)")
    if used[index - 1]:
        raise DecodeError(f"buffer frame {index} referenced twice")
    used[index - 1] = True
    return bufs[index - 1]


def _from_map(obj: dict[Any, Any], bufs: Sequence[Any], used: list[bool], limits: Limits,
              refs: RefResolver | None = None) -> Any:
    """Turn a checked nd-map into an array or numpy scalar; raise DecodeError on anything odd."""
    nd = obj[b"nd"]
    if nd is False:
        return _scalar(obj)
    if nd is not True:
        raise DecodeError(f"reserved key b'nd' must be True or False, got {nd!r:.60}")
    if not obj.keys() <= _ARRAY_KEYS:
        raise DecodeError(f"array map has unknown keys {sorted(map(repr, obj.keys() - _ARRAY_KEYS))}")
    kind = obj.get(b"kind", b"")
    if kind != b"":
        raise DecodeError(f"array kind {kind!r:.20} refused (plain numeric only; no object/pickle/struct)")
    dt = _dtype(obj.get(b"type"))
    nbytes = _declared_nbytes(obj.get(b"shape"), dt, limits)
    order = obj.get(b"order", b"C")
    if order not in (b"C", b"F"):
        raise DecodeError(f"array order must be b'C' or b'F', got {order!r:.20}")
    if b"ref" in obj:
        return _from_ref(obj, dt, order == b"F", refs)
    data = _array_source(obj, bufs, used)
    if _nbytes(data) != nbytes:
        raise DecodeError(f"wrong byte count: {dt.str!r} {obj[b'shape']} needs {nbytes}, got {_nbytes(data)}")
    flat = np.frombuffer(data, dt, nbytes // dt.itemsize)
    arr = flat.reshape(obj[b"shape"], order="F" if order == b"F" else "C")
    return arr.copy(order="K") if b"data" in obj else arr  # inline: small, so hand out a writable copy


def _from_ref(obj: dict[Any, Any], dt: np.dtype[Any], fortran: bool, refs: RefResolver | None) -> Any:
    digest = obj[b"ref"]
    if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
        raise DecodeError(f"array ref must be a {DIGEST_BYTES}-octet digest, got {digest!r:.40}")
    if b"data" in obj or b"buf" in obj:
        raise DecodeError("array ref map must not carry data or buf")
    if refs is None:
        raise DecodeError("an array ref (Master.put) is resolved only by a worker, not in a result")
    return refs(Ref(digest, dt.str, tuple(obj[b"shape"]), fortran and len(obj[b"shape"]) > 1))


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} not allowed")


def _unpack(header: Any, size: int, hook: Callable[[dict[Any, Any]], Any], limits: Limits) -> Any:
    """msgpack.unpackb with explicit limits, every failure mapped to a DecodeError naming it."""
    try:
        return msgpack.unpackb(
            header, object_hook=hook, ext_hook=_no_ext, raw=False, use_list=True, strict_map_key=False,
            max_bin_len=size, max_str_len=size, max_ext_len=0,
            # a container cannot hold more elements than the header has octets (msgpack reserves slots
            # from the declared length before it reads them)
            max_array_len=min(limits.max_container_len, size), max_map_len=min(limits.max_container_len, size // 2),
        )  # fmt: skip
    except DecodeError:
        raise
    except msgpack.ExtraData as exc:
        raise DecodeError("trailing bytes after the header object", exc) from exc
    except msgpack.StackError as exc:
        raise DecodeError("header nesting too deep", exc) from exc
    except msgpack.FormatError as exc:
        raise DecodeError(f"header is not valid msgpack: {exc}", exc) from exc
    except ValueError as exc:
        truncated = "incomplete" in str(exc)
        what = "truncated header (incomplete msgpack)" if truncated else "header exceeds limits"
        raise DecodeError(f"{what}: {exc}", exc) from exc
    except Exception as exc:
        raise DecodeError(f"undecodable header: {type(exc).__name__}: {exc}", exc) from exc


def _buffer(frame: Any) -> Any:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def decode(frames: Frames, limits: Limits = DEFAULT_LIMITS, refs: RefResolver | None = None) -> Any:
    """Decode frames made by :func:`encode`; any problem raises :class:`DecodeError`. ``refs`` turns
    array refs into arrays (a lane's resolver); without it a ref is a DecodeError."""
    if not frames:
        raise DecodeError("empty message: no header frame")
    if len(frames) - 1 > limits.max_frames:
        raise DecodeError(f"too many frames: {len(frames) - 1} buffer frames, max_frames {limits.max_frames}")
    header = frames[0] if type(frames[0]) is bytes else _buffer(frames[0])
    size = _nbytes(header)
    if size > limits.max_header_bytes:
        raise DecodeError(f"header too large: {size} bytes, max_header_bytes {limits.max_header_bytes}")
    if size > msgcost.SMALL:  # below it, even msgpack's reservations stay under a MiB or so
        msgcost.estimate(header, max(limits.object_bytes_floor, limits.max_amplification * size))
    bufs = [_buffer(f) for f in frames[1:]]
    used = [False] * len(bufs)

    def hook(obj: dict[Any, Any]) -> Any:
        if b"nd" not in obj:
            return obj
        try:
            return _from_map(obj, bufs, used, limits, refs)
        except DecodeError:
            raise
        except Exception as exc:  # e.g. numpy refusing a reshape: still the sender's fault
            raise DecodeError(f"bad array map: {type(exc).__name__}: {exc}", exc) from exc

    value = _unpack(header, size, hook, limits)
    if not all(used):
        unused = [i + 1 for i, u in enumerate(used) if not u]
        raise DecodeError(f"extra frames: buffer frames {unused} are not referenced by the header")
    return value


def decode_call(frames: Frames, limits: Limits = DEFAULT_LIMITS,
                refs: RefResolver | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Decode a task payload made by :func:`encode_call` into ``(args, kwargs)``."""
    value = decode(frames, limits, refs)
    if type(value) is not list or len(value) != 2 or type(value[0]) is not list or type(value[1]) is not dict:
        raise DecodeError(f"call payload must be [args list, kwargs dict], got {type(value).__name__}")
    args, kwargs = value
    if not all(type(k) is str for k in kwargs):
        raise DecodeError("call payload kwargs must have str keys")
    return args, kwargs


def decode_batch(frames: Frames, limits: Limits = DEFAULT_LIMITS,
                 refs: RefResolver | None = None) -> tuple[list[list[Any]], dict[str, Any]]:
    """Decode a payload made by :func:`encode_batch` into ``([args, ...], kwargs)``."""
    calls, kwargs = decode_call(frames, limits, refs)
    if not calls:
        raise DecodeError("batch payload holds no calls")
    for i, args in enumerate(calls):
        if type(args) is not list:
            raise DecodeError(f"batch call {i}: args must be a list, got {type(args).__name__}")
    return calls, kwargs


def batch_length(header: bytes | memoryview | zmq.Frame) -> int:
    """Number of calls in a batch, read from the msgpack array headers alone (no decoding).

    The worker daemon uses it to scale a service's per-call timeout to the whole batch without
    touching the payload; 0 when the header does not start like ``encode_batch``'s.
    """
    raw = bytes(_buffer(header)[:6])
    if len(raw) < 2 or raw[0] != 0x92:  # [calls, kwargs]
        return 0
    first = raw[1]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(raw) >= 4:
        return int.from_bytes(raw[2:4], "big")
    if first == 0xDD and len(raw) >= 6:
        return int.from_bytes(raw[2:6], "big")
    return 0


def decode_outcomes(frames: Frames, expected: int, limits: Limits = DEFAULT_LIMITS) -> tuple[list[Any], dict[int, Any]]:
    """Decode a batch result ``[values, errors]``: ``expected`` values in call order, and a map from
    the index of each call that failed to ``[code, details]`` (its value is None)."""
    value = decode(frames, limits)
    if type(value) is not list or len(value) != 2 or type(value[0]) is not list or type(value[1]) is not dict:
        raise DecodeError(f"batch result must be [values list, errors map], got {type(value).__name__}")
    values, errors = value
    if len(values) != expected:
        raise DecodeError(f"batch result holds {len(values)} values for {expected} calls")
    for index, error in errors.items():
        if (type(index) is not int or not 0 <= index < expected or type(error) is not list or len(error) != 2
                or type(error[0]) is not str or type(error[1]) is not dict):
            raise DecodeError(f"batch result: bad error entry {index!r:.20}")
    return values, errors
