"""Scenario ``spool_killed``: kill -9 of the ``ndpipe spool`` daemon mid-job, restarted each time.

Jobs (call and scatter) are dropped in the inbox as documented, the daemon runs as a CLI
subprocess, and is killed at seeded random moments while a job is under way (a handler has
started for a job without an output yet), then restarted at once. It passes when every job's
output is in outbox/ exactly once and equals ``2 x + 1`` computed here; nothing is in failed/ and
no temporary is left; no handler ran for a job after a kill that came once its output was
committed (a finished job run twice); and each job was logged finished (``done`` or
``recovered``) exactly once over all the daemon's lives.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ndpipe.chaos.checker import Report, read_starts, runs_per_task
from ndpipe.chaos.handlers import SERVICES
from ndpipe.chaos.scenarios import Params
from ndpipe.cluster import Cluster, wait_for
from ndpipe.runtime import PARENT_ENV

ROWS = 8
_FINISHED = re.compile(r"job (j\d+) (?:done in|: its output was committed)")


def job_input(i: int) -> np.ndarray:
    """Job ``i``'s input: every row starts with ``i`` (each scatter shard's first element names the job)."""
    x = np.random.default_rng(i).standard_normal((ROWS, 4))
    x[:, 0] = i
    return x


def _drop(inbox: Path, i: int, scatter: bool) -> None:
    name = f"j{i:03d}"
    np.save(inbox / f"{name}.npy", job_input(i))
    job: dict[str, Any] = {"service": "spooled", "input": f"{name}.npy"}
    if scatter:
        job.update(mode="scatter", shards=2)
    tmp = inbox / f".{name}.job.yaml"
    tmp.write_text(yaml.safe_dump(job))
    os.replace(tmp, inbox / f"{name}.job.yaml")


def _outputs(outbox: Path) -> set[str]:
    return {n for n in os.listdir(outbox) if not n.startswith(".")} if outbox.exists() else set()


def spool_killed(p: Params) -> Report:
    """kill -9 the spool daemon at random moments mid-job, restart it each time."""
    rng = random.Random(p.seed)
    jobs, kills = p.n(60, 16), (3 if p.short else 8)
    seconds = 0.15 if p.short else 0.3
    report = Report("spool_killed", f"kill -9 of `ndpipe spool` {kills} times mid-job, restarted at once; {jobs} "
                    f"jobs (a third scatter × 2 shards) of {seconds:g} s per task, 4 in flight, on 1 daemon × 2 "
                    "lanes", planned=jobs)
    root = tempfile.mkdtemp(prefix="ndpc-")
    services = {**SERVICES, "spooled": {"handler": "ndpipe.chaos.handlers:Spooled",
                                        "init": {"log_dir": f"{root}/starts", "seconds": seconds}}}
    try:
        with Cluster(services, root=root) as c:
            _run(c, p, report, rng, jobs, kills)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _run(c: Cluster, p: Params, report: Report, rng: random.Random, jobs: int, kills: int) -> None:
    c.start_broker()
    c.start_worker(2)
    with c.master() as m:
        c.wait_slots(m, 2, service="spooled")
    spool = c.root / "spool"
    inbox, outbox = spool / "inbox", spool / "outbox"
    inbox.mkdir(parents=True)
    config = c.root / "spool.yaml"
    config.write_text(yaml.safe_dump({**c.config, "spool": {"dir": str(spool), "poll_interval": 0.05,
                                                            "concurrency": 4, "drain_timeout": 5.0}}))
    for i in range(jobs):
        _drop(inbox, i, scatter=i % 3 == 0)
    names = {f"j{i:03d}.npy" for i in range(jobs)}
    lives: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        log = open(c.root / f"spool-{len(lives)}.log", "wb")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "ndpipe.cli", "spool", "--config", str(config)], stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, PARENT_ENV: str(os.getpid())})
        finally:
            log.close()
        lives.append(proc)
        return proc

    t0 = time.monotonic()
    proc = start()
    killed: list[tuple[float, set[str]]] = []  # (kill time, outputs committed before it)
    try:
        deadline = t0 + 30 + 5 * kills
        while len(killed) < kills and time.monotonic() < deadline and _outputs(outbox) != names:
            time.sleep(rng.uniform(0.2, 0.8))
            if not _wait(lambda: _mid_job(c.log_dir, outbox, names), 10):
                break  # nothing left under way to kill
            committed = _outputs(outbox)
            t_kill = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed.append((t_kill, committed))
            proc = start()
        _wait(lambda: _outputs(outbox) == names, p.wait(120))
        proc.send_signal(signal.SIGTERM)
        report.checks["the last daemon exits 0 on SIGTERM"] = proc.wait(30) == 0
    finally:
        for life in lives:
            if life.poll() is None:
                life.kill()
                life.wait(5)
    report.seconds = time.monotonic() - t0
    _check(c, report, spool, names, killed, kills)


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    try:
        wait_for(predicate, timeout, "spool", every=0.01)
        return True
    except TimeoutError:
        return False


def _mid_job(log_dir: str, outbox: Path, names: set[str]) -> bool:
    """A handler has started for a job that has no output yet."""
    done = _outputs(outbox)
    under_way = {f"j{tid:03d}.npy" for tid in runs_per_task(read_starts(log_dir))}
    return bool((under_way & names) - done)


def _check(c: Cluster, report: Report, spool: Path, names: set[str], killed: list[tuple[float, set[str]]],
           kills: int) -> None:
    outbox = spool / "outbox"
    report.submitted = len(names)
    got = _outputs(outbox)
    report.unexpected = len(got - names)
    for name in sorted(names):
        if name not in got:
            report.lost += 1
            continue
        out = np.load(outbox / name, allow_pickle=False)
        i = int(name[1:4])
        report.ok += bool(np.array_equal(out, 2 * job_input(i) + 1))
        report.wrong += not np.array_equal(out, 2 * job_input(i) + 1)
    failed = os.listdir(spool / "failed")
    if failed:
        report.errors["in failed/"] = len([n for n in failed if n.endswith(".error")]) or len(failed)
        report.notes.append(f"failed/: {sorted(failed)[:6]}")
    temps = [n for n in os.listdir(outbox) if n.startswith(".")]
    report.checks["no temporary output left in outbox/"] = not temps
    starts = runs_per_task(read_starts(c.log_dir))
    twice = sorted({f"j{tid:03d}" for t_kill, committed in killed for tid, ts in starts.items()
                    if f"j{tid:03d}.npy" in committed and any(t > t_kill for t in ts)})
    finished: Counter[str] = Counter()
    for path in sorted(c.root.glob("spool-*.log")):
        finished.update(_FINISHED.findall(path.read_text(errors="replace")))
    more = sorted(n for n, k in finished.items() if k > 1)
    report.duplicated = len(set(twice) | set(more))
    if twice or more:
        report.notes.append(f"finished jobs run again after a kill: {twice[:6]}; finished twice in logs: {more[:6]}")
    report.checks["every job logged finished (done or recovered) once"] = \
        all(finished.get(n[:-4], 0) == 1 for n in names)
    report.checks[f"{kills} kills made mid-job"] = len(killed) >= kills
    reran = sum(len(ts) > 1 for ts in starts.values())
    report.notes.append(f"{len(killed)} kills; {reran} jobs had a task start more than once (killed before their "
                        f"output was committed, or a scatter's two shards); recovered without a rerun: "
                        f"{_count(c.root, 'its output was committed')}")
    report.logs = c.logs(1500)


def _count(root: Path, text: str) -> int:
    return sum(path.read_text(errors="replace").count(text) for path in root.glob("spool-*.log"))


SCENARIOS: dict[str, Callable[[Params], Report]] = {"spool_killed": spool_killed}
