"""``ndpipe spool``: a master daemon that runs job files dropped in a directory, each exactly once.

Layout under ``spool.dir`` (created 0700 at start; /var/lib/ndpipe-spool under systemd)::

    inbox/    NAME.npy, then NAME.job.yaml        the user's drops; the job file is the commit point
    outbox/   NAME.npy                            results, each written whole or not at all
    done/     NAME.job.yaml, its input            inputs of finished jobs
    failed/   NAME.job.yaml, its input, NAME.error   inputs of failed or refused jobs, and why
    journal.jsonl                                 one record per job start, commit and end, fsynced

**Job file.** ``NAME.job.yaml``: ``service: S`` or ``pipeline: [A, B, C]``, ``input: NAME.npy`` (a
file directly in inbox/), optional ``mode: call | scatter`` (scatter: ``shards``, default
``spool.shards``, and ``axis``), optional ``timeout`` (seconds: per task, per shard, or for the
whole pipeline). Write the input first, then the job file as a dot-file renamed into place
(``.NAME.job.yaml`` → ``NAME.job.yaml``): the daemon ignores dot-files, so it never reads half a job.
A file that is not a valid job (bad YAML, over 64 KiB, aliases, an unknown key, an input outside
inbox/, missing, pickled or of object dtype, over ``spool.max_input_bytes`` by file size or .npy
header, more tasks than ``master.window``, a name already used) goes to failed/ with NAME.error
naming the file and the key; the daemon goes on. A refused job's input moves with it only if it is
NAME.npy (OTHER.npy may be another pending job's: it stays in inbox/). A name is a job's identity:
a second drop of a name is refused (rename it to run it again), with its own NAME.npy unless the
first is still running; the journal remembers the last 10,000 finished names (``KEEP_FINISHED``).
A job starts only while its tasks fit in the master's window beside those in flight (a wait for a
window slot inside ``master.call`` would stop the loop: no watchdog, no SIGTERM).

**Why polling.** A scan of inbox/ with ``os.scandir`` every ``poll_interval`` costs microseconds,
works on NFS, in containers and on any OS (inotify does none of these reliably), needs no
dependency, and the rename commit point makes it race-free; a job lasts far longer than the poll.

**Exactly once across kill -9.** The handler is run *at least* once; its output appears *exactly*
once, because the one step that makes it visible is a rename: the array is written to a dot-file
(``.tmp-PID-N``) in outbox/ and fsynced, the job is journaled ``committed`` with that name, the file
is renamed to NAME.npy and the directory fsynced. A job is journaled ``started`` before its tasks
are sent; after the rename its inputs move to done/ and it is journaled ``done``. At start the
daemon compacts the journal (a torn last line is dropped), finishes every job journaled
``committed`` (renaming its temporary if it is still there; the output need not be in outbox/ any
more: a consumer may have taken it), looks at the files for every job journaled ``started``, and
then removes the remaining temporaries:

======================================== ============================ ==================================
kill -9 after …                          on disk                      at restart
======================================== ============================ ==================================
the job file is renamed into inbox/      inbox: job, input            a new job: run
journal ``started``                      + journal: started           no output: run again
tasks sent, some answered                (answers lost with the       no output: run again (the tasks
                                         master)                      run twice; same result if the
                                                                      handler is deterministic)
the temporary output written             + outbox/.tmp-PID-N          temporary removed; run again
**journal ``committed``** (commit)       + journal: committed, tmp    temporary renamed: **not rerun**;
                                                                      inputs → done/, journal done
the output renamed                       + outbox/NAME.npy (or taken  **not rerun**; inputs → done/,
                                         away by a consumer)          journal done
inputs moved                             done/: job, input            journal done
journal ``done``                         finished                     nothing; NAME again: duplicate
======================================== ============================ ==================================

A failure commits the same way, with failed/NAME.error as the commit: written atomically, then the
inputs move to failed/ and the journal says ``failed``; a restart in between finishes those steps.
A job whose handler is not deterministic (random, time-dependent) may compute a different result on
its rerun; the outbox still gets one, whole. Handlers must not have side effects that count.

**Failures.** A task error (TaskFailed with its remote traceback, TaskTimeout, ServiceUnavailable,
TaskCrashed, a result that is not an array) fails the job: failed/NAME.error holds the error, the
inputs move to failed/. An unreachable broker is not the job's fault: the job waits
``retry_interval`` and is sent again (logged at WARNING), for as long as it takes; so does a job
whose output cannot be written for a full disk (ENOSPC, EDQUOT: it runs again, its result was not
kept). Any other OSError or a MemoryError in a job's files (EACCES, ENAMETOOLONG) fails or refuses
that job; if even failed/ cannot be written it is tried again in ``retry_interval``. An error after
the ``committed`` record, and a closed Master (its I/O thread died), are :class:`SpoolFatal`: the
daemon exits 1 without failing a job, systemd restarts it, and the journal resumes.

**Signals.** SIGTERM or SIGINT: no new job is taken, jobs in flight get ``drain_timeout`` seconds to
finish, the rest stay journaled ``started`` and rerun at the next start; exit 0. One loop
(STYLE.md, habit 3): scan when the poll is due, reap finished jobs (a future's completion wakes the
loop through :class:`~ndpipe.runtime.StopSignal`'s pipe), sleep until the next deadline.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ndpipe.config import SpoolConfig
from ndpipe.errors import BrokerUnreachable, NdpipeError
from ndpipe.master.spooljob import (
    JOB_SUFFIX,
    JobError,
    JobSpec,
    Journal,
    MasterClosed,
    SpoolFatal,
    as_output,
    clean_temps,
    finish_rename,
    fsync_dir,
    input_if_named,
    is_closed,
    job_name,
    load_input,
    make_dirs,
    move,
    parse_job,
    save_array,
    task_count,
    write_text,
)

__all__ = ["MasterClosed", "MasterRunner", "Running", "Spool", "SpoolFatal", "serve"]
from ndpipe.runtime import StopSignal
from ndpipe.sdnotify import Notifier

log = logging.getLogger("ndpipe.spool")


@dataclass
class Running:
    """A job's tasks in flight and how their results make its output (a scatter's concatenation)."""

    futures: list[Future[Any]]
    combine: Callable[[list[Any]], Any] = lambda results: results[0]


Start = Callable[[JobSpec, np.ndarray], Running]
Step = Callable[[str, str], None]  # (crash point, job): the tests' fault injection; the daemon's watchdog ping
_FULL = (errno.ENOSPC, errno.EDQUOT)  # the outbox's disk is full: not the job's fault, it runs again later


class MasterRunner:
    """Sends a job's tasks through a connected :class:`~ndpipe.master.Master` without blocking the
    loop: a scatter is its shards' futures plus a concatenation, done when they all are."""

    def __init__(self, master: Any, shards: int) -> None:
        self.master, self.shards = master, shards
        self.window: int = int(master.window)  # tasks outstanding at once: the spool's jobs must fit in it

    def __call__(self, spec: JobSpec, x: np.ndarray) -> Running:
        if spec.pipeline is not None:
            return Running([self.master.pipeline(spec.pipeline, x, timeout=spec.timeout)])
        assert spec.service is not None
        if spec.mode == "call":
            return Running([self.master.call(spec.service, (x,), timeout=spec.timeout)])
        shards = min(spec.shards or self.shards, max(1, x.shape[spec.axis]))
        pieces = np.array_split(x, shards, axis=spec.axis)
        futures = [self.master.call(spec.service, (piece,), timeout=spec.timeout) for piece in pieces]
        return Running(futures, lambda results: np.concatenate(results, axis=spec.axis))


