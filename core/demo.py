"""``ndpipe demo``: a local broker and worker pool over ipc (:mod:`ndpipe.cluster`, the harness the
tests and benchmarks use), running a real data-parallel job.

The job is batch inference with a two-layer MLP (``ndpipe.examples.handlers:mlp_forward``): the
batch is split into shards, each shard runs on some compute process, the master gathers the rows
in order, and the result is checked against the same forward pass computed here in one process.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from ndpipe.cluster import Cluster
from ndpipe.examples.handlers import mlp_forward

SERVICE = "mlp"
HANDLER = "ndpipe.examples.handlers:mlp_forward"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_demo(workers: int = 2, processes: int = 1, rows: int = 16384, shards: int = 64, dim: int = 256) -> int:
    """Run the demo; returns a process exit code (0 when the distributed result matches)."""
    root = tempfile.mkdtemp(prefix="ndpipe-demo-")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # run the clean-up below on SIGTERM too
    try:
        cluster = Cluster({SERVICE: HANDLER}, log_level="WARNING", root=root)
        print(f"ndpipe demo: broker + {workers} worker(s) × {processes} compute process(es) on ipc://{cluster.root}")
        with cluster.start(workers, processes), cluster.master() as master:
            x = np.random.default_rng(42).standard_normal((rows, dim))
            master.scatter(SERVICE, x[: 2 * workers], 2 * workers)  # warm up (weights cache)
            t0 = time.perf_counter()
            with tqdm(total=shards, unit="shard", desc="mlp_forward") as bar:
                y = master.scatter(SERVICE, x, shards, axis=0, progress=bar.update)
            elapsed = time.perf_counter() - t0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        shutil.rmtree(root, ignore_errors=True)
    t1 = time.perf_counter()
    expected = mlp_forward(x)
    local = time.perf_counter() - t1
    ok = y.shape == expected.shape and bool(np.allclose(y, expected, rtol=1e-9, atol=1e-12))
    mb = (x.nbytes + y.nbytes) / 1e6
    print(f"{rows} rows × {dim} features in {shards} shards: {elapsed:.3f} s distributed "
          f"({rows / elapsed:,.0f} rows/s, {mb / elapsed:,.1f} MB/s moved), {local:.3f} s in one process")
    print("result matches the single-process forward pass" if ok else "MISMATCH against single-process result")
    return 0 if ok else 1
