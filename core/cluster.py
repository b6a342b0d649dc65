"""One local cluster harness for the tests, the benchmarks, the chaos suite and ``ndpipe demo``.

A broker and worker daemons run as the ``ndpipe`` CLI would run them under systemd: separate
processes (``python -m ndpipe.cli broker|worker --config FILE``), configured by one YAML file written
in a short temp dir (ipc:// paths must fit in 107 bytes), each logging to its own file there::

    with Cluster(services={"echo": "ndpipe.examples.handlers:echo"}).start(workers=2, processes=2) as c:
        with c.master() as m:
            m.call("echo", 1)

:meth:`Cluster.start` returns once the broker counts every worker's slots, and fails with the log
of a process that exited meanwhile rather than waiting out its deadline. Faults are injected by pid
(:meth:`lane_pids`, :meth:`signal_worker`, :meth:`kill_broker`); ``prefix`` runs a process inside a
network namespace (``["ip", "netns", "exec", NAME]``).

Teardown (:meth:`close`, also on ``with`` exit and when ``start`` fails) stops every process started
here by pid: SIGCONT (a stopped process cannot die) and SIGTERM to all, wait, SIGKILL what is left,
then any lane that outlived its daemon. Nothing is killed by name. Each process is also told
(``NDPIPE_PARENT_PID``) to die with the process that started it, so a harness killed outright
(kill -9 of ``ndpipe demo``, a CI timeout) leaves no daemon holding sockets behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import yaml

from ndpipe.config import MasterConfig, SecurityConfig, WorkerConfig
from ndpipe.errors import BrokerUnreachable
from ndpipe.runtime import PARENT_ENV

# Worker defaults for a local cluster: reconnect fast after a broker restart, and a short drain so
# teardown stays bounded (a caller that tests draining passes its own).
WORKER_DEFAULTS: dict[str, Any] = {"processes": 2, "reconnect_min": 0.1, "reconnect_max": 1.0, "drain_timeout": 2.0}
Proc = subprocess.Popen[bytes]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy and return its value; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


class Cluster:
    """A broker and worker daemons as CLI processes; a context manager whose exit stops them all.

    ``broker`` / ``worker`` / ``master`` are YAML sections merged over the harness's defaults;
    ``services`` is the workers' ``services`` map (``name: "module:function"`` or a full spec).
    """

    def __init__(self, services: Mapping[str, Any], broker: Mapping[str, Any] | None = None,
                 worker: Mapping[str, Any] | None = None, master: Mapping[str, Any] | None = None,
                 frontend: str | None = None, backend: str | None = None, root: str | None = None,
                 log_level: str = "INFO", start_timeout: float = 60.0, security: Mapping[str, Any] | None = None,
                 curve: bool = False) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="ndpc-"))
        self._own_root = root is None
        self.frontend = frontend or f"ipc://{self.root}/f"
        self.backend = backend or f"ipc://{self.root}/b"
        self.log_dir = str(self.root / "starts")  # handlers that leave traces (chaos) write here
        os.makedirs(self.log_dir, exist_ok=True)
        self.start_timeout = start_timeout
        self.services = dict(services)
        self.config: dict[str, Any] = {
            "broker": {**(broker or {}), "frontend": self.frontend, "backend": self.backend},
            "worker": {**WORKER_DEFAULTS, "broker": self.backend, "services": self.services, **(worker or {})},
            "master": {"broker": self.frontend, **(master or {})},
            "logging": {"level": log_level},
            "security": dict(security or {}),
        }
        self.worker_security: dict[str, Any] = dict(security or {})
        self.master_security: SecurityConfig | None = None
        if curve:
            self._make_keys()
        self.config_path = self.root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.procs: list[Proc] = []
        self.broker: Proc | None = None
        self.workers: list[Proc] = []
        self._seen_children: dict[int, psutil.Process] = {}

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_keys(self) -> None:
        """CurveZMQ for the whole cluster: a pair for the broker, one shared by its workers, and one
        for the harness's masters, which is both a master and an admin key (``keys/``)."""
        from ndpipe.keys import generate

        keys = self.root / "keys"
        for name in ("broker", "worker", "harness"):
            generate(name, keys)
        for role, name in (("masters", "harness"), ("workers", "worker"), ("admins", "harness")):
            (keys / role).mkdir()
            shutil.copy(keys / f"{name}.key", keys / role / f"{name}.key")
        self.keys = keys
        self.config["security"].update(curve=True, secret_key=str(keys / "broker.key_secret"),
                                       masters=str(keys / "masters"), workers=str(keys / "workers"),
                                       admins=str(keys / "admins"))
        client = {"curve": True, "broker_key": str(keys / "broker.key")}
        self.worker_security = {**self.worker_security, **client, "secret_key": str(keys / "worker.key_secret")}
        self.master_security = SecurityConfig(curve=True, broker_key=str(keys / "broker.key"),
                                              secret_key=str(keys / "harness.key_secret"))

    # ---- starting ---------------------------------------------------------------------------------
    def start(self, workers: int = 1, processes: int | None = None) -> Cluster:
        """Start the broker and ``workers`` daemons; return once the broker counts all their slots.
        On any failure everything started is stopped before the error propagates."""
        try:
            self.start_broker()
            for _ in range(workers):
                self.start_worker(processes)
            self.wait_slots(None, workers * self.worker_slots(processes), watch=self.procs)
        except BaseException:
            self.close()
            raise
        return self

    def start_broker(self, prefix: Sequence[str] = ()) -> Proc:
        self.broker = self._start("broker", ["broker"], prefix)
        return self.broker

    def start_worker(self, processes: int | None = None, prefix: Sequence[str] = (),
                     overrides: Mapping[str, Any] | None = None, wait: bool = False) -> Proc:
        """One more worker daemon (``overrides``: its own worker settings, e.g. another broker address
        from inside a namespace); with ``wait``, return once the broker counts its slots."""
        before = self.registered_slots() if wait else 0
        config = None
        if overrides or self.worker_security != self.config["security"]:
            data = {**self.config, "worker": {**self.config["worker"], **(overrides or {})},
                    "security": self.worker_security}
            config = self.root / f"worker-{len(self.procs)}.yaml"
            config.write_text(yaml.safe_dump(data))
        extra = ["--processes", str(processes)] if processes else []
        proc = self._start("worker", ["worker", *extra], prefix, config)
        self.workers.append(proc)
        if wait:
            self.wait_slots(None, before + self.worker_slots(processes), watch=[proc])
        return proc

    def _start(self, name: str, args: Sequence[str], prefix: Sequence[str], config: Path | None = None) -> Proc:
        log = open(self.root / f"{name}-{len(self.procs)}.log", "wb")
        cmd = [*prefix, sys.executable, "-m", "ndpipe.cli", *args, "--config", str(config or self.config_path)]
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    # ---- waiting ----------------------------------------------------------------------------------
    def worker_slots(self, processes: int | None = None) -> int:
        """Slots one worker daemon of ``processes`` lanes registers (lanes × credit per lane)."""
        cfg = WorkerConfig(**{**self.config["worker"], **({"processes": processes} if processes else {})})
        return cfg.effective_processes * cfg.lane_credit

    @property
    def probe_service(self) -> str:
        """The service whose slot count shows that workers registered (every worker offers all)."""
        return "echo" if "echo" in self.services else next(iter(self.services))

    def registered_slots(self, service: str | None = None, master: Any = None) -> int:
        """Slots the broker counts now for ``service`` (a temporary master unless one is given)."""
        service = service or self.probe_service
        m = master or self.master()
        try:
            return int(m.status(timeout=self.start_timeout)["services"].get(service, {}).get("slots", 0))
        finally:
            if master is None:
                m.close()

    def wait_slots(self, master: Any, slots: int, service: str | None = None, timeout: float | None = None,
                   watch: Sequence[Proc] = ()) -> None:
        """Block until the broker counts exactly ``slots`` slots for ``service``. A process in ``watch``
        that exits meanwhile fails the wait at once, with the end of its log."""
        service = service or self.probe_service
        timeout = self.start_timeout if timeout is None else timeout
        m = master or self.master()
        got = -1

        def ready() -> bool:
            nonlocal got
            for proc in watch:
                if proc.poll() is not None:
                    raise RuntimeError(f"process {proc.pid} ({proc.args!r}) exited with {proc.returncode} "
                                       f"before its slots registered:\n{self.logs(2000)}")
            try:
                got = int(m.status(timeout=1.0)["services"].get(service, {}).get("slots", 0))
            except BrokerUnreachable:
                return False
            return got == slots

        try:
            wait_for(ready, timeout, f"{slots} registered slots for {service!r} (last seen: {got})", every=0.05)
        finally:
            if master is None:
                m.close()

    # ---- masters, pids, faults --------------------------------------------------------------------
    def master(self, endpoint: str | None = None, **kwargs: Any) -> Any:
        """A new :class:`ndpipe.master.Master` on this cluster (the caller closes it)."""
        from ndpipe.master import Master  # here: the broker and worker processes never import it

        cfg = MasterConfig(**{**self.config["master"], **({"broker": endpoint} if endpoint else {})})
        kwargs.setdefault("security", self.master_security)
        return Master(endpoint or self.frontend, config=cfg, **kwargs)

    def lane_pids(self, worker: Proc) -> list[int]:
        """Live lanes (compute processes) of a worker daemon, found through the daemon by pid."""
        pids = []
        for child in self._children(worker.pid):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:
                pass
        return pids

    def pids(self) -> dict[str, Any]:
        """{"broker": pid, "workers": [pid…], "compute": [lane pid…]} of the processes alive now."""
        live = [w for w in self.workers if w.poll() is None]
        return {"broker": self.broker.pid if self.broker is not None and self.broker.poll() is None else None,
                "workers": [w.pid for w in live], "compute": [pid for w in live for pid in self.lane_pids(w)]}

    def _children(self, pid: int) -> list[psutil.Process]:
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []
        for k in kids:
            self._seen_children.setdefault(k.pid, k)
        return list(kids)

    def signal_worker(self, worker: Proc, sig: int) -> None:
        """Send ``sig`` to a daemon and its lanes (SIGSTOP/SIGCONT freeze and thaw the whole worker)."""
        for pid in [worker.pid, *self.lane_pids(worker)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.send_signal(signal.SIGKILL)
        self.broker.wait(10)

    def logs(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of every process's log, each under its file name."""
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.root.glob("*.log")))

    # ---- teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        """TERM every process started here (SIGCONT first), then KILL, then any lane that outlived
        its daemon; remove the temp dir if it is ours. Idempotent."""
        for proc in self.procs:
            self._children(proc.pid)
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for child in self._seen_children.values():
            try:
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    child.send_signal(signal.SIGCONT)
                    child.kill()
            except psutil.Error:
                pass
        self.procs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
