"""``ndpipe spool``: job files, hostile drops, the journal's crash points, and the daemon on a real cluster.

The unit tests drive :class:`ndpipe.master.spool.Spool` with a fake runner (futures resolved at
once, a count of runs per job) and a ``step`` hook that raises at a chosen crash point: a new Spool
over the same directory is the restart. The integration tests run ``ndpipe spool`` as a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from ndpipe.config import SpoolConfig
from ndpipe.errors import BrokerUnreachable, NdpipeError, TaskFailed
from ndpipe.master import spool as spool_module
from ndpipe.master.spool import MasterClosed, Running, Spool
from ndpipe.master.spooljob import JobSpec, Journal
from tests.conftest import STEADY, wait_until

pytestmark = pytest.mark.timeout(60)


class Crash(Exception):
    """A simulated kill -9 at a crash point."""


class FakeRunner:
    """``2 * x + 1`` at once, counting runs per input's first element; ``fail``: a TaskFailed instead."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.runs: Counter[str] = Counter()
        self.fail = fail

    def __call__(self, spec: JobSpec, x: np.ndarray) -> Running:
        self.runs[spec.input] += 1
        future: Future[Any] = Future()
        if self.fail is not None:
            future.set_exception(self.fail)
        else:
            future.set_result(2 * x + 1)
        return Running([future])


def drop(root: Path, name: str, job: Any, x: np.ndarray | None = None, input_name: str | None = None) -> None:
    """The documented drop: the input first, then the job file as a dot-file renamed into place."""
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    if x is not None:
        np.save(inbox / (input_name or f"{name}.npy"), x)
    tmp = inbox / f".{name}.job.yaml"
    tmp.write_text(job if isinstance(job, str) else yaml.safe_dump(job))
    os.replace(tmp, inbox / f"{name}.job.yaml")


def run(spool: Spool) -> None:
    spool.scan(0.0)
    spool.reap(0.0)


OPEN: list[Spool] = []


@pytest.fixture(autouse=True)
def _close_spools() -> Any:
    yield
    while OPEN:
        OPEN.pop().close()


def make(root: Path, runner: Any, step: Any = None, window: int | None = None, **cfg_keys: Any) -> Spool:
    cfg = SpoolConfig(dir=str(root), **{"concurrency": 8, **cfg_keys})
    spool = Spool(cfg, runner, step=step, window=window) if step else Spool(cfg, runner, window=window)
    OPEN.append(spool)
    return spool


def test_a_job_runs_once_its_output_is_whole_and_its_inputs_move_to_done(tmp_path: Path) -> None:
    # Given a job dropped as documented
    runner = FakeRunner()
    x = np.arange(6.0).reshape(2, 3)
    drop(tmp_path, "a", {"service": "echo", "input": "a.npy"}, x)
    # When the spool scans and reaps
    spool = make(tmp_path, runner)
    run(spool)
    run(spool)
    # Then the output is there once, the inputs are in done/, the journal says done
    np.testing.assert_array_equal(np.load(tmp_path / "outbox" / "a.npy"), 2 * x + 1)
    assert sorted(os.listdir(tmp_path / "outbox")) == ["a.npy"]
    assert sorted(os.listdir(tmp_path / "done")) == ["a.job.yaml", "a.npy"]
    assert os.listdir(tmp_path / "inbox") == [] and runner.runs["a.npy"] == 1
    assert spool.journal.state("a") == "done"


