"""What every benchmark shares: its local cluster (the one harness, :mod:`ndpipe.cluster`), the
machine line printed at the top, CPU accounting by pid, and stopping the baselines' processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

from ndpipe.cluster import Cluster

SERVICES: dict[str, str] = {
    "echo": "ndpipe.examples.handlers:echo",
    "sleep": "ndpipe.examples.handlers:sleep",
    "stamped_sleep": "ndpipe.bench._handlers:stamped_sleep",
    "cpu_work": "ndpipe.bench._handlers:cpu_work",
}


def bench_cluster(workers: int = 1, processes: int = 2, prefetch: int = 0, services: Mapping[str, Any] | None = None,
                  broker: Mapping[str, Any] | None = None, master: Mapping[str, Any] | None = None) -> Cluster:
    """A started cluster of ``workers`` daemons × ``processes`` lanes (+ ``prefetch``), logging at WARNING
    (ndpipe's defaults otherwise: heartbeat 1 s × liveness 3); use it in a ``with``."""
    return Cluster(services or SERVICES, broker=broker, master=master, log_level="WARNING",
                   worker={"processes": processes, "prefetch": prefetch}).start(workers)


def stop_process(proc: BaseProcess, timeout: float = 10.0, terminate: bool = True) -> None:
    """SIGTERM (unless the caller sent it already), wait up to ``timeout`` s, then SIGKILL: for the
    ``multiprocessing`` processes of the raw baselines and the simulators (one SIGTERM only, so a
    process is never interrupted in its own clean-up)."""
    if proc.pid is None:
        return
    if terminate and proc.is_alive():
        proc.terminate()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5.0)


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU seconds of ``pid`` so far (0.0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def machine_line() -> str:
    """nproc, Python, pyzmq/libzmq versions: printed at the top of every benchmark."""
    import platform

    import zmq

    return (f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"pyzmq {zmq.pyzmq_version()}, libzmq {zmq.zmq_version()}, {platform.platform()}")