@dataclass
class Job:
    name: str
    spec: JobSpec
    inode: int
    running: Running
    started: float = field(default_factory=time.monotonic)


def _no_step(point: str, job: str) -> None:
    pass


class Spool:
    """The spool's state and file steps, socket-free: ``start`` sends a job's tasks (the daemon's
    :class:`MasterRunner`, or a fake in tests), ``step`` is called after every durable step and
    between jobs (``"next"``). ``window``: the master's; None (a fake) for no bound."""

    def __init__(self, cfg: SpoolConfig, start: Start, wake: Callable[[], None] = lambda: None,
                 step: Step = _no_step, window: int | None = None) -> None:
        self.cfg, self.start, self.wake, self.step = cfg, start, wake, step
        self.window = window if window is not None else getattr(start, "window", None)
        self.root = Path(cfg.dir)
        self.dirs = make_dirs(self.root)
        self.inbox, self.outbox = self.dirs["inbox"], self.dirs["outbox"]
        clean_temps(self.root)  # the journal's compaction temporary
        self.journal = Journal(self.root / "journal.jsonl")
        if self.journal.torn:
            log.warning("journal %s: a torn last record (a kill mid-write) was dropped", self.journal.path)
        self.inflight: dict[str, Job] = {}
        self.retry_at: dict[str, float] = {}
        self.backlog = False  # the last scan left jobs for want of a free slot (concurrency or window)
        self.counts = {"done": 0, "failed": 0, "refused": 0, "recovered": 0, "retries": 0}
        self._recover()  # before the outbox's temporaries go: a ``committed`` one is an output to rename
        for name in ("outbox", "failed"):
            clean_temps(self.dirs[name])

    # ---- restart -------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Finish the bookkeeping of every job a kill left journaled ``started`` (module docstring)."""
        for name, record in list(self.journal.last.items()):
            state = record["state"]
            if state not in ("started", "committed"):
                continue
            inode = record.get("ino")
            if state == "committed" or (self.outbox / f"{name}.npy").is_file():
                log.info("job %s: its output was committed before the restart; finishing its bookkeeping, "
                         "not running it again", name)
                finish_rename(self.outbox, name, str(record.get("tmp", "")))
                self._archive(name, str(record.get("input", "")), inode, self.dirs["done"])
                self.journal.record(name, "done", recovered=True)
                self.step("journaled", name)
                self.counts["recovered"] += 1
            elif (self.dirs["failed"] / f"{name}.error").exists():
                self._archive(name, str(record.get("input", "")), inode, self.dirs["failed"])
                self.journal.record(name, "failed")
                self.counts["failed"] += 1
            elif (self.inbox / f"{name}{JOB_SUFFIX}").exists():
                log.info("job %s: started before the restart without an output; running it again", name)
            else:
                self._refuse(name, "its job file left inbox/ before it finished (removed by hand?)", move_files=False)

    # ---- scanning --------------------------------------------------------------------------------------
    def scan(self, now: float) -> int:
        """Start the jobs waiting in inbox/, oldest first, up to ``concurrency`` in flight; how many."""
        entries = []
        with os.scandir(self.inbox) as it:
            for entry in it:
                name = job_name(entry.name)
                if name is not None:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    entries.append((st.st_mtime_ns, name, st.st_ino))
        seen = {name for _, name, _ in entries}
        for name in [n for n in self.retry_at if n not in seen]:
            del self.retry_at[name]  # its job file is gone: nothing to retry
        started, self.backlog = 0, False
        for _, name, inode in sorted(entries):
            self.step("next", name)
            try:
                outcome = self._consider(name, inode, now)
            except (OSError, MemoryError) as exc:
                self._job_error(name, exc, now)
                continue
            if outcome is None:
                self.backlog = True
                break
            started += outcome
        return started

    def _consider(self, name: str, inode: int, now: float) -> int | None:
        """Start the job if it may start now: 1 if started, 0 if not (refused, waiting), None if it must
        wait for a free slot (the scan stops there: the oldest job goes first)."""
        if name in self.inflight:
            if self.inflight[name].inode != inode:
                self._duplicate(name, "a job of that name is running")
            return 0
        if self.retry_at.get(name, now) > now:
            return 0
        state = self.journal.state(name)
        if state in ("done", "failed"):
            self._duplicate(name, f"a job of that name has {state} already")
            return 0
        if len(self.inflight) >= self.cfg.concurrency:
            return None
        return self._begin(name, inode)

    def tasks_in_flight(self) -> int:
        return sum(len(job.running.futures) for job in self.inflight.values())

    def _job_error(self, name: str, exc: BaseException, now: float) -> None:
        """An OSError or MemoryError in a job's files: refuse that job (never the daemon); if even that
        fails (a full disk), try again in ``retry_interval``."""
        try:
            self._refuse(name, f"{name}{JOB_SUFFIX}: {type(exc).__name__}: {exc}", move_files=True)
        except (OSError, MemoryError) as again:
            self.retry_at[name] = now + self.cfg.retry_interval
            log.error("job %s: %s; and it cannot be moved to failed/ (%s): trying again in %g s", name, exc, again,
                      self.cfg.retry_interval)

    def _begin(self, name: str, inode: int) -> int | None:
        self.retry_at.pop(name, None)
        try:
            spec = parse_job(self.inbox, name, self.window, self.cfg.shards)
            if self.window is not None and self.inflight and \
                    self.tasks_in_flight() + task_count(spec, self.cfg.shards) > self.window:
                return None  # its tasks would wait for a window slot inside the loop: start it later
            x = load_input(self.inbox, name, spec, self.cfg.max_input_bytes)
        except JobError as exc:
            self._refuse(name, str(exc), move_files=True)
            return 0
        attempt = int(self.journal.last.get(name, {}).get("attempt", 0)) + 1
        self.journal.record(name, "started", input=spec.input, ino=inode, attempt=attempt)
        self.step("started", name)
        try:
            running = self.start(spec, x)
        except (NdpipeError, ValueError) as exc:  # refused at submit: an array over max_frame_bytes, …
            if is_closed(exc):
                raise MasterClosed(f"job {name}: {exc}") from exc  # not the job's fault: it reruns after a restart
            self._fail(name, spec.input, inode, exc, 0.0)
            return 0
        self.step("sent", name)
        job = Job(name, spec, inode, running)
        self.inflight[name] = job
        for future in running.futures:
            future.add_done_callback(lambda _f: self.wake())
        target = spec.service or " → ".join(spec.pipeline or ())
        log.info("job %s started: %s %s on %s %s (attempt %d)", name, spec.mode, target, x.dtype, x.shape, attempt)
        return 1

    # ---- finishing -------------------------------------------------------------------------------------
    def reap(self, now: float) -> int:
        """Finish every job whose tasks have all answered (or one failed); how many."""
        finished = 0
        for name, job in list(self.inflight.items()):
            futures = job.running.futures
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is None and not all(f.done() for f in futures):
                continue
            self.step("next", name)
            del self.inflight[name]
            finished += 1
            try:
                self._finish(job, failed, now)
            except (OSError, MemoryError) as exc:  # not committed (after it, the error propagates: see _succeed)
                self._file_error(job, exc, now)
        return finished

    def _finish(self, job: Job, failed: Future[Any] | None, now: float) -> None:
        name, seconds = job.name, now - job.started
        if failed is not None:
            for f in job.running.futures:
                f.cancel()
            exc = failed.exception()
            assert exc is not None
            if is_closed(exc):
                raise MasterClosed(f"job {name}: {exc}") from exc
            if isinstance(exc, BrokerUnreachable):
                self._retry(name, str(exc), now)
                return
            self._fail(name, job.spec.input, job.inode, exc, seconds)
            return
        try:
            output = as_output(job.running.combine([f.result() for f in job.running.futures]))
        except (ValueError, TypeError) as exc:
            self._fail(name, job.spec.input, job.inode, exc, seconds)
            return
        self._succeed(job, output, seconds)

    def _retry(self, name: str, why: str, now: float) -> None:
        self.retry_at[name] = now + self.cfg.retry_interval
        self.counts["retries"] += 1
        log.warning("job %s: %s; sending it again in %g s", name, why, self.cfg.retry_interval)

    def _file_error(self, job: Job, exc: OSError | MemoryError, now: float) -> None:
        """Writing a job's output failed before its commit: a full disk (ENOSPC, EDQUOT) runs the job
        again in ``retry_interval``; any other error (EACCES, ENAMETOOLONG, MemoryError) fails it."""
        if isinstance(exc, OSError) and exc.errno in _FULL:
            self._retry(job.name, f"cannot write its output ({exc})", now)
            return
        try:
            self._fail(job.name, job.spec.input, job.inode, exc, now - job.started)
        except (OSError, MemoryError) as again:
            self.retry_at[job.name] = now + self.cfg.retry_interval
            log.error("job %s: %s; and it cannot be moved to failed/ (%s): running it again in %g s", job.name,
                      exc, again, self.cfg.retry_interval)

    def _succeed(self, job: Job, output: np.ndarray, seconds: float) -> None:
        """Commit the output: journal ``committed`` with the durable temporary's name, then rename it.
        An error before that record is the job's (:meth:`_file_error`); after it, the output is
        committed and the error propagates: the restart's recovery finishes the job."""
        path = self.outbox / f"{job.name}.npy"
        committed, temporary = False, None

        def commit(tmp: Path) -> None:
            nonlocal committed, temporary
            temporary = tmp
            self.journal.record(job.name, "committed", input=job.spec.input, ino=job.inode, tmp=tmp.name)
            committed = True
            self.step("committed", job.name)

        try:
            save_array(path, output, commit)
            self.step("output", job.name)
            self._archive(job.name, job.spec.input, job.inode, self.dirs["done"])
            self.step("moved", job.name)
            self.journal.record(job.name, "done")
        except (OSError, MemoryError) as exc:
            if committed:
                raise SpoolFatal(f"job {job.name}: its output is committed, but {type(exc).__name__}: {exc}; "
                                 "exiting so that the restart's recovery finishes its bookkeeping") from exc
            if temporary is not None:
                temporary.unlink(missing_ok=True)  # the journal could not say "committed": not an output
            raise
        self.step("journaled", job.name)
        self.counts["done"] += 1
        log.info("job %s done in %.3f s: %s %s %s", job.name, seconds, path, output.dtype, output.shape)

    def _fail(self, name: str, input_name: str, inode: int | None, exc: BaseException, seconds: float) -> None:
        text = f"{type(exc).__name__}: {exc}"
        write_text(self.dirs["failed"] / f"{name}.error", text + "\n")
        self.step("error", name)
        self._archive(name, input_name, inode, self.dirs["failed"])
        self.step("moved", name)
        self.journal.record(name, "failed")
        self.step("journaled", name)
        self.counts["failed"] += 1
        log.error("job %s failed after %.3f s: %s", name, seconds, text.splitlines()[0][:500])

    def _refuse(self, name: str, why: str, move_files: bool) -> None:
        """A job that cannot run (its file, its input): failed/NAME.error says why; never raises."""
        write_text(self.dirs["failed"] / f"{name}.error", f"JobError: {why}\n")
        if move_files:  # its input only if named after it: OTHER.npy may be another pending job's
            spec_input = input_if_named(self.inbox, name)
            self._archive(name, spec_input if spec_input == f"{name}.npy" else "", None, self.dirs["failed"])
        self.journal.record(name, "failed", refused=True)
        self.counts["refused"] += 1
        log.warning("job %s refused: %s", name, why.replace("\n", "; "))

    def _duplicate(self, name: str, why: str) -> None:
        """A second drop of a used name: moved aside with its own .error, with its input NAME.npy
        unless the first job is still running (then that file may be the first job's)."""
        tag = f"{name[:200]}.dup-{time.time_ns()}"  # short enough for NAME_MAX with any suffix
        src = self.inbox / f"{name}{JOB_SUFFIX}"
        own = f"{name}.npy"
        moves = name not in self.inflight and input_if_named(self.inbox, name) == own
        write_text(self.dirs["failed"] / f"{tag}.error",
                   f"JobError: {name}{JOB_SUFFIX}: duplicate job name: {why}; rename the job to run it again "
                   f"({f'its input is failed/{tag}.npy' if moves else 'its input, if any, was left in inbox/'})\n")
        if moves:
            try:
                os.replace(self.inbox / own, self.dirs["failed"] / f"{tag}.npy")
            except FileNotFoundError:
                pass
        try:
            os.replace(src, self.dirs["failed"] / f"{tag}{JOB_SUFFIX}")
        except FileNotFoundError:
            pass
        fsync_dir(self.dirs["failed"])
        fsync_dir(self.inbox)
        self.counts["refused"] += 1
        log.warning("job %s refused: duplicate job name (%s)", name, why)

    def _archive(self, name: str, input_name: str, inode: Any, dest: Path) -> None:
        """Move a job's input, then its job file (unless a new drop replaced it), into ``dest``."""
        if input_name and "/" not in input_name and not input_name.startswith("."):
            move(self.inbox / input_name, dest)
        move(self.inbox / f"{name}{JOB_SUFFIX}", dest, inode if isinstance(inode, int) else None)
        fsync_dir(dest)
        fsync_dir(self.inbox)

    def next_retry(self) -> float:
        """When a retry is due; +inf while no slot is free (the reap of a job rescans: no busy loop)."""
        if len(self.inflight) >= self.cfg.concurrency or self.backlog:
            return float("inf")
        return min(self.retry_at.values(), default=float("inf"))

    def close(self) -> None:
        self.journal.close()


