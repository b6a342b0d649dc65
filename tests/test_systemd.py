"""The systemd units in systemd/: they parse cleanly, are hardened, and agree with the config defaults.

``systemd-analyze verify`` refuses a unit whose ExecStart binary does not exist, and
/usr/local/bin/ndpipe is not installed on a test machine, so each test copies the units to a temp
dir and points ExecStart at a fake executable there. Nothing else in the units is changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ndpipe.config import WorkerConfig
from tests.conftest import in_ci

pytestmark = pytest.mark.timeout(60)

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("ndpipe-broker.service", "ndpipe-worker@.service")
EXEC = "/usr/local/bin/ndpipe"
MAX_EXPOSURE = 3.0
ANALYZE = shutil.which("systemd-analyze")
ENV = {**os.environ, "SYSTEMD_PAGER": "cat", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}


def parse_unit(path: Path) -> dict[str, list[str]]:
    """Key → every value assigned (systemd allows repeats, so configparser does not fit)."""
    values: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.fixture
def analyze() -> str:
    if ANALYZE is None:
        if in_ci():
            pytest.fail("systemd-analyze is required in CI (apt-get install systemd)")
        pytest.skip("systemd-analyze not installed")
    return ANALYZE


@pytest.fixture
def unit_copies(tmp_path: Path) -> dict[str, Path]:
    """The units with ExecStart pointing at a fake ndpipe executable in tmp_path."""
    fake = tmp_path / "bin" / "ndpipe"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    copies = {}
    for name in UNITS:
        text = (SYSTEMD_DIR / name).read_text()
        assert text.count(f"ExecStart={EXEC} ") == 1
        (tmp_path / name).write_text(text.replace(f"ExecStart={EXEC} ", f"ExecStart={fake} "))
        copies[name] = tmp_path / name
    return copies


def run(analyze: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "--no-pager", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=45)


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_without_messages(analyze: str, unit_copies: dict[str, Path], name: str) -> None:
    # Given a unit (with a fake but executable ExecStart)
    path = unit_copies[name]
    # When systemd-analyze verify checks it
    result = run(analyze, "verify", "--man=no", str(path), cwd=path.parent)
    # Then it exits 0 and says nothing about our unit (unknown keys and bad values are only warnings)
    unit_stem = name.split("@")[0].removesuffix(".service")
    ours = [line for line in (result.stdout + result.stderr).splitlines() if unit_stem in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == []


@pytest.mark.parametrize("name", UNITS)
def test_security_exposure_is_low(analyze: str, unit_copies: dict[str, Path], name: str) -> None:
    # Given a unit
    path = unit_copies[name]
    # When systemd-analyze scores its sandboxing offline
    result = run(analyze, "security", "--offline=yes", str(path), cwd=path.parent)
    # Then the overall exposure is at most 3.0 (0 = locked down, 10 = unprotected)
    match = re.search(r"Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("name", UNITS)
def test_common_settings(name: str) -> None:
    # Given a unit file as shipped
    unit = parse_unit(SYSTEMD_DIR / name)
    role = "worker" if "worker" in name else "broker"
    # Then it runs the installed CLI with the shared config and the documented policy
    assert unit["ExecStart"] == [f"{EXEC} {role} --config /etc/ndpipe/config.yaml"]
    expected = {
        "Type": "exec",
        "EnvironmentFile": "-/etc/ndpipe/ndpipe.env",
        "Restart": "on-failure",
        "RestartSec": "1",
        "RestartPreventExitStatus": "2",
        "KillSignal": "SIGTERM",
        "DynamicUser": "yes",
        "User": "ndpipe",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "SystemCallArchitectures": "native",
    }
    assert {key: unit.get(key, [None])[-1] for key in expected} == expected
    assert unit["SystemCallFilter"][0] == "@system-service"


def test_worker_stop_outlasts_drain() -> None:
    # Given the worker template and the config default for draining
    unit = parse_unit(SYSTEMD_DIR / "ndpipe-worker@.service")
    # Then SIGTERM goes to the daemon only, and systemd waits longer than the drain before SIGKILL
    assert unit["KillMode"] == ["mixed"]
    assert float(unit["TimeoutStopSec"][0]) >= WorkerConfig().drain_timeout + 10
    assert "NDPIPE_WORKER_INSTANCE=%i" in unit["Environment"]
    assert unit["OOMPolicy"] == ["continue"]
    # And W^X is not enforced on user handler code (JIT compilers need it)
    assert "MemoryDenyWriteExecute" not in unit


def test_only_the_broker_owns_the_shared_runtime_directory() -> None:
    # Given both units
    broker = parse_unit(SYSTEMD_DIR / "ndpipe-broker.service")
    worker = parse_unit(SYSTEMD_DIR / "ndpipe-worker@.service")
    # Then /run/ndpipe is the broker's alone (a RuntimeDirectory shared by several units is deleted
    # when the first of them stops); a worker needs none (its lanes' channel is inherited, not named)
    assert broker["RuntimeDirectory"] == ["ndpipe"]
    assert "RuntimeDirectory" not in worker
    assert broker["User"] == worker["User"]


@pytest.mark.parametrize("unit", UNITS)
def test_the_curve_drop_in_hands_the_secret_key_over_as_a_credential(unit: str) -> None:
    """systemd reads the secret key as root and gives the service a private copy (%d); the config
    override names that copy, so the key file never has to be readable by the dynamic user."""
    values = parse_unit(SYSTEMD_DIR / f"{unit}.d" / "curve.conf")
    [credential] = values["LoadCredential"]
    name, _, source = credential.partition(":")
    assert name.endswith(".key_secret") and source == f"/etc/ndpipe/keys/{name}"
    assert values["Environment"] == [f"NDPIPE_SECURITY__SECRET_KEY=%d/{name}"]
    unit_values = parse_unit(SYSTEMD_DIR / unit)
    assert unit_values["MemoryMax"] and unit_values["TasksMax"]