HOSTILE: list[tuple[str, Any, Any, str]] = [
    ("missing", {"service": "echo", "input": "nothere.npy"}, None, "nothere.npy not found"),
    ("traversal", {"service": "echo", "input": "../secret.npy"}, None, "input: must be the name of a file"),
    ("absolute", {"service": "echo", "input": "/etc/passwd"}, None, "input: must be the name of a file"),
    ("garbage", "service: [unclosed\n  input: {", None, "invalid YAML"),
    ("notmap", "- just\n- a list\n", None, "must be a mapping"),
    ("unknown", {"service": "echo", "input": "unknown.npy", "shard": 3}, np.ones(2), "shard: unknown key"),
    ("both", {"service": "echo", "pipeline": ["a", "b"], "input": "both.npy"}, np.ones(2), "exactly one"),
    ("badtimeout", {"service": "echo", "input": "badtimeout.npy", "timeout": "soon"}, np.ones(2), "timeout"),
    ("aliases", "a: &x [1, 2]\nb: *x\nservice: echo\ninput: aliases.npy\n", None, "aliases"),
    ("dupkey", "service: echo\nservice: other\ninput: dupkey.npy\n", None, "duplicate key"),
    ("huge", "service: echo\ninput: huge.npy\n#" + "x" * (70 << 10) + "\n", None, "larger than"),
    ("objects", {"service": "echo", "input": "objects.npy"}, "objects", "pickled objects"),
    ("notnpy", {"service": "echo", "input": "notnpy.npy"}, "garbage", "not a .npy array"),
    ("axis", {"service": "echo", "input": "axis.npy", "mode": "scatter", "axis": 3}, np.ones(4), "axis: 3"),
]


