"""Arrays sent once: content-addressed references (``Master.put``), PROTOCOL.md §5.4.

``ref = m.put(array)`` keeps a read-only copy of the array in the master and returns a
:class:`Ref`: its digest (BLAKE2b-128 over dtype, shape, order and bytes) and what the array looks
like. A ref passed in a task's arguments travels as a small map; the worker host that needs the
bytes fetches them once from the task's master through the broker, checks the digest, and keeps
them in shared memory for all its lanes (``worker.cache_bytes``, least recently used first out).
The handler receives the array itself, read-only.

The digest covers the description too, so a cached copy can never be read with another dtype or
shape, and a host that got bytes under a digest they do not hash to refuses them (one master cannot
poison another's cached array).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from ndpipe.errors import DecodeError, EncodeError
from ndpipe.protocol import DIGEST_BYTES

_PERSON = b"ndpipe-ref-1"


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to an array the master holds: pass it in any task's arguments, also nested."""

    digest: bytes
    dtype: str  # numpy dtype.str, e.g. "<f8"
    shape: tuple[int, ...]
    fortran: bool = False

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def meta(self) -> bytes:
        """The description that travels with the bytes (and is hashed with them)."""
        return describe(self.dtype, self.shape, self.fortran)

    def __repr__(self) -> str:
        order = ", order F" if self.fortran else ""
        return f"Ref({self.digest.hex()[:16]}…, {self.dtype}, shape {self.shape}{order})"


def describe(dtype: str, shape: tuple[int, ...], fortran: bool) -> bytes:
    return bytes(msgpack.packb([dtype, list(shape), fortran], use_bin_type=True))


def digest_of(meta: bytes, data: Any) -> bytes:
    """BLAKE2b-128 of the description and the bytes."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_PERSON)
    h.update(meta)
    h.update(data)
    return bytes(h.digest())


def make_ref(array: Any) -> tuple[Ref, np.ndarray[Any, Any]]:
    """The ref of ``array`` and the read-only contiguous copy a master keeps to serve it (a copy, so
    changing the caller's array afterwards cannot change what the digest names)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "biufc":
        raise EncodeError(f"put() takes numeric or bool arrays, got dtype {arr.dtype.str!r}")
    fortran = bool(arr.flags.f_contiguous and not arr.flags.c_contiguous and arr.ndim > 1)
    kept = np.array(arr, order="F" if fortran else "C", copy=True)
    kept.setflags(write=False)
    meta = describe(kept.dtype.str, kept.shape, fortran)
    digest = digest_of(meta, raw_bytes(kept))
    return Ref(digest, kept.dtype.str, tuple(kept.shape), fortran), kept


def raw_bytes(kept: np.ndarray[Any, Any]) -> memoryview:
    """The bytes of a contiguous array, in its own order, without a copy."""
    flat = kept.ravel(order="F") if kept.flags.f_contiguous and not kept.flags.c_contiguous else kept.ravel()
    return flat.view(np.uint8).data


def parse_meta(meta: bytes) -> tuple[str, tuple[int, ...], bool]:
    """(dtype, shape, fortran) from a description that arrived with fetched bytes."""
    try:
        dtype, shape, fortran = msgpack.unpackb(meta, raw=False, max_array_len=64, max_str_len=64)
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(fortran, bool):
            raise ValueError("wrong types")
        if not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError("bad shape")
        return dtype, tuple(shape), fortran
    except Exception as exc:
        raise DecodeError(f"bad array description in fetched data: {exc}") from exc
