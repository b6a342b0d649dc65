"""A broker and worker daemons as ``multiprocessing`` spawn processes on ipc, for the benchmarks.

``with LocalCluster(workers=2, processes=1, prefetch=16) as c:`` binds the broker in a short temp
dir, starts the worker daemons, waits until the broker's STATUS shows every slot, and on exit stops
every process it started by pid: worker daemons first (SIGTERM → join → SIGKILL), then the broker,
then any compute process (grandchild) that outlived its daemon. Nothing is killed by name.

The process targets live in this importable module, so ``spawn`` can pickle them whether the
benchmark runs as ``python -m ndpipe.bench.w1`` or ``python bench/w1.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

from ndpipe.config import BrokerConfig, MasterConfig, ServiceSpec, WorkerConfig

SERVICES: dict[str, str] = {
    "echo": "ndpipe.examples.handlers:echo",
    "sleep": "ndpipe.examples.handlers:sleep",
    "stamped_sleep": "ndpipe.bench._handlers:stamped_sleep",
    "cpu_work": "ndpipe.bench._handlers:cpu_work",
}


def _broker_main(cfg: BrokerConfig, level: str) -> None:
    from ndpipe.broker import serve
    from ndpipe.logsetup import setup_logging

    setup_logging(level)
    serve(cfg)


def _worker_main(cfg: WorkerConfig, level: str, tmp: str) -> None:
    from ndpipe.logsetup import setup_logging
    from ndpipe.worker import serve

    tempfile.tempdir = tmp  # the daemon's private ipc dir goes inside ours: removed even after kill -9
    setup_logging(level)
    serve(cfg)


def stop_process(proc: BaseProcess, timeout: float = 10.0, terminate: bool = True) -> None:
    """SIGTERM (unless the caller sent it already), wait up to ``timeout`` s, then SIGKILL.

    Only one SIGTERM: the daemons restore the default handler once their loop has ended, so a second
    one would kill them in the middle of their own clean-up (compute processes, ipc temp dir).
    """
    if proc.pid is None:
        return
    if terminate and proc.is_alive():
        proc.terminate()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5.0)


def kill_pids(procs: list[psutil.Process]) -> None:
    """SIGKILL the given processes if still alive (psutil checks the pid was not reused)."""
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


class LocalCluster:
    """Broker + ``workers`` daemons × ``processes`` compute processes (+ ``prefetch``), on ipc.

    ``broker`` / ``worker`` / ``master`` are extra keyword arguments for BrokerConfig, WorkerConfig
    and MasterConfig; defaults are ndpipe's own (heartbeat 1 s × liveness 3), except a short worker
    ``drain_timeout`` so teardown stays bounded.
    """

    def __init__(
        self,
        workers: int = 1,
        processes: int = 2,
        prefetch: int = 0,
        services: Mapping[str, str] | None = None,
        broker: Mapping[str, Any] | None = None,
        worker: Mapping[str, Any] | None = None,
        master: Mapping[str, Any] | None = None,
        log_level: str = "WARNING",
        start_timeout: float = 60.0,
    ) -> None:
        self.n_workers = workers
        self.processes = processes
        self.prefetch = prefetch
        self.services = dict(services or SERVICES)
        self.broker_kwargs = dict(broker or {})
        self.worker_kwargs = dict(worker or {})
        self.master_kwargs = dict(master or {})
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.ctx = mp.get_context("spawn")
        self.tmp = ""
        self.broker_proc: BaseProcess | None = None
        self.worker_procs: list[BaseProcess] = []
        self.bcfg: BrokerConfig | None = None
        self.wcfg: WorkerConfig | None = None

    # ---- configuration ---------------------------------------------------------------------------
    @property
    def frontend(self) -> str:
        assert self.bcfg is not None
        return str(self.bcfg.frontend)  # str(): plain `mypy bench` sees ndpipe.config as Any

    @property
    def slots_per_worker(self) -> int:
        return self.processes * WorkerConfig(processes=self.processes, prefetch=self.prefetch).lane_credit

    def master_config(self, **overrides: Any) -> MasterConfig:
        return MasterConfig(broker=self.frontend, **{**self.master_kwargs, **overrides})

    def master(self, **kwargs: Any) -> Any:
        """A new :class:`ndpipe.master.Master` on this cluster (the caller closes it)."""
        from ndpipe.master import Master

        return Master(self.frontend, config=self.master_config(), **kwargs)

    # ---- life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        self.tmp = tempfile.mkdtemp(prefix="ndpb-")  # short: ipc paths must fit in 107 bytes
        self.bcfg = BrokerConfig(frontend=f"ipc://{self.tmp}/f", backend=f"ipc://{self.tmp}/b", **self.broker_kwargs)
        wkw = {"drain_timeout": 2.0, **self.worker_kwargs}
        self.wcfg = WorkerConfig(
            broker=self.bcfg.backend, processes=self.processes, prefetch=self.prefetch,
            services={name: ServiceSpec(handler=h) for name, h in self.services.items()}, **wkw,
        )
        try:
            self.broker_proc = self.ctx.Process(target=_broker_main, args=(self.bcfg, self.log_level),
                                                name="ndpipe-bench-broker")
            self.broker_proc.start()
            for _ in range(self.n_workers):
                self.add_worker(wait=False)
            self.wait_slots(self.n_workers * self.slots_per_worker)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_worker(self, wait: bool = True) -> BaseProcess:
        """Start one more worker daemon; with ``wait``, block until the broker counts its slots."""
        before = self.registered_slots() if wait else 0
        proc = self.ctx.Process(target=_worker_main, args=(self.wcfg, self.log_level, self.tmp),
                                name=f"ndpipe-bench-worker-{len(self.worker_procs)}")
        proc.start()
        self.worker_procs.append(proc)
        if wait:
            self.wait_slots(before + self.slots_per_worker)
        return proc

    @property
    def probe_service(self) -> str:
        """The service whose slot count tells that workers registered (every worker offers all)."""
        return "echo" if "echo" in self.services else next(iter(self.services))

    def registered_slots(self, service: str | None = None, master: Any = None) -> int:
        service = service or self.probe_service
        own = master is None
        m = self.master() if own else master
        try:
            return int(m.status()["services"].get(service, {}).get("slots", 0))
        finally:
            if own:
                m.close()

    def wait_slots(self, slots: int, service: str | None = None, master: Any = None) -> None:
        """Block until the broker reports exactly ``slots`` slots for ``service``."""
        service = service or self.probe_service
        deadline = time.monotonic() + self.start_timeout
        own = master is None
        m = self.master() if own else master
        try:
            while True:
                got = int(m.status()["services"].get(service, {}).get("slots", 0))
                if got == slots:
                    return
                dead = [p.name for p in [self.broker_proc, *self.worker_procs] if p is not None and p.exitcode]
                if dead:
                    raise RuntimeError(f"cluster process(es) exited early: {dead}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{got} of {slots} slots for {service!r} after {self.start_timeout} s")
                time.sleep(0.05)
        finally:
            if own:
                m.close()

    def pids(self) -> dict[str, Any]:
        """{"broker": pid, "workers": [pid…], "compute": [pid…]} of the processes alive now."""
        compute: list[int] = []
        for proc in self.worker_procs:
            if proc.pid is not None and proc.is_alive():
                try:
                    compute += [c.pid for c in psutil.Process(proc.pid).children()]
                except psutil.Error:
                    pass
        return {
            "broker": self.broker_proc.pid if self.broker_proc is not None else None,
            "workers": [p.pid for p in self.worker_procs if p.is_alive()],
            "compute": compute,
        }

    def _descendants(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for proc in [*self.worker_procs, self.broker_proc]:
            if proc is not None and proc.pid is not None and proc.is_alive():
                try:
                    found += psutil.Process(proc.pid).children(recursive=True)
                except psutil.Error:
                    pass
        return found

    def close(self) -> None:
        """Stop workers, then the broker, then stray grandchildren; remove the temp dir. Idempotent."""
        grandchildren = self._descendants()
        for proc in self.worker_procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
        for proc in self.worker_procs:  # all drain at once; the SIGTERM was sent just above
            stop_process(proc, terminate=False)
        if self.broker_proc is not None:
            stop_process(self.broker_proc)
        kill_pids(grandchildren)  # compute processes also die with their daemon (PR_SET_PDEATHSIG)
        for p in grandchildren:
            try:
                p.wait(5)
            except psutil.Error:
                pass
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""


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
