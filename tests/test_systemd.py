"""The systemd units in systemd/: they verify cleanly as shipped, are hardened, speak sd_notify, and
agree with the config defaults.

``systemd-analyze verify`` refuses a unit whose ExecStart binary does not exist, and /opt/ndpipe is
not installed on a test machine, so verify runs with ``--root=`` a temp tree laid out as an installed
host: the units and drop-ins byte for byte in etc/systemd/system, an executable at
opt/ndpipe/bin/ndpipe (and bin/kill for ExecReload=), and this host's own unit directory for the
targets they order against (sysinit.target, network.target, …).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ndpipe.cli import EXIT_CONFIG, EXIT_TEMPFAIL
from ndpipe.config import WorkerConfig
from tests.conftest import in_ci

pytestmark = pytest.mark.timeout(60)

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("ndpipe-broker.service", "ndpipe-worker@.service", "ndpipe-spool.service")  # all speak sd_notify
EXEC = "/opt/ndpipe/bin/ndpipe"
MAX_EXPOSURE = 2.0
HOST_UNITS = Path("/usr/lib/systemd/system")
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


def _executable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


@pytest.fixture
def installed_root(tmp_path: Path) -> Path:
    """A file system root as systemd/README.md installs it: the shipped units and drop-ins copied
    unchanged, /opt/ndpipe/bin/ndpipe and /bin/kill executable, the host's targets."""
    if not HOST_UNITS.is_dir():
        pytest.skip(f"{HOST_UNITS} missing: no systemd unit directory to borrow targets from")
    root = tmp_path / "root"
    shutil.copytree(HOST_UNITS, root / HOST_UNITS.relative_to("/"), symlinks=True)
    shutil.copytree(SYSTEMD_DIR, root / "etc/systemd/system", ignore=shutil.ignore_patterns("*.md"))
    for exe in (EXEC, "/bin/kill"):
        _executable(root / exe.lstrip("/"))
    return root


def run(analyze: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "--no-pager", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=45)


def test_the_installed_root_holds_the_shipped_files_unchanged(installed_root: Path) -> None:
    for path in [*SYSTEMD_DIR.glob("*.service"), *SYSTEMD_DIR.glob("*.d/*.conf")]:
        assert (installed_root / "etc/systemd/system" / path.relative_to(SYSTEMD_DIR)).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_without_messages(analyze: str, installed_root: Path, name: str) -> None:
    # Given a unit as shipped, installed with its curve.conf drop-in (an instance, for the template)
    unit = name.replace("@.", "@2.")
    # When systemd-analyze verify checks it in the installed tree
    result = run(analyze, "verify", "--man=no", f"--root={installed_root}", unit, cwd=installed_root)
    # Then it exits 0 and says nothing at all (unknown keys and bad values are only warnings)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""


def test_verify_would_see_a_missing_executable(analyze: str, installed_root: Path) -> None:
    """The check above is not vacuous: without /opt/ndpipe (the README's venv) the unit fails."""
    (installed_root / EXEC.lstrip("/")).unlink()
    result = run(analyze, "verify", "--man=no", f"--root={installed_root}", UNITS[0], cwd=installed_root)
    assert result.returncode != 0 and f"{EXEC} is not executable" in result.stdout + result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_security_exposure_is_low(analyze: str, name: str) -> None:
    # Given a unit file as shipped
    path = SYSTEMD_DIR / name
    # When systemd-analyze scores its sandboxing offline
    result = run(analyze, "security", "--offline=yes", str(path), cwd=path.parent)
    # Then the overall exposure is at most 2.0 (0 = locked down, 10 = unprotected)
    match = re.search(r"Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("name", UNITS)
def test_common_settings(name: str) -> None:
    # Given a unit file as shipped
    unit = parse_unit(SYSTEMD_DIR / name)
    role = name.removesuffix(".service").removesuffix("@").removeprefix("ndpipe-")
    # Then it runs the installed CLI with the shared config and the documented policy
    assert unit["ExecStart"] == [f"{EXEC} {role} --config /etc/ndpipe/config.yaml"]
    assert unit["EnvironmentFile"][0] == "-/etc/ndpipe/ndpipe.env"
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "StartLimitIntervalSec": "60",
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


def test_restart_policy_matches_the_exit_codes() -> None:
    # Given both units and the CLI's exit codes
    for name in UNITS:
        unit = parse_unit(SYSTEMD_DIR / name)
        # Then a config error is final and a port in use (75) is retried for 20 s at least before the
        # start limit gives up (systemd's default, 5 starts in 10 s, allowed ~7 s)
        assert unit["RestartPreventExitStatus"] == [str(EXIT_CONFIG)] and EXIT_TEMPFAIL != EXIT_CONFIG
        assert unit["Restart"] == ["on-failure"]
        burst, restart_sec = int(unit["StartLimitBurst"][0]), float(unit["RestartSec"][0])
        assert burst * restart_sec >= 20


def test_worker_instances_take_their_own_overrides() -> None:
    # Given the worker template
    unit = parse_unit(SYSTEMD_DIR / "ndpipe-worker@.service")
    # Then the shared overrides come first and the instance's own file last (later files win)
    assert unit["EnvironmentFile"] == ["-/etc/ndpipe/ndpipe.env", "-/etc/ndpipe/worker-%i.env"]
    # And readiness waits for the broker only so long: boot is not held by a broker that is down
    assert unit["TimeoutStartSec"] == ["90s"]


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
