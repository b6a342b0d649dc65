"""The `ndpipe` command as a user runs it: exit codes, messages, submit/status/master/demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import STEADY

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent


def ndpipe(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "ndpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def cluster(make_cluster):  # type: ignore[no-untyped-def]
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    with c.master() as m:
        c.wait_slots(m, 2)
    return c


def test_config_check_and_show() -> None:
    done = ndpipe("config", "check", "--config", str(REPO / "config.yaml"))
    assert done.returncode == 0 and "OK" in done.stdout
    shown = ndpipe("config", "show", env={"NDPIPE_BROKER__HEARTBEAT_INTERVAL": "0.5"})
    assert shown.returncode == 0 and "heartbeat_interval: 0.5" in shown.stdout


def test_invalid_config_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("broker:\n  heartbeat_interval: fast\n  frontend: tcp://nowhere\n")
    done = ndpipe("broker", "--config", str(bad))
    assert done.returncode == 2
    assert "bad.yaml" in done.stderr and "broker.heartbeat_interval" in done.stderr
    assert "broker.frontend" in done.stderr


def test_worker_with_unimportable_handler_fails_at_start(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("worker:\n  processes: 1\n  services:\n    x: no_such_module.sub:fn\n")
    done = ndpipe("worker", "--config", str(cfg))
    assert done.returncode == 2 and "no_such_module" in done.stderr


def test_submit_scatters_an_npy_file(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(3).standard_normal((500, 8))
    np.save(tmp_path / "x.npy", x)
    done = ndpipe("submit", "normalize", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                  "--shards", "5", "--config", str(cluster.config_path))
    assert done.returncode == 0, done.stderr
    y = np.load(tmp_path / "y.npy")
    assert np.allclose(y, (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True))
    assert "5/5" in done.stderr  # the progress bar reached the end


def test_submit_reports_a_task_error(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    done = ndpipe("submit", "fail", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                  "--shards", "2", "--config", str(cluster.config_path), "--quiet")
    assert done.returncode == 1 and "HANDLER_ERROR" in done.stderr and "remote traceback" in done.stderr


def test_status_shows_workers(cluster) -> None:  # type: ignore[no-untyped-def]
    done = ndpipe("status", "--config", str(cluster.config_path))
    assert done.returncode == 0 and "echo" in done.stdout
    data = json.loads(ndpipe("status", "--json", "--config", str(cluster.config_path)).stdout)
    (worker,) = data["workers"]
    assert worker["slots"] == 2 and worker["info"]["lanes"] == 2
    lanes = worker["lanes"]
    assert [lane["address"] for lane in lanes] == [f"{worker['id']}/0", f"{worker['id']}/1"]
    assert sorted(lane["pid"] for lane in lanes) == sorted(cluster.lane_pids(cluster.workers[0]))
    for lane in lanes:  # each lane's row: address, pid (RSS beside it, from the daemon's heartbeat)
        assert any(lane["address"] in line and str(lane["pid"]) in line for line in done.stdout.splitlines())


def test_status_without_broker_exits_3(tmp_short: Path) -> None:
    done = ndpipe("status", "--broker", f"ipc://{tmp_short}/nobody", "--timeout", "1")
    assert done.returncode == 3 and "no status" in done.stderr


def test_master_runs_a_job_function(cluster) -> None:  # type: ignore[no-untyped-def]
    done = ndpipe("master", "ndpipe.examples.jobs:normalize_random", "300", "3", "--config", str(cluster.config_path))
    assert done.returncode == 0, done.stderr
    assert "normalized 300 rows in 3 shards: OK" in done.stdout


def test_demo_runs_and_checks_its_result() -> None:
    done = ndpipe("demo", "--rows", "2048", "--shards", "8", "--lm-batches", "4", "--pagerank-edges", "100000",
                  timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result matches the single-process forward pass" in done.stdout
    assert "logits and greedy tokens match the single-process model" in done.stdout
    assert "the same tokens as the single-process model" in done.stdout
    assert "ranks bit-identical to the same steps in one process" in done.stdout


def test_broker_reports_an_endpoint_in_use_as_retryable() -> None:
    """Issue 13, finding 7: a port held briefly (at boot) is exit 75, which the units restart on, not
    exit 2, which they do not."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = ndpipe("broker", env={"NDPIPE_BROKER__FRONTEND": f"tcp://127.0.0.1:{port}",
                                     "NDPIPE_BROKER__BACKEND": "ipc:///tmp/ndpipe-unused-backend"})
    assert done.returncode == 75 and "broker.frontend" in done.stderr and "cannot bind" in done.stderr


