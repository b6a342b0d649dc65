"""``ndpipe demo``: a local broker and worker pool over ipc, running a real data-parallel job.

The job is batch inference with a two-layer MLP (``ndpipe.examples.handlers:mlp_forward``): the
batch is split into shards, each shard runs on some compute process, the master gathers the rows
in order, and the result is checked against the same forward pass computed here in one process.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import tempfile
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from ndpipe.config import BrokerConfig, MasterConfig, ServiceSpec, WorkerConfig
from ndpipe.examples.handlers import mlp_forward

SERVICE = "mlp"
HANDLER = "ndpipe.examples.handlers:mlp_forward"


def _broker(cfg: BrokerConfig) -> None:
    from ndpipe.broker import serve
    from ndpipe.logsetup import setup_logging
    from ndpipe.worker.compute import die_with_parent

    die_with_parent()  # a demo killed outright must not leave its daemons behind
    setup_logging("WARNING")
    serve(cfg)


def _worker(cfg: WorkerConfig) -> None:
    from ndpipe.logsetup import setup_logging
    from ndpipe.worker import serve
    from ndpipe.worker.compute import die_with_parent

    die_with_parent()
    setup_logging("WARNING")
    serve(cfg)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def wait_for_slots(master: Any, service: str, slots: int, timeout: float = 60.0) -> None:
    """Block until the broker reports ``slots`` slots for ``service`` (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        status = master.status(timeout=max(0.1, deadline - time.monotonic()))
        if status["services"].get(service, {}).get("slots", 0) >= slots:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers for {service!r} did not register within {timeout} s")
        time.sleep(0.05)


def run_demo(workers: int = 2, processes: int = 1, rows: int = 16384, shards: int = 64, dim: int = 256) -> int:
    """Run the demo; returns a process exit code (0 when the distributed result matches)."""
    from ndpipe.master import Master

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ndpipe-demo-") as tmp:
        bcfg = BrokerConfig(frontend=f"ipc://{tmp}/frontend", backend=f"ipc://{tmp}/backend")
        wcfg = WorkerConfig(broker=bcfg.backend, processes=processes,
                            services={SERVICE: ServiceSpec(handler=HANDLER)})
        procs = [ctx.Process(target=_broker, args=(bcfg,), name="ndpipe-broker")]
        procs += [ctx.Process(target=_worker, args=(wcfg,), name=f"ndpipe-worker-{i}") for i in range(workers)]
        for proc in procs:
            proc.start()
        try:
            signal.signal(signal.SIGTERM, _raise_interrupt)  # run the clean-up below on SIGTERM too
            print(f"ndpipe demo: broker + {workers} worker(s) × {processes} compute process(es) on ipc://{tmp}")
            with Master(bcfg.frontend, config=MasterConfig(broker=bcfg.frontend)) as master:
                wait_for_slots(master, SERVICE, workers * processes)
                x = np.random.default_rng(42).standard_normal((rows, dim))
                master.scatter(SERVICE, x[: 2 * workers], 2 * workers)  # warm up (weights cache)
                t0 = time.perf_counter()
                with tqdm(total=shards, unit="shard", desc="mlp_forward") as bar:
                    y = master.scatter(SERVICE, x, shards, axis=0, progress=bar.update)
                elapsed = time.perf_counter() - t0
            t1 = time.perf_counter()
            expected = mlp_forward(x)
            local = time.perf_counter() - t1
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.join(15)
                if proc.is_alive():
                    proc.kill()
    ok = y.shape == expected.shape and bool(np.allclose(y, expected, rtol=1e-9, atol=1e-12))
    mb = (x.nbytes + y.nbytes) / 1e6
    print(f"{rows} rows × {dim} features in {shards} shards: {elapsed:.3f} s distributed "
          f"({rows / elapsed:,.0f} rows/s, {mb / elapsed:,.1f} MB/s moved), {local:.3f} s in one process")
    print("result matches the single-process forward pass" if ok else "MISMATCH against single-process result")
    return 0 if ok else 1
