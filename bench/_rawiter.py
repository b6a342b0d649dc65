"""The raw-pyzmq baseline for iterations: the loop a user would write by hand with pyzmq.

A driver (this process) binds a ROUTER; ``procs`` worker processes connect DEALERs and each holds a
fixed share of the partitions (round robin), resident. Each round the driver sends every worker its
partitions' inboxes, the workers run the same step function and send back each message and metric;
the driver routes the messages into the next round's inboxes and checks the reduced metric. Every
message is encoded with ndpipe's codec (so both sides pay the same encoding), and one that stays in
its worker still travels through the driver: no broker, no placement, no checkpoints, no recovery —
what ndpipe adds is priced against this.

Frames: driver → worker ``[b"R", round, index, *frames]`` with ``index`` = msgpack
``[[dst, src, n], …]``; worker → driver ``[index, metrics, *frames]`` with ``index`` = ``[[src, dst,
n], …]`` and ``metrics`` = msgpack ``{part: metric}``; ``[b"S"]`` asks for the states (msgpack'd with
the codec), ``[b"Q"]`` ends a worker.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import tempfile
from typing import Any

import msgpack
import zmq

from ndpipe.bench._common import stop_process
from ndpipe.codec import decode, encode


def _worker(endpoint: str, ident: bytes, spec: str, parts: dict[int, dict[str, Any]]) -> None:
    module, _, name = spec.partition(":")
    step = getattr(importlib.import_module(module), name)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, ident)
    sock.connect(endpoint)
    sock.send(b"hello")
    while True:
        msg = sock.recv_multipart(copy=False)
        kind = msg[0].bytes
        if kind == b"Q":
            break
        if kind == b"S":
            sock.send_multipart([bytes(f) for f in encode({str(p): s for p, s in parts.items()})])
            continue
        rnd = int.from_bytes(msg[1].bytes, "big")
        inbox: dict[int, list[tuple[int, Any]]] = {p: [] for p in parts}
        at = 3
        for dst, src, n in msgpack.unpackb(msg[2].bytes):
            inbox[dst].append((src, decode(msg[at:at + n])))
            at += n
        index, frames, metrics = [], [], {}
        for p in sorted(parts):
            parts[p], out, metrics[p] = step(parts[p], sorted(inbox[p], key=lambda m: m[0]), rnd)
            for dst in sorted(out):
                encoded = [bytes(f) for f in encode(out[dst])]
                index.append([p, int(dst), len(encoded)])
                frames += encoded
        sock.send_multipart([msgpack.packb(index), msgpack.packb(metrics), *frames], copy=False)
    sock.close(0)
    ctx.term()


class RawIterate:
    """``with RawIterate(spec, states, procs) as raw: raw.run(rounds)``: the hand-written loop."""

    def __init__(self, spec: str, states: list[dict[str, Any]], procs: int = 2) -> None:
        self.dir = tempfile.mkdtemp(prefix="ndpr-")
        self.endpoint = f"ipc://{self.dir}/d"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind(self.endpoint)
        self.nparts = len(states)
        self.owner = {p: p % procs for p in range(self.nparts)}
        spawn = multiprocessing.get_context("spawn")
        self.procs = [spawn.Process(target=_worker, args=(self.endpoint, b"w%d" % w, spec,
                                                          {p: states[p] for p in range(self.nparts) if p % procs == w}),
                                    daemon=True) for w in range(procs)]
        for proc in self.procs:
            proc.start()
        for _ in self.procs:
            self.sock.recv_multipart()  # hello

    def run(self, rounds: int) -> list[float]:
        """``rounds`` rounds; returns each round's max metric."""
        inbox: dict[int, list[tuple[int, list[Any]]]] = {p: [] for p in range(self.nparts)}
        metrics_per_round = []
        for rnd in range(rounds):
            for w in range(len(self.procs)):
                index, frames = [], []
                for p in (p for p in range(self.nparts) if self.owner[p] == w):
                    for src, f in inbox[p]:
                        index.append([p, src, len(f)])
                        frames += f
                self.sock.send_multipart([b"w%d" % w, b"R", rnd.to_bytes(8, "big"), msgpack.packb(index), *frames],
                                         copy=False)
            inbox = {p: [] for p in range(self.nparts)}
            best = float("-inf")
            for _ in self.procs:
                reply = self.sock.recv_multipart(copy=False)
                at = 3
                for src, dst, n in msgpack.unpackb(reply[1].bytes):
                    inbox[dst].append((src, reply[at:at + n]))
                    at += n
                best = max([best, *msgpack.unpackb(reply[2].bytes, strict_map_key=False).values()])
            metrics_per_round.append(best)
        return metrics_per_round

    def states(self) -> list[dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for w in range(len(self.procs)):
            self.sock.send_multipart([b"w%d" % w, b"S"])
            reply = self.sock.recv_multipart(copy=False)
            out.update({int(p): s for p, s in decode(reply[1:]).items()})
        return [out[p] for p in range(self.nparts)]

    def __enter__(self) -> RawIterate:
        return self

    def __exit__(self, *exc: object) -> None:
        for w in range(len(self.procs)):
            try:
                self.sock.send_multipart([b"w%d" % w, b"Q"], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for proc in self.procs:
            stop_process(proc, 5.0, terminate=False)
        self.sock.close(0)
        self.ctx.term()
        try:
            os.unlink(f"{self.dir}/d")
            os.rmdir(self.dir)
        except OSError:
            pass
