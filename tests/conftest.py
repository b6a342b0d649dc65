"""Fixtures that start real ndpipe processes through the CLI, on short ipc paths in a temp dir.

Every process started here is stopped by pid at teardown (TERM, then KILL); every socket a test
opens is closed with linger 0. Waits poll the broker's STATUS reply, bounded by a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from ndpipe.chaos.harness import wait_for

FAST = {"heartbeat_interval": 0.2, "liveness": 3}


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test (AssertionError) after ``timeout`` seconds."""
    try:
        return wait_for(predicate, timeout, what)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


class Cluster:
    """A broker and worker daemons run as `ndpipe` CLI processes, configured by one YAML file."""

    def __init__(self, root: Path, broker: dict[str, Any] | None = None, worker: dict[str, Any] | None = None,
                 master: dict[str, Any] | None = None) -> None:
        self.root = root
        self.frontend = (broker or {}).get("frontend", f"ipc://{root}/f")
        self.backend = (broker or {}).get("backend", f"ipc://{root}/b")
        services = {
            "echo": "ndpipe.examples.handlers:echo",
            "sleep": "ndpipe.examples.handlers:sleep",
            "slow_pid": "ndpipe.examples.handlers:slow_pid",
            "pid": "ndpipe.examples.handlers:pid",
            "fail": "ndpipe.examples.handlers:fail",
            "crash": "ndpipe.examples.handlers:crash",
            "normalize": "ndpipe.examples.handlers:normalize",
            "spin": "ndpipe.examples.handlers:spin",
            "hang": {"handler": "ndpipe.examples.handlers:sleep", "timeout": 0.5},
            "reciprocal": "ndpipe.examples.handlers:reciprocal",
            "zeros": "ndpipe.examples.handlers:zeros",
            "crash_on": "ndpipe.examples.handlers:crash_on",
        }
        self.config = {
            "broker": {**(broker or {}), "frontend": self.frontend, "backend": self.backend},
            "worker": {"broker": self.backend, "processes": 2, "services": services,
                       "reconnect_min": 0.1, "reconnect_max": 1.0, **(worker or {})},
            "master": {"broker": self.frontend, **(master or {})},
            "logging": {"level": "INFO"},
        }
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "ndpipe.cli", *args, "--config", str(self.config_path)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_broker(self) -> subprocess.Popen[bytes]:
        self.broker = self._start("broker", "broker")
        return self.broker

    def start_worker(self, processes: int | None = None) -> subprocess.Popen[bytes]:
        extra = ["--processes", str(processes)] if processes else []
        proc = self._start("worker", "worker", *extra)
        self.workers.append(proc)
        return proc

    def master(self, **kwargs: Any) -> Any:
        from ndpipe.config import MasterConfig
        from ndpipe.master import Master

        return Master(self.frontend, config=MasterConfig(**self.config["master"]), **kwargs)

    def wait_slots(self, master: Any, slots: int, service: str = "echo", timeout: float = 30.0) -> None:
        wait_until(lambda: master.status()["services"].get(service, {}).get("slots", 0) == slots, timeout,
                   f"{slots} registered slots for {service!r}")

    def compute_pids(self, worker: subprocess.Popen[bytes]) -> list[int]:
        alive = []
        for child in psutil.Process(worker.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                    alive.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A short temp dir: ipc:// paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ndp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_cluster(tmp_short: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def factory(**kwargs: Any) -> Cluster:
        cluster = Cluster(tmp_short, **kwargs)
        clusters.append(cluster)
        return cluster

    yield factory
    for cluster in clusters:
        cluster.stop()
        reports = [getattr(request.node, f"rep_{when}", None) for when in ("setup", "call")]
        if any(rep is not None and rep.failed for rep in reports):
            print(cluster.logs())


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
