"""The raw baseline for ``Master.map``: the same calls, in the same batches, over a raw path.

``Master.map`` packs many calls into one message, so its calls/s must not be divided by a raw client
that sends one call per message (issue 8). This client sends what map sends: the calls cut into
batches of the size map picks (:func:`map_plan`, which follows ``master/client.py``), each encoded
by ndpipe's own codec (``encode_batch``: one msgpack header for the batch) and sent as one
multipart message behind a 4-byte batch index (ndpipe: a 16-byte task id and protocol frames), with
at most as many batches in flight as map keeps. The echo processes run :func:`batch_echo`: decode
the batch, call the identity handler once per call, encode ``[values, errors]`` as ndpipe's compute
process does, so the reply carries one result per call. The client decodes each reply
(``decode_outcomes``) inside the timing, as the Master does, and yields results in call order;
the results are checked after the clock stops, as the benchmark checks map's.

What remains different is ndpipe itself: its protocol frames, broker bookkeeping, the daemon, the
Master's I/O thread. Encoding and decoding the calls cost the same on both sides.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import zmq

from ndpipe.bench._raw import STALL_TIMEOUT_MS, RawBaseline, send_parts
from ndpipe.codec import decode_batch, decode_outcomes, encode, encode_batch
from ndpipe.examples.handlers import echo
from ndpipe.master.mapping import MAX_CHUNK

BATCH_ECHO = "ndpipe.bench._rawbatch:batch_echo"
_INDEX = struct.Struct("<I")
_NOBLOCK = int(zmq.NOBLOCK)


def map_plan(n: int, slots: int, window: int) -> tuple[int, int]:
    """(calls per batch, batches in flight) that ``Master.map`` picks for ``n`` items of known count.

    As ``Mapper.auto_chunksize`` / ``Mapper.batched`` (master/mapping.py): about four batches per slot, at most
    ``MAX_CHUNK`` calls; it submits ahead until ``max(window, 2 × size × slots)`` calls are
    outstanding, and the Master's window caps the tasks (batches) in flight.
    """
    slots = max(1, slots)
    size = 1 if n <= 1 else max(1, min(-(-n // (4 * slots)), MAX_CHUNK))
    ahead = max(window, 2 * size * slots)
    return size, max(1, min(window, -(-ahead // size)))


def batch_echo(frames: list[zmq.Frame]) -> list[Any]:
    """Echo-process handler: [index, batch frames...] → [index, encoded [values, errors]], one value per call."""
    calls, kwargs = decode_batch(frames[1:])
    values: list[Any] = [echo(*args, **kwargs) for args in calls]
    errors: dict[int, list[Any]] = {}
    return [frames[0], *encode([values, errors])]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[tuple[Any, ...]]]:
    calls = zip(items, strict=False)  # map's calls are tuples of arguments
    return iter(lambda: list(islice(calls, size)), [])


def run_batched(raw: RawBaseline, items: Iterable[Any], size: int, in_flight: int) -> tuple[float, list[Any]]:
    """Send ``items`` as batches of ``size`` calls, at most ``in_flight`` batches not yet consumed in
    order (as map yields); return (elapsed seconds, the results in call order), unchecked."""
    if raw.handler != BATCH_ECHO:
        raise ValueError(f"run_batched needs RawBaseline(handler={BATCH_ECHO!r})")
    sock = raw.socket
    chunks = _chunks(items, size)
    sizes: list[int] = []  # calls in each batch sent, by index
    arrived: dict[int, list[Any]] = {}  # results of batches that came back ahead of an earlier one
    out: list[Any] = []
    sent = done = 0
    more = True
    t0 = time.perf_counter()
    while True:
        while more and sent - done < in_flight:
            chunk = next(chunks, None)
            if chunk is None:
                more = False
                break
            send_parts(sock, [_INDEX.pack(sent), *encode_batch(chunk)])
            sizes.append(len(chunk))
            sent += 1
        if done == sent:
            break
        if not sock.poll(STALL_TIMEOUT_MS):
            raise TimeoutError(f"raw batched baseline stalled at {done}/{sent} batches")
        while True:
            try:
                reply = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            index = _INDEX.unpack(reply[0].bytes)[0]
            values, errors = decode_outcomes(reply[1:], sizes[index])
            if errors:
                raise AssertionError(f"raw batch {index}: errors {errors!r:.80}")
            arrived[index] = values
        while done in arrived:
            out += arrived.pop(done)
            done += 1
    return time.perf_counter() - t0, out
