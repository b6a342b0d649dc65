"""Every benchmark still runs, end to end, as a user would start it (smoke-sized with --quick).

Speed is never asserted here (shared machines drift); the benchmarks print their own ratios. This
only catches a benchmark that no longer starts, hangs, or stops printing the rows it promises.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)

EXPECTED = {
    "w1": ["raw zmq.proxy, window 1000", "raw Python broker, window 1000", "ndpipe submit", "ndpipe map"],
    "w2w3": ["W2", "W3", "ndpipe"],
    "sweep": ["64 B", "ratio"],
    "scaling": ["sleep", "cpu"],
    "broker_cost": ["bytes/task", "idle workers"],
    "recovery": ["compute", "daemon"],
    "dispatch": ["index ÷ scan", "1,000"],
    "refs": ["ndpipe put", "ndpipe inline", "raw inline"],
    "stages": ["ndpipe pipeline", "ndpipe 4 master round trips", "raw 4 round trips", "slowest-stage bound",
               "ndpipe stream", "ndpipe call returning the list"],
    "iterate": ["per-round overhead", "one process, looping", "ndpipe, 8 resident partitions", "routed"],
    "curve": ["ndpipe, plain", "ndpipe, curve", "raw pyzmq 1 hop, curve", "curve ÷ plain, ndpipe"],
}


# Smaller still than --quick where a benchmark's smoke run is long (every row is still printed).
SMOKE = {"scaling": ["--procs", "1,2"], "broker_cost": ["--seconds", "1", "--workers", "50"]}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_runs_and_prints_its_table(name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ndpipe.bench", name, "--quick", *SMOKE.get(name, [])],
                          capture_output=True, text=True, timeout=220)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "machine:" in out
    for text in EXPECTED[name]:
        assert text in out, f"{name}: {text!r} missing from\n{out[-3000:]}"


def test_unknown_benchmark_lists_the_choices() -> None:
    proc = subprocess.run([sys.executable, "-m", "ndpipe.bench", "nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "w2w3" in proc.stdout and "broker_cost" in proc.stdout
