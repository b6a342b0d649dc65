"""What CurveZMQ costs: W1, W2 and W3 with ``security.curve`` off and on, in the same run.

    python -m ndpipe.bench curve            # --quick: a few seconds

Each mode gets its own cluster (a broker and 1 worker daemon × 2 compute processes, service
``echo``): **W1** 20,000 tiny tasks through ``map`` (batched: few messages) and 5,000 through
``submit`` (a message each; tasks/s), **W2** an 8 MiB float64 array echoed
one call at a time (GB/s, both ways), **W3** 2,000 calls of 64 bytes one at a time (latency p50 and
p99), over loopback TCP. The baseline is raw pyzmq doing one hop and back (a DEALER and a ROUTER echo process) in
plaintext and with CURVE, run right before each ndpipe mode: it shows what libzmq's encryption costs
by itself (the ndpipe rows pay it on 2 hops each way). Compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections.abc import Callable
from itertools import repeat
from typing import Any

import numpy as np
import zmq

from ndpipe.bench._common import machine_line, stop_process
from ndpipe.cluster import Cluster

SERVICES = {"echo": "ndpipe.examples.handlers:echo"}
TINY = b"x" * 64


def _raw_echo(endpoint: str, server_secret: bytes | None) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    if server_secret is not None:
        sock.curve_server, sock.curve_secretkey = True, server_secret
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


class Raw:
    """A ROUTER echo process and a DEALER to it, plaintext or CURVE."""

    def __init__(self, endpoint: str, curve: bool) -> None:
        server_public, server_secret = zmq.curve_keypair()
        self.proc = mp.get_context("spawn").Process(target=_raw_echo, args=(endpoint, server_secret if curve else None),
                                                    daemon=True)
        self.proc.start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        if curve:
            self.sock.curve_publickey, self.sock.curve_secretkey = zmq.curve_keypair()
            self.sock.curve_serverkey = server_public
        self.sock.connect(endpoint)
        self.call([b"warm"])

    def call(self, frames: list[Any]) -> list[zmq.Frame]:
        self.sock.send_multipart(frames, copy=False)
        return self.sock.recv_multipart(copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        stop_process(self.proc)


def latencies(call: Callable[[], Any], n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    p50, p99 = np.percentile(times, [50, 99])
    return float(p50) * 1e3, float(p99) * 1e3


def measure_raw(endpoint: str, curve: bool, arr: np.ndarray[Any, Any], n2: int, n3: int) -> dict[str, float]:
    raw = Raw(endpoint, curve)
    try:
        t0 = time.perf_counter()
        for _ in range(n2):
            assert len(raw.call([arr.data])[0]) == arr.nbytes
        gbps = 2 * arr.nbytes * n2 / (time.perf_counter() - t0) / 1e9
        p50, p99 = latencies(lambda: raw.call([TINY]), n3)
    finally:
        raw.close()
    return {"w2": gbps, "p50": p50, "p99": p99}


def measure_ndpipe(curve: bool, arr: np.ndarray[Any, Any], n1: int, n2: int, n3: int) -> dict[str, float]:
    with Cluster(SERVICES, log_level="WARNING", worker={"processes": 2}, curve=curve,  # TCP, as the raw rows
                 frontend=f"tcp://127.0.0.1:{_port()}", backend=f"tcp://127.0.0.1:{_port()}").start(1) as c, \
            c.master() as m:
        list(m.map("echo", repeat(TINY, 200)))  # warm
        t0 = time.perf_counter()
        out = list(m.map("echo", repeat(TINY, n1)))
        w1 = n1 / (time.perf_counter() - t0)
        assert out.count(TINY) == n1
        each = n1 // 4  # one message per task: what every message costs, encryption included
        t0 = time.perf_counter()
        futures = [m.submit("echo", TINY) for _ in range(each)]
        assert [f.result(timeout=120) for f in futures].count(TINY) == each
        w1s = each / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n2):
            assert m.call("echo", (arr,)).result(timeout=120).shape == arr.shape
        w2 = 2 * arr.nbytes * n2 / (time.perf_counter() - t0) / 1e9
        p50, p99 = latencies(lambda: m.submit("echo", TINY).result(timeout=60), n3)
    return {"w1": w1, "w1s": w1s, "w2": w2, "p50": p50, "p99": p99}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few seconds")
    args = parser.parse_args(argv)
    n1, n2, n3 = (1000, 5, 200) if args.quick else (20_000, 50, 2_000)
    arr = np.random.default_rng(0).standard_normal(1 << 20)
    print(machine_line())
    print(f"W1 {n1} tiny tasks via map; W2 {n2} round trips of an 8 MiB array; W3 {n3} calls of 64 B one at a time")
    rows: dict[str, dict[str, float]] = {}
    for curve in (False, True):
        mode = "curve" if curve else "plain"
        rows[f"raw pyzmq 1 hop, {mode}"] = measure_raw(f"tcp://127.0.0.1:{_port()}", curve, arr, n2, n3)
        rows[f"ndpipe, {mode}"] = measure_ndpipe(curve, arr, n1, n2, n3)
    print(f"{'':26} {'W1 map/s':>11} {'W1 submit/s':>11} {'W2 GB/s':>8} {'W3 p50 ms':>10} {'W3 p99 ms':>10}")
    for name, r in rows.items():
        w1 = f"{r['w1']:11,.0f} {r['w1s']:11,.0f}" if "w1" in r else f"{'—':>11} {'—':>11}"
        print(f"{name:26} {w1} {r['w2']:8.2f} {r['p50']:10.3f} {r['p99']:10.3f}")
    for who in ("raw pyzmq 1 hop", "ndpipe"):
        on, off = rows[f"{who}, curve"], rows[f"{who}, plain"]
        parts = [f"W1 map {on['w1'] / off['w1']:.2f}× submit {on['w1s'] / off['w1s']:.2f}×"] if "w1" in on else []
        parts += [f"W2 {on['w2'] / off['w2']:.2f}×",
                  f"W3 p50 {on['p50'] / off['p50']:.2f}× p99 {on['p99'] / off['p99']:.2f}×"]
        print(f"curve ÷ plain, {who}: " + ", ".join(parts) + "  (throughput: below 1 is slower; latency: above 1)")
    return 0


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    raise SystemExit(main())
