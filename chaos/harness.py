"""Real processes for the chaos runs: a broker and worker daemons started through the ``ndpipe`` CLI,
configured by one YAML file in a short temp dir, and the faults to inject into them.

Every process is started here and stopped here, by pid (TERM, then KILL), including compute
processes that outlive a killed daemon; nothing is killed by name. ``prefix`` runs a command inside
a network namespace (``["ip", "netns", "exec", NAME]``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import yaml

from ndpipe.config import MasterConfig
from ndpipe.master import Master

SERVICES: dict[str, Any] = {
    "work": "ndpipe.chaos.handlers:work",
    "hang": "ndpipe.chaos.handlers:hang",
    "hog": "ndpipe.chaos.handlers:hog",
}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy; TimeoutError naming ``what`` after ``timeout`` s."""
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


class ChaosCluster:
    """Broker + worker daemons as CLI processes. Use as a context manager; :meth:`close` stops all."""

    def __init__(self, broker: dict[str, Any] | None = None, worker: dict[str, Any] | None = None,
                 master: dict[str, Any] | None = None, services: dict[str, Any] | None = None,
                 frontend: str | None = None, backend: str | None = None, root: str | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="ndpc-"))
        self._own_root = root is None
        self.frontend = frontend or f"ipc://{self.root}/f"
        self.backend = backend or f"ipc://{self.root}/b"
        self.log_dir = str(self.root / "starts")
        os.makedirs(self.log_dir, exist_ok=True)
        self.config = {
            "broker": {**(broker or {}), "frontend": self.frontend, "backend": self.backend},
            "worker": {"broker": self.backend, "processes": 2, "services": services or SERVICES,
                       "reconnect_min": 0.1, "reconnect_max": 1.0, "drain_timeout": 2.0, **(worker or {})},
            "master": {"broker": self.frontend, **(master or {})},
            "logging": {"level": "INFO"},
        }
        self.config_path = self.root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._seen_children: dict[int, psutil.Process] = {}

    def __enter__(self) -> ChaosCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- processes ------------------------------------------------------------------------------
    def _start(self, name: str, args: Sequence[str], prefix: Sequence[str] = (),
               config: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}-{len(self.procs)}.log", "wb")
        cmd = [*prefix, sys.executable, "-m", "ndpipe.cli", *args, "--config", str(config or self.config_path)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_broker(self, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        self.broker = self._start("broker", ["broker"], prefix)
        return self.broker

    def start_worker(self, processes: int | None = None, prefix: Sequence[str] = (),
                     overrides: dict[str, Any] | None = None) -> subprocess.Popen[bytes]:
        config = None
        if overrides:  # a worker with its own settings (e.g. another broker address in a namespace)
            data = {**self.config, "worker": {**self.config["worker"], **overrides}}
            config = self.root / f"worker-{len(self.procs)}.yaml"
            config.write_text(yaml.safe_dump(data))
        extra = ["--processes", str(processes)] if processes else []
        proc = self._start("worker", ["worker", *extra], prefix, config)
        self.workers.append(proc)
        return proc

    def compute_pids(self, worker: subprocess.Popen[bytes]) -> list[int]:
        """Live compute processes of a worker daemon (found through the daemon, by pid)."""
        pids = []
        for child in self._children(worker.pid):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:
                pass
        return pids

    def _children(self, pid: int) -> list[psutil.Process]:
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []
        for k in kids:
            self._seen_children.setdefault(k.pid, k)
        return list(kids)

    def signal_worker(self, worker: subprocess.Popen[bytes], sig: int) -> None:
        """Send ``sig`` to a daemon and its compute processes (SIGSTOP/SIGCONT freeze the whole worker)."""
        for pid in [worker.pid, *self.compute_pids(worker)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.send_signal(signal.SIGKILL)
        self.broker.wait(10)

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.root.glob("*.log")))

    # ---- masters and status ---------------------------------------------------------------------
    def master(self, endpoint: str | None = None, **kwargs: Any) -> Master:
        cfg = MasterConfig(**{**self.config["master"], **({"broker": endpoint} if endpoint else {})})
        return Master(endpoint or self.frontend, config=cfg, **kwargs)

    def wait_slots(self, master: Master, slots: int, service: str = "work", timeout: float = 60.0) -> None:
        wait_for(lambda: master.status()["services"].get(service, {}).get("slots", 0) == slots, timeout,
                 f"{slots} registered slots for {service!r}", every=0.05)

    # ---- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """TERM every process started here (SIGCONT first: a stopped one cannot die), then KILL,
        then any compute process that outlived its daemon. Idempotent."""
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
