"""Issue 13, the operator's and the new user's view: log lines, honest progress bars, CLI help,
`ndpipe status --watch`. Each test reproduces one finding of the issue and checks what it does now."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ndpipe.cluster import Cluster
from ndpipe.errors import TaskError, TaskTimeout
from tests.conftest import STEADY, TEST_SERVICES, wait_until

pytestmark = pytest.mark.timeout(120)


def ndpipe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ndpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_worker_logs_start_each_task_failures_timeouts_and_a_summary(tmp_short: Path) -> None:
    """Finding 4: nothing was logged per task even at DEBUG, a handler's exception never reached the
    worker's log, and a timeout kill read "signal 9 … OOM killer" with no task id."""
    with Cluster(TEST_SERVICES, broker=STEADY, root=str(tmp_short), log_level="DEBUG",
                 worker={"drain_timeout": 5.0}) as c:
        c.start(workers=1, processes=1)
        with c.master() as m:
            assert m.submit("echo", 7).result(timeout=30) == 7
            with pytest.raises(TaskError, match="boom"):
                m.submit("fail", "boom").result(timeout=30)
            with pytest.raises(TaskTimeout):
                m.submit("hang", 30).result(timeout=30)  # the service's YAML timeout is 0.5 s
            c.wait_slots(m, c.worker_slots(1))  # the lane the timer ended is back
        worker = c.workers[0]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        log = (c.root / "worker-1.log").read_text()
    # INFO: the start line names the endpoint, the lanes and the services
    assert re.search(r"INFO .* starting: broker ipc://\S+, 1 lanes × 1 credit, services .*echo", log), log
    # DEBUG: one line per task with its service, outcome and duration
    assert re.search(r"DEBUG .* lane 0: task [0-9a-f]+ 'echo' ok in [\d.]+ ms", log), log
    # INFO: a failure with its task id and the exception's first line
    assert re.search(r"INFO .* lane 0: task [0-9a-f]+ 'fail' failed \(HANDLER_ERROR: ValueError: boom\)", log), log
    # the timeout kill is named as one, with the task id and the service
    assert re.search(r"WARNING .* lane 0 \(pid \d+\) ended by timeout: task [0-9a-f]+ \(service 'hang'\) ran past "
                     r"its 0.5 s", log), log
    assert "OOM killer" not in log
    # the summary at shutdown (the startup probes submit nothing: these are our three tasks)
    assert re.search(r"worker stopped: 2 tasks done \(1 of them failed\), 1 timed out, 0 crashed", log), log