def test_other_bind_errors_stay_config_errors() -> None:
    # Given an address this host does not have (TEST-NET-1), allowed in plaintext
    done = ndpipe("broker", env={"NDPIPE_BROKER__FRONTEND": "tcp://192.0.2.1:5555", "NDPIPE_SECURITY__INSECURE": "true",
                                 "NDPIPE_BROKER__BACKEND": "ipc:///tmp/ndpipe-unused-backend"})
    # Then it is exit 2: restarting cannot fix it
    assert done.returncode == 2 and "broker.frontend" in done.stderr and "cannot bind" in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["worker", "--processes", "-1"], "--processes: worker.processes: Input should be greater than or equal to 0"),
    (["worker", "--broker", "garbage"], "--broker: worker.broker: expected tcp://HOST:PORT"),
    (["status", "--broker", "localhost:5555"], "--broker: master.broker: expected tcp://HOST:PORT"),
    (["master", "ndpipe.examples.handlers:echo", "--broker", "tcp://*:5555"], "--broker: master.broker: '*' only"),
])
def test_flags_that_override_config_keys_are_validated_like_yaml(args: list[str], message: str) -> None:
    """Issue 13, finding 2: `--processes -1` started a worker that looped re-registering, `--broker
    garbage` hung; the same values in YAML were refused. Now the flag goes through the same validation."""
    done = ndpipe(*args, timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_submit_refuses_bad_shards_and_an_unwritable_output_before_any_work(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, finding 9: `--shards 0` was a traceback, and `--output` into a missing directory failed
    only after all the work was done. Both are checked first (no broker is even needed)."""
    import numpy as np

    data = tmp_path / "x.npy"
    np.save(data, np.arange(4.0))
    done = ndpipe("submit", "echo", "--input", str(data), "--output", str(tmp_path / "y.npy"), "--shards", "0")
    assert done.returncode == 2 and "--shards must be at least 1" in done.stderr
    missing = tmp_path / "no" / "y.npy"
    done = ndpipe("submit", "echo", "--input", str(data), "--output", str(missing))
    assert done.returncode == 2 and "is not a writable directory" in done.stderr and "Traceback" not in done.stderr


def test_status_probes_are_not_logged_and_a_service_nobody_offers_fails_naming_it(make_cluster,  # type: ignore[no-untyped-def]
                                                                                  tmp_path: Path) -> None:
    """Issue 13, findings 10 and 1: each `ndpipe status` logged "master … left" at INFO (a health probe
    filled the log); `ndpipe submit nosuch` sat at 0 % until killed. Now probes leave no INFO line,
    and work for a service no worker offers fails after broker.unroutable_timeout naming the service
    and those that exist (exit 1)."""
    c = make_cluster(broker={**STEADY, "unroutable_timeout": 1.0})
    c.start_broker()
    c.start_worker(processes=1)
    with c.master() as m:
        c.wait_slots(m, 1)
    config = ["--config", str(c.config_path)]
    for _ in range(3):
        assert ndpipe("status", *config).returncode == 0
    assert " left" not in c.logs(tail=10**6)
    data = tmp_path / "x.npy"
    np.save(data, np.arange(4.0))
    done = ndpipe("submit", "nosuch", "--input", str(data), "--output", str(tmp_path / "y.npy"), "--shards", "2",
                  "--quiet", *config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "nosuch" in done.stderr and "echo" in done.stderr and "Traceback" not in done.stderr


def test_handlers_import_from_an_app_dir_and_config_check_import_finds_a_typo(make_cluster,  # type: ignore[no-untyped-def]
                                                                              tmp_path: Path) -> None:
    """Issue 13, findings 3 and 6: a handler module in the current directory was not importable, and
    `config check` passed a typo in a handler path. `worker.app_dir` / `--app-dir` put a directory first
    on sys.path (the daemon's and its lanes'), and `config check --import` imports every handler."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "mymod.py").write_text("def double(x):\n    return 2 * x\n\n\ndef job(master, n):\n"
                                  "    return master.submit('double', int(n)).result(timeout=30)\n")
    good, typo = tmp_path / "good.yaml", tmp_path / "typo.yaml"
    good.write_text(f"worker:\n  app_dir: '{app}'\n  services:\n    double: mymod:double\n")
    typo.write_text("worker:\n  services:\n    double: mymod:doubel\n")
    done = ndpipe("config", "check", "--import", "--config", str(good))
    assert done.returncode == 0 and "1 handlers import" in done.stdout, done.stderr
    done = ndpipe("config", "check", "--import", "--config", str(typo))
    assert done.returncode == 2 and "cannot import 'mymod'" in done.stderr
    done = ndpipe("config", "check", "--import", "--app-dir", str(app), "--config", str(typo))
    assert done.returncode == 2 and "worker.services.double" in done.stderr and "doubel" in done.stderr
    assert ndpipe("config", "check", "--config", str(typo)).returncode == 0  # without --import: syntax only
    c = make_cluster(broker=STEADY, worker={"app_dir": str(app)}, services={"double": "mymod:double"})
    c.start(workers=1, processes=1)
    done = ndpipe("master", "mymod:job", "21", "--app-dir", str(app), "--config", str(c.config_path), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