def serve(cfg: SpoolConfig, master: Any, stop: StopSignal, notify: Notifier | None = None) -> dict[str, int]:
    """Run the spool until ``stop`` is requested, then drain; the counts of what it did. ``notify``:
    systemd's READY once the journal is recovered, WATCHDOG from this loop and from every file step
    (one pass may load and save several arrays), STOPPING on the drain. :class:`SpoolFatal` (the
    master closed) propagates: the caller exits 1, and the jobs in flight rerun after the restart."""
    notify = notify or Notifier()
    notifier = notify

    def ping(point: str, job: str) -> None:  # paced by the notifier: cheap to call at every step
        notifier.watchdog(time.monotonic())

    spool = Spool(cfg, MasterRunner(master, cfg.shards), wake=stop.wake, step=ping)
    log.info("spool %s: watching %s every %g s, %d jobs at a time, broker %s", spool.root, spool.inbox,
             cfg.poll_interval, cfg.concurrency, getattr(master, "endpoint", "?"))
    notify.ready(f"watching {spool.inbox}")

    def status(now: float) -> str:
        c = spool.counts
        return (f"{len(spool.inflight)} jobs running, {c['done']} done, {c['failed']} failed, "
                f"{c['refused']} refused, {c['retries']} retries")

    next_scan = 0.0
    try:
        while not stop.requested:
            now = time.monotonic()
            notify.tick(now, status)
            if now >= next_scan or now >= spool.next_retry():
                spool.scan(now)
                next_scan = now + cfg.poll_interval
            if spool.reap(time.monotonic()) and spool.backlog:
                next_scan = 0.0  # a slot freed and jobs are waiting: scan again now
                continue
            _sleep(stop, min(next_scan, spool.next_retry(), notify.due) - time.monotonic())
        notify.stopping(f"finishing {len(spool.inflight)} jobs (up to {cfg.drain_timeout:g} s)")
        deadline = time.monotonic() + cfg.drain_timeout
        while spool.inflight and time.monotonic() < deadline:
            spool.reap(time.monotonic())
            _sleep(stop, min(0.5, deadline - time.monotonic()) if spool.inflight else 0.0)
        left = sorted(spool.inflight)
        c = spool.counts
        log.info("spool stopped ◆ %d done ◆ %d failed ◆ %d refused ◆ %d recovered ◆ %d retries ◆ %d left to rerun "
                 "at the next start%s", c["done"], c["failed"], c["refused"], c["recovered"], c["retries"],
                 len(left), f" ({', '.join(left[:10])})" if left else "")
        return dict(c)
    finally:
        spool.close()


def _sleep(stop: StopSignal, seconds: float) -> None:
    if seconds > 0:
        select.select([stop.fd], [], [], seconds)
    stop.clear()

