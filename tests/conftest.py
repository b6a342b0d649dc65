"""Fixtures that start real ndpipe processes through the CLI, on short ipc paths in a temp dir.

Every process started here is stopped by pid at teardown (TERM, then KILL); every socket a test
opens is closed with linger 0. Waits poll the broker's STATUS reply, bounded by a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ndpipe.cluster import Cluster, wait_for
from ndpipe.config import WorkerConfig

# Heartbeats for tests: STEADY wherever detecting a dead peer is not the point (3 s of silence before a
# worker or master is declared dead, so a CI hiccup never requeues a task a test counts); FAST only
# where detection speed is what the test is about (0.6 s).
STEADY = {"heartbeat_interval": 0.5, "liveness": 6}
FAST = {"heartbeat_interval": 0.2, "liveness": 3}


def in_ci() -> bool:
    """CI=true, CI=1, CI=yes (any case): root-only tests that cannot run must fail there, not skip.
    The one place this is read, so no test skips silently on a spelling."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test (AssertionError) after ``timeout`` seconds."""
    try:
        return wait_for(predicate, timeout, what)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


# The services of a test cluster: the example handlers and the chaos suite's faults and probes.
TEST_SERVICES: dict[str, Any] = {
    "echo": "ndpipe.examples.handlers:echo",
    "sleep": "ndpipe.examples.handlers:sleep",
    "slow_pid": "ndpipe.chaos.handlers:slow_pid",
    "pid": "ndpipe.chaos.handlers:pid",
    "fail": "ndpipe.examples.handlers:fail",
    "crash": "ndpipe.chaos.handlers:crash",
    "normalize": "ndpipe.examples.handlers:normalize",
    "spin": "ndpipe.chaos.handlers:spin",
    "hang": {"handler": "ndpipe.examples.handlers:sleep", "timeout": 0.5},
    "spin_limited": {"handler": "ndpipe.chaos.handlers:hang", "timeout": 0.5},
    "deaf": {"handler": "ndpipe.chaos.handlers:hang_deaf", "timeout": 0.5},
    "reciprocal": "ndpipe.examples.handlers:reciprocal",
    "zeros": "ndpipe.chaos.handlers:zeros",
    "array_info": "ndpipe.chaos.handlers:array_info",
    "counter": "ndpipe.chaos.handlers:counter",
    "crash_on": "ndpipe.chaos.handlers:crash_on",
}


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A short temp dir: ipc:// paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ndp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(make_cluster):  # type: ignore[no-untyped-def]
    """A broker (STEADY heartbeats) and one worker of 2 lanes; modules that need another layout
    define their own ``cluster``."""
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    return c


@pytest.fixture
def make_cluster(tmp_short: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def factory(broker: dict[str, Any] | None = None, worker: dict[str, Any] | None = None,
                master: dict[str, Any] | None = None, services: dict[str, Any] | None = None,
                curve: bool = False, security: dict[str, Any] | None = None) -> Cluster:
        """The shared harness (:mod:`ndpipe.cluster`) with the test services (and ``services``), in
        ``tmp_short``, with the default drain timeout; a ``frontend``/``backend`` in ``broker``
        replaces the ipc one."""
        cluster = Cluster({**TEST_SERVICES, **(services or {})}, broker=broker, master=master, root=str(tmp_short),
                          worker={"drain_timeout": WorkerConfig().drain_timeout, **(worker or {})},
                          frontend=(broker or {}).get("frontend"), backend=(broker or {}).get("backend"),
                          curve=curve, security=security)
        clusters.append(cluster)
        return cluster

    yield factory
    for cluster in clusters:
        cluster.close()
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