def test_library_warnings_in_a_users_script_carry_level_and_logger_name(tmp_short: Path) -> None:
    """Finding 4, last item: with no logging configured, Python printed ndpipe's warnings bare."""
    script = ("from ndpipe import Master\nfrom ndpipe.config import MasterConfig\n"
              f"cfg = MasterConfig(broker='ipc://{tmp_short}/nobody', heartbeat_interval=0.1, liveness=2, "
              "broker_timeout=0.6)\n"
              "with Master(cfg.broker, config=cfg) as m:\n"
              "    try:\n        m.submit('echo', 1).result(timeout=5)\n    except Exception as exc:\n"
              "        print(type(exc).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "BrokerUnreachable", done.stdout + done.stderr
    assert re.search(r"^WARNING ndpipe\.master: broker ipc://\S+ silent for", done.stderr, re.M), done.stderr
    # configuring logging takes over: the line is printed once, by the user's handler
    configured = "import logging\nlogging.basicConfig(format='USER %(name)s %(message)s')\n" + script
    done = subprocess.run([sys.executable, "-c", configured], capture_output=True, text=True, timeout=60)
    assert "USER ndpipe.master broker" in done.stderr and "WARNING ndpipe.master" not in done.stderr, done.stderr


def test_progress_bar_counts_finished_shards_only(cluster: Any, tmp_path: Path, tmp_short: Path) -> None:
    """Finding 8: with no broker the bar jumped to 100 % before the error; failing shards filled it too."""
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    io = ["--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--shards", "4"]
    nobody = tmp_path / "nobody.yaml"
    nobody.write_text(f"master:\n  broker: ipc://{tmp_short}/nobody\n  heartbeat_interval: 0.1\n  liveness: 2\n"
                      "  broker_timeout: 0.6\n")
    done = ndpipe("submit", "echo", *io, "--config", str(nobody))
    assert done.returncode == 3 and "unreachable" in done.stderr, done.stderr
    assert "4/4" not in done.stderr and "stopped after 0 of 4 shards" in done.stderr, done.stderr
    done = ndpipe("submit", "fail", *io, "--config", str(cluster.config_path))
    assert done.returncode == 1 and "HANDLER_ERROR" in done.stderr, done.stderr
    assert "4/4" not in done.stderr and "Traceback (most recent call last):\n  File \"/" not in done.stderr.split(
        "remote traceback")[0]


def test_ctrl_c_leaves_the_bar_where_the_work_stopped(make_cluster: Any, tmp_path: Path) -> None:
    """Finding 8: Ctrl-C filled the bar too. Now it exits 130 with the count of shards really done."""
    cluster = make_cluster(broker=STEADY, worker={"drain_timeout": 1.0}, services={"nap": "ndpipe.chaos.handlers:nap"})
    cluster.start(workers=1, processes=2)
    np.save(tmp_path / "x.npy", np.full(3, 20.0))  # three shards of a 20 s nap: none ends before the signal
    proc = subprocess.Popen([sys.executable, "-m", "ndpipe.cli", "submit", "nap", "--input", str(tmp_path / "x.npy"),
                             "--output", str(tmp_path / "y.npy"), "--shards", "3", "--config",
                             str(cluster.config_path)], stderr=subprocess.PIPE, text=True)
    try:
        with cluster.master() as m:  # both lanes are running a shard: the job is under way
            wait_until(lambda: sum(s["inflight"] for s in m.status()["services"].values()) == 2, 30, "shards running")
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err
    assert "3/3" not in err and "stopped after 0 of 3 shards" in err, err


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found[name] = child
                found.update({f"{name} {k}": v for k, v in _subcommands(child).items()})
    return found


def test_every_subcommand_and_option_has_help_and_every_command_examples() -> None:
    """Finding 12: CLI help lacked descriptions for several options."""
    from ndpipe.cli import build_parser

    commands = _subcommands(build_parser())
    assert {"broker", "worker", "master", "submit", "status", "demo", "keys", "config"} <= set(commands)
    for name, parser in commands.items():
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"ndpipe {name}: {action.option_strings or action.dest} has no help"
        if " " not in name:  # top-level commands: a description and examples in --help
            assert parser.description and "examples:" in (parser.epilog or ""), f"ndpipe {name}"
    done = ndpipe("submit", "--help")
    assert done.returncode == 0 and "examples:" in done.stdout and "--shards N" in done.stdout


def test_status_watch_repeats_and_survives_a_broker_restart(make_cluster: Any) -> None:
    """Item 8: `ndpipe status --watch`. It shows the broker again and again, says so when the broker is
    gone (instead of exiting), and ends cleanly on Ctrl-C."""
    c = make_cluster(broker=STEADY)
    c.start(workers=1, processes=1)
    proc = subprocess.Popen([sys.executable, "-m", "ndpipe.cli", "status", "--watch", "0.2", "--timeout", "0.5",
                             "--config", str(c.config_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    try:
        seen: list[str] = []

        def looks(n: int, marker: str) -> bool:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            seen.append(line)
            return "".join(seen).count(marker) >= n

        wait_until(lambda: looks(2, "Ctrl-C to stop"), 30, "two looks")
        assert "echo" in "".join(seen)
        c.kill_broker()
        wait_until(lambda: looks(1, "(still watching)"), 30, "the broker shown as gone")
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=20)  # and closes the pipes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert ndpipe("status", "--watch", "0", "--config", str(c.config_path)).returncode == 2


def test_a_host_that_does_not_resolve_is_named_as_such(tmp_path: Path) -> None:
    """Findings 2 and 9: a broker host name that does not resolve only showed "silent … reconnecting"."""
    done = ndpipe("status", "--broker", "tcp://no-such-host.invalid:5555", "--timeout", "1")
    assert done.returncode == 3, done.stderr
    assert "host 'no-such-host.invalid' does not resolve" in done.stderr and "Traceback" not in done.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("master:\n  broker: tcp://no-such-host.invalid:5555\n  heartbeat_interval: 0.1\n  liveness: 2\n"
                   "  broker_timeout: 0.6\n")
    np.save(tmp_path / "x.npy", np.zeros(4))
    done = ndpipe("submit", "echo", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                  "--config", str(cfg), "--quiet")
    assert done.returncode == 3 and "does not resolve" in done.stderr, done.stderr


def test_a_jobs_own_exception_shows_the_jobs_frames_not_the_clis(tmp_path: Path) -> None:
    """Finding 9: a job's exception came out as a raw traceback through the CLI's own frames."""
    (tmp_path / "myjob.py").write_text("def job(master):\n    raise ValueError('bad input in my job')\n")
    done = ndpipe("master", "myjob:job", "--app-dir", str(tmp_path), "--broker", "ipc:///nonexistent/ndpipe")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("ndpipe: job myjob:job failed:\nTraceback")
    assert "myjob.py\", line 2, in job" in done.stderr and "ValueError: bad input in my job" in done.stderr
    assert "cli.py" not in done.stderr