@pytest.mark.parametrize("name,job,x,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_job_goes_to_failed_with_a_clear_error_and_the_spool_goes_on(
        tmp_path: Path, name: str, job: Any, x: Any, message: str) -> None:
    # Given a hostile job next to a good one
    runner = FakeRunner()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    if isinstance(x, np.ndarray):
        np.save(inbox / f"{name}.npy", x)
    elif x == "objects":
        np.save(inbox / f"{name}.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif x == "garbage":
        (inbox / f"{name}.npy").write_bytes(b"\x80\x04not an array at all")
    (tmp_path / "secret.npy").write_bytes(b"")
    drop(tmp_path, name, job)
    drop(tmp_path, "good", {"service": "echo", "input": "good.npy"}, np.ones(3))
    # When the spool runs
    spool = make(tmp_path, runner)
    run(spool)
    # Then the hostile one is in failed/ with an error naming its file and problem; the good one ran
    error = (tmp_path / "failed" / f"{name}.error").read_text()
    assert f"{name}.job.yaml" in error and message in error, error
    assert (tmp_path / "failed" / f"{name}.job.yaml").exists()
    assert (tmp_path / "outbox" / "good.npy").exists() and runner.runs["good.npy"] == 1
    assert (tmp_path / "secret.npy").exists()  # a traversal moved nothing outside inbox/


def test_symlinked_or_fifo_inputs_are_refused(tmp_path: Path) -> None:
    runner = FakeRunner()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    np.save(tmp_path / "outside.npy", np.ones(2))
    os.symlink(tmp_path / "outside.npy", inbox / "link.npy")
    os.mkfifo(inbox / "fifo.npy")
    drop(tmp_path, "link", {"service": "echo", "input": "link.npy"})
    drop(tmp_path, "fifo", {"service": "echo", "input": "fifo.npy"})
    run(make(tmp_path, runner))
    assert "symlink" in (tmp_path / "failed" / "link.error").read_text()
    assert "not a regular file" in (tmp_path / "failed" / "fifo.error").read_text()
    assert not runner.runs


def test_a_duplicate_name_is_refused_and_the_first_output_is_kept(tmp_path: Path) -> None:
    runner = FakeRunner()
    drop(tmp_path, "d", {"service": "echo", "input": "d.npy"}, np.ones(2))
    spool = make(tmp_path, runner)
    run(spool)
    drop(tmp_path, "d", {"service": "echo", "input": "d.npy"}, np.zeros(2))
    run(spool)
    errors = [n for n in os.listdir(tmp_path / "failed") if n.endswith(".error")]
    assert len(errors) == 1 and "duplicate job name" in (tmp_path / "failed" / errors[0]).read_text()
    np.testing.assert_array_equal(np.load(tmp_path / "outbox" / "d.npy"), 3 * np.ones(2))
    assert runner.runs["d.npy"] == 1


def test_a_task_error_fails_the_job_with_its_remote_traceback(tmp_path: Path) -> None:
    err = TaskFailed("task 1: HANDLER_ERROR: boom", "1", {"type": "ValueError", "traceback": "Traceback: line 9"})
    drop(tmp_path, "f", {"service": "fail", "input": "f.npy"}, np.ones(2))
    run(make(tmp_path, FakeRunner(fail=err)))
    error = (tmp_path / "failed" / "f.error").read_text()
    assert "TaskFailed" in error and "boom" in error and "Traceback: line 9" in error
    assert sorted(os.listdir(tmp_path / "failed")) == ["f.error", "f.job.yaml", "f.npy"]
    assert os.listdir(tmp_path / "outbox") == []


def test_an_unreachable_broker_makes_the_job_wait_not_fail(tmp_path: Path) -> None:
    runner = FakeRunner(fail=BrokerUnreachable("no reply from tcp://x:1 for 60 s"))
    drop(tmp_path, "w", {"service": "echo", "input": "w.npy"}, np.ones(2))
    spool = make(tmp_path, runner)
    run(spool)
    assert spool.journal.state("w") == "started" and "w" in spool.retry_at
    assert os.listdir(tmp_path / "failed") == []
    runner.fail = None
    spool.scan(spool.retry_at["w"])  # when its retry is due
    spool.reap(0.0)
    assert (tmp_path / "outbox" / "w.npy").exists() and runner.runs["w.npy"] == 2


# (crash point, handler runs in all, whether the restart must rerun the handler)
def crash_at(point: str) -> Any:
    """A step hook that dies (as kill -9 would, mid-job) when the spool reaches ``point``."""
    def crash(at: str, job: str) -> None:
        if at == point:
            raise Crash(at)
    return crash


CRASH_POINTS = [("started", 1), ("sent", 2), ("committed", 1), ("output", 1), ("moved", 1), ("journaled", 1)]


@pytest.mark.parametrize("point,runs", CRASH_POINTS)
def test_a_crash_at_each_point_leaves_one_output_and_reruns_only_unfinished_work(
        tmp_path: Path, point: str, runs: int) -> None:
    # Given a spool that dies at ``point`` of job "c"
    runner = FakeRunner()
    x = np.arange(4.0)
    drop(tmp_path, "c", {"service": "echo", "input": "c.npy"}, x)

    with pytest.raises(Crash):
        run(make(tmp_path, runner, step=crash_at(point)))
    # When a new spool starts on the same directory (the restart) and runs
    spool = make(tmp_path, runner)
    run(spool)
    run(spool)
    # Then the output exists exactly once, right, and the handler ran again only if no output was committed
    assert sorted(os.listdir(tmp_path / "outbox")) == ["c.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "outbox" / "c.npy"), 2 * x + 1)
    assert runner.runs["c.npy"] == runs
    assert sorted(os.listdir(tmp_path / "done")) == ["c.job.yaml", "c.npy"] and os.listdir(tmp_path / "inbox") == []
    assert spool.journal.state("c") == "done" and os.listdir(tmp_path / "failed") == []


@pytest.mark.parametrize("point", ["sent", "error", "moved", "journaled"])
def test_a_crash_while_failing_a_job_leaves_one_error_and_no_output(tmp_path: Path, point: str) -> None:
    runner = FakeRunner(fail=TaskFailed("task 1: HANDLER_ERROR: boom", "1", {}))
    drop(tmp_path, "e", {"service": "fail", "input": "e.npy"}, np.ones(2))

    with pytest.raises(Crash):
        run(make(tmp_path, runner, step=crash_at(point)))
    spool = make(tmp_path, runner)
    run(spool)
    assert sorted(os.listdir(tmp_path / "failed")) == ["e.error", "e.job.yaml", "e.npy"]
    assert "boom" in (tmp_path / "failed" / "e.error").read_text()
    assert os.listdir(tmp_path / "outbox") == [] and spool.journal.state("e") == "failed"
    assert runner.runs["e.npy"] == (2 if point == "sent" else 1)


def test_a_torn_journal_line_and_a_half_written_output_are_cleaned_at_start(tmp_path: Path) -> None:
    runner = FakeRunner()
    drop(tmp_path, "t", {"service": "echo", "input": "t.npy"}, np.ones(2))
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / ".t.npy.tmp-4242").write_bytes(b"\x93NUMPY half")  # the old temp name
    (tmp_path / "outbox" / ".tmp-4242-7").write_bytes(b"\x93NUMPY half")  # the new one
    (tmp_path / ".tmp-4242-0").write_text("journal compaction cut short")
    (tmp_path / "journal.jsonl").write_text('{"job": "t", "state": "started", "input": "t.npy"}\n{"job": "t", "sta')
    spool = make(tmp_path, runner)
    assert spool.journal.torn and os.listdir(tmp_path / "outbox") == []
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    run(spool)
    assert os.listdir(tmp_path / "outbox") == ["t.npy"] and runner.runs["t.npy"] == 1
    spool.close()
    journal = Journal(tmp_path / "journal.jsonl")
    assert journal.state("t") == "done"
    journal.close()


def test_a_committed_output_a_consumer_took_is_not_rerun(tmp_path: Path) -> None:
    # Given a kill after the output's rename, and a consumer that moved the output away at once
    runner = FakeRunner()
    drop(tmp_path, "k", {"service": "echo", "input": "k.npy"}, np.ones(2))

    with pytest.raises(Crash):
        run(make(tmp_path, runner, step=crash_at("output")))
    os.replace(tmp_path / "outbox" / "k.npy", tmp_path / "taken.npy")
    # When the spool restarts
    spool = make(tmp_path, runner)
    run(spool)
    # Then the job is finished, not run again, and no second output appears
    assert runner.runs["k.npy"] == 1 and spool.journal.state("k") == "done"
    assert os.listdir(tmp_path / "outbox") == [] and sorted(os.listdir(tmp_path / "done")) == ["k.job.yaml", "k.npy"]


class PendingRunner:
    """One unresolved future per task (a scatter's shards), so jobs stay in flight."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def __call__(self, spec: JobSpec, x: np.ndarray) -> Running:
        self.started.append(spec.input)
        return Running([Future() for _ in range(spec.shards or 1)])


def test_a_job_over_the_window_is_refused_and_a_job_that_does_not_fit_yet_waits(tmp_path: Path) -> None:
    # Given a master window of 8 tasks, a job of 16 shards, and two of 5
    runner = PendingRunner()
    scatter = {"service": "echo", "mode": "scatter"}
    drop(tmp_path, "big", {**scatter, "input": "big.npy", "shards": 16}, np.ones(16))
    drop(tmp_path, "a", {**scatter, "input": "a.npy", "shards": 5}, np.ones(16))
    drop(tmp_path, "b", {**scatter, "input": "b.npy", "shards": 5}, np.ones(16))
    spool = make(tmp_path, runner, window=8)
    # When it scans
    spool.scan(0.0)
    # Then the big one is refused naming its file, shards and master.window; b waits for a's tasks
    error = (tmp_path / "failed" / "big.error").read_text()
    assert "big.job.yaml" in error and "shards" in error and "master.window (8)" in error
    assert runner.started == ["a.npy"] and spool.backlog and spool.next_retry() == float("inf")
    for future in spool.inflight["a"].running.futures:
        future.set_result(np.ones(3))
    spool.reap(0.0)
    spool.scan(0.0)
    assert runner.started == ["a.npy", "b.npy"]


def test_a_due_retry_without_a_free_slot_does_not_spin_and_a_removed_one_is_dropped(tmp_path: Path) -> None:
    # Given a job waiting to retry (broker unreachable) and every slot busy
    runner = FakeRunner(fail=BrokerUnreachable("no reply"))
    drop(tmp_path, "r", {"service": "echo", "input": "r.npy"}, np.ones(2))
    spool = make(tmp_path, runner, concurrency=1)
    run(spool)
    due = spool.retry_at["r"]
    spool.inflight["busy"] = spool_module.Job("busy", JobSpec(service="echo", input="x.npy"), 0, Running([Future()]))
    # Then the loop's next deadline is not the retry (in the past once due): a reap rescans
    assert spool.next_retry() == float("inf")
    del spool.inflight["busy"]
    assert spool.next_retry() == due
    # And a retry whose job file was removed is forgotten at the next scan
    os.unlink(tmp_path / "inbox" / "r.job.yaml")
    spool.scan(due + 1)
    assert spool.retry_at == {} and spool.next_retry() == float("inf")


def test_a_long_job_name_runs_end_to_end(tmp_path: Path) -> None:
    name = "n" * (255 - len(".job.yaml") - 1)  # the longest name whose drop (a dot-file) fits NAME_MAX
    runner = FakeRunner()
    drop(tmp_path, name, {"service": "echo", "input": "in.npy"}, np.ones(2), input_name="in.npy")
    spool = make(tmp_path, runner)
    run(spool)
    assert os.listdir(tmp_path / "outbox") == [f"{name}.npy"] and spool.journal.state(name) == "done"
    drop(tmp_path, name, {"service": "echo", "input": "in.npy"}, np.ones(2), input_name="in.npy")
    run(spool)  # a duplicate of it is refused too (its tag is shortened under NAME_MAX)
    assert any(n.endswith(".error") for n in os.listdir(tmp_path / "failed"))


def test_an_oversized_input_is_refused_before_it_is_loaded(tmp_path: Path) -> None:
    runner = FakeRunner()
    drop(tmp_path, "big", {"service": "echo", "input": "big.npy"}, np.ones(1000))
    run(make(tmp_path, runner, max_input_bytes=4000))
    error = (tmp_path / "failed" / "big.error").read_text()
    assert "big.job.yaml" in error and "spool.max_input_bytes (4000)" in error and not runner.runs


@pytest.mark.parametrize("errno_", [13, 28], ids=["EACCES-fails", "ENOSPC-retries"])
def test_an_unwritable_outbox_fails_or_retries_that_job_and_the_spool_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int) -> None:
    # Given an outbox that refuses writes (EACCES) or is full (ENOSPC)
    def refuse(path: Path, array: np.ndarray, before_rename: Any = None) -> None:
        raise OSError(errno_, os.strerror(errno_), str(path))

    monkeypatch.setattr(spool_module, "save_array", refuse)
    runner = FakeRunner()
    drop(tmp_path, "u", {"service": "echo", "input": "u.npy"}, np.ones(2))
    spool = make(tmp_path, runner)
    run(spool)
    # Then EACCES fails the job with the error, ENOSPC keeps it to run again later; no exception
    if errno_ == 13:
        assert "PermissionError" in (tmp_path / "failed" / "u.error").read_text()
        assert spool.journal.state("u") == "failed"
    else:
        assert "u" in spool.retry_at and spool.journal.state("u") == "started"
        monkeypatch.undo()
        spool.scan(spool.retry_at["u"])
        spool.reap(0.0)
        assert os.listdir(tmp_path / "outbox") == ["u.npy"] and runner.runs["u.npy"] == 2


def test_a_closed_master_stops_the_spool_without_failing_the_job(tmp_path: Path) -> None:
    runner = FakeRunner()
    drop(tmp_path, "m", {"service": "echo", "input": "m.npy"}, np.ones(2))

    def closed(spec: JobSpec, x: np.ndarray) -> Running:
        raise NdpipeError("master is closed: the I/O thread died")

    spool = make(tmp_path, closed)
    with pytest.raises(MasterClosed):
        spool.scan(0.0)
    assert os.listdir(tmp_path / "failed") == [] and spool.journal.state("m") == "started"
    spool.close()
    run(make(tmp_path, runner))  # the restart runs it
    assert os.listdir(tmp_path / "outbox") == ["m.npy"]


def test_refusals_move_only_their_own_inputs(tmp_path: Path) -> None:
    runner = FakeRunner()
    drop(tmp_path, "d", {"service": "echo", "input": "d.npy"}, np.ones(2))
    spool = make(tmp_path, runner)
    run(spool)
    # A duplicate's own input goes with it; a refused job's OTHER.npy input stays
    drop(tmp_path, "d", {"service": "echo", "input": "d.npy"}, np.zeros(2))
    drop(tmp_path, "bad", {"service": "echo", "input": "shared.npy", "shard": 1}, np.ones(2), input_name="shared.npy")
    run(spool)
    failed = os.listdir(tmp_path / "failed")
    assert any(n.startswith("d.dup-") and n.endswith(".npy") for n in failed)
    assert sorted(os.listdir(tmp_path / "inbox")) == ["shared.npy"]


def test_the_journal_keeps_every_unfinished_job_and_the_last_finished_ones(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, keep=3)
    for i in range(6):
        journal.record(f"j{i}", "done")
    journal.record("j0", "started")  # rerun: now unfinished, and the newest
    journal.record("s", "started")
    journal.close()
    journal = Journal(path, keep=3)
    assert list(journal.last) == ["j3", "j4", "j5", "j0", "s"]
    journal.close()


# ---- the daemon, through the CLI, on a real cluster ------------------------------------------------------
def outputs(root: Path) -> list[str]:
    return sorted(os.listdir(root / "outbox")) if (root / "outbox").exists() else []


def spool_cmd(config: Path, root: Path) -> subprocess.Popen[bytes]:
    log = open(root.parent / "spool.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "ndpipe.cli", "spool", "--config", str(config),
                                 "--dir", str(root)], stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def test_the_daemon_runs_call_scatter_and_pipeline_jobs_and_drains_on_sigterm(  # type: ignore[no-untyped-def]
        make_cluster, tmp_short: Path) -> None:
    # Given a cluster and a spool config naming it
    c = make_cluster(broker=STEADY)
    c.start_broker()
    c.start_worker(processes=2)
    config = tmp_short / "spool.yaml"
    config.write_text(yaml.safe_dump({**c.config, "spool": {"poll_interval": 0.05}}))
    root = tmp_short / "sp"
    x = np.random.default_rng(5).standard_normal((40, 6))
    drop(root, "call", {"service": "normalize", "input": "call.npy"}, x)
    drop(root, "scatter", {"service": "normalize", "input": "scatter.npy", "mode": "scatter", "shards": 4}, x)
    drop(root, "pipe", {"pipeline": ["normalize", "echo"], "input": "pipe.npy"}, x)
    drop(root, "fails", {"service": "fail", "input": "fails.npy"}, x)
    drop(root, "bad", "service: [", None)
    # When the daemon runs them
    proc = spool_cmd(config, root)
    try:
        def finished() -> bool:
            assert proc.poll() is None, (tmp_short / "spool.log").read_text()
            return len(outputs(root)) == 3 and all((root / "failed" / f"{n}.error").exists() for n in ("fails", "bad"))

        wait_until(finished, 40, "three outputs, a failure and a refusal")  # bad waits for a slot: it is read then
        # Then each output is right and whole, inputs moved on, errors explained, the daemon still up
        from ndpipe.examples.handlers import normalize

        for name in ("call", "scatter", "pipe"):
            np.testing.assert_allclose(np.load(root / "outbox" / f"{name}.npy"), normalize(x), rtol=1e-12)
        assert "ValueError" in (root / "failed" / "fails.error").read_text()
        assert "invalid YAML" in (root / "failed" / "bad.error").read_text()
        wait_until(lambda: sorted(os.listdir(root / "inbox")) == [], 10, "inbox emptied")
        assert proc.poll() is None
        # And SIGTERM with a job in flight lets it finish (drain), then exits 0
        drop(root, "slow", {"service": "spin", "input": "slow.npy"}, np.array(1.0))  # spin(1.0 s)
        wait_until(lambda: "job slow started" in (tmp_short / "spool.log").read_text(), 20, "the slow job started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert (root / "outbox" / "slow.npy").exists() and (root / "done" / "slow.job.yaml").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log = (tmp_short / "spool.log").read_text()
    assert "job call done in" in log and "spool stopped" in log, log


def test_a_bad_dir_flag_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done = subprocess.run([sys.executable, "-m", "ndpipe.cli", "spool", "--dir", str(tmp_path / "file" / "x")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "spool.dir" in done.stderr and "--dir" in done.stderr
    empty = subprocess.run([sys.executable, "-m", "ndpipe.cli", "spool", "--dir", ""], capture_output=True,
                           text=True, timeout=30)
    assert empty.returncode == 2 and "--dir: spool.dir: " in empty.stderr, empty.stderr
