"""Scenarios 6–8: a master killed with a long queue, overload past ``max_queued``, garbage on the wire.

Same shape as :mod:`ndpipe.chaos.scenarios`: each scenario starts its own cluster, runs a job
through a real ``Master`` while injecting its fault, and returns the checker's :class:`Report`.
Extra processes (the doomed master, the garbage senders) are started here with ``-c`` and added
to the cluster's process list, so :meth:`Cluster.close` stops them by pid if a run fails.
``short`` is the CI-sized variant. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import json
import random
import signal
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import psutil
import zmq

from ndpipe import protocol as P
from ndpipe.chaos.checker import History, Report, read_starts
from ndpipe.chaos.handlers import SERVICES
from ndpipe.chaos.scenarios import FAST, SIZE, Params, finish, slack, submit_in_background
from ndpipe.cluster import Cluster, wait_for
from ndpipe.config import MasterConfig
from ndpipe.errors import NdpipeError
from ndpipe.master import Master

DEFAULT_HB = {"heartbeat_interval": P.HEARTBEAT_INTERVAL, "liveness": P.LIVENESS}
MB = 1 << 20
RSS_LIMIT = 64 * MB


# ---- helpers ------------------------------------------------------------------------------------------
def _spawn(c: Cluster, name: str, code: str, *args: str) -> subprocess.Popen[bytes]:
    """Run ``python -c code args...`` as a process the cluster stops (by pid) when it closes."""
    log = open(c.root / f"{name}-{len(c.procs)}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    c.procs.append(proc)
    return proc


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _work(status: dict[str, Any]) -> dict[str, int]:
    return dict(status["services"].get("work", {"queued": 0, "inflight": 0, "workers": 0, "slots": 0}))


def _dispatched(status: dict[str, Any]) -> int:
    """Tasks the broker has dispatched so far (finished ones plus those in flight): grows only by dispatch."""
    return int(status["counters"]["completed"] + status["counters"]["failed"] + _work(status)["inflight"])


class Sampler:
    """Samples the broker's RSS (and, with ``watcher``, ``probe(STATUS)``) every ``every`` s in a thread,
    until :meth:`stop` or ``limit`` s."""

    def __init__(self, pid: int, watcher: Master | None = None,
                 probe: Callable[[dict[str, Any]], dict[str, int]] | None = None,
                 every: float = 0.1, limit: float = 900.0) -> None:
        self.pid, self.watcher, self.probe, self.every, self.limit = pid, watcher, probe, every, limit
        self.rss: list[int] = []
        self.peaks: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.wait(self.every) and time.monotonic() < deadline:
            try:
                self.rss.append(_rss(self.pid))
            except psutil.Error:
                return
            if self.watcher is not None and self.probe is not None:
                try:
                    for key, value in self.probe(self.watcher.status(timeout=2)).items():
                        self.peaks[key] = max(self.peaks[key], value)
                except NdpipeError:
                    self.peaks["status timeouts"] += 1


# ---- 6 --------------------------------------------------------------------------------------------------
def doomed_master(endpoint: str, tasks: int, seconds: float, log_dir: str, linger: float = 600.0) -> None:
    """Body of the master process ``master_dies`` kills: submit ``tasks`` calls at once, then wait (bounded)."""
    m = Master(endpoint, config=MasterConfig(broker=endpoint, window=tasks + 16))
    futures = [m.call("work", (tid, SIZE, seconds, log_dir)) for tid in range(tasks)]
    print(f"submitted {len(futures)}", flush=True)
    time.sleep(linger)  # kill -9 comes long before
    m.close()


def _poll_until_forgotten(watcher: Master, deadline: float) -> tuple[float | None, dict[str, Any]]:
    """STATUS every 50 ms until the work queue is empty: (when it was seen empty, that STATUS)."""
    status = watcher.status()
    for _ in range(100_000):
        if _work(status)["queued"] == 0:
            return time.monotonic(), status
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        status = watcher.status()
    return None, status


def master_dies(p: Params) -> Report:
    """kill -9 of a master process whose 10,000 tasks wait in the broker's queue: the broker must forget it
    within liveness × interval, let its in-flight tasks drain and start none of its tasks afterwards."""
    hb = FAST if p.short else DEFAULT_HB
    tasks, seconds, follow = p.n(10_000, 2_000), 0.2, (20 if p.short else 100)
    bound = hb["liveness"] * hb["heartbeat_interval"] + 0.5
    report = Report("master_dies", f"kill -9 of a master process with {tasks:,} tasks queued ({seconds * 1000:.0f} ms "
                    f"each on 1 daemon × 2 processes); heartbeat {hb['heartbeat_interval']} s × {hb['liveness']}; "
                    f"then a job of {follow} tasks from a new master (the counts below)",
                    recovery={"forgotten after s": []}, bounds={"forgotten after s": bound + slack(p)},
                    planned=follow)
    t_start = time.monotonic()
    with Cluster(SERVICES, broker=hb) as c:
        c.start_broker()
        c.start_worker(2)
        with c.master() as watcher:
            c.wait_slots(watcher, 2)
            code = "import sys; from ndpipe.chaos.load import doomed_master as d; d(sys.argv[1], " \
                   "int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])"
            doomed = _spawn(c, "doomed-master", code, c.frontend, str(tasks), str(seconds), c.log_dir)
            wait_for(lambda: watcher.status()["counters"]["submitted"] >= tasks, 120,
                     f"{tasks:,} tasks of the doomed master at the broker", 0.1)
            at_kill = watcher.status()
            t_kill = time.monotonic()
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(10)
            t_gone, gone = _poll_until_forgotten(watcher, t_kill + bound + 10)
            if t_gone is not None:
                report.recovery["forgotten after s"].append(t_gone - t_kill)
            wait_for(lambda: _work(watcher.status())["inflight"] == 0, 10 + 5 * seconds, "in-flight tasks drained")
            time.sleep(5 * seconds)  # two free slots: anything still queued would start now
            after = watcher.status()
            starts = [t for runs in read_starts(c.log_dir).values() for tid, t in runs if tid < tasks]
            late = sum(t > t_kill for t in starts)
            report.notes.append(f"at the kill: {_work(at_kill)['queued']:,} queued, {_work(at_kill)['inflight']} in "
                                f"flight; {len(starts) - late} of its tasks had started")
            report.notes.append(f"its tasks dispatched after the kill: {_dispatched(gone) - _dispatched(at_kill)} "
                                f"(broker counters), {late} started (start logs); "
                                f"{_work(gone)['inflight']} in flight when it was forgotten, drained since")
            tail = t_gone + 0.1 if t_gone is not None else float("inf")
            report.checks["queue was long at the kill"] = _work(at_kill)["queued"] >= tasks * 0.9
            report.checks["no dispatch after it was forgotten"] = (
                _dispatched(after) == _dispatched(gone) and not any(t > tail for t in starts))
            report.checks["broker holds none of its tasks"] = after["tasks"] == 0 and after["masters"] == 1
            with c.master() as m:
                hist = History()
                submit_in_background(m, hist, range(10**6, 10**6 + follow), 0.01, c.log_dir).join(60)
                finish(c, hist, report, 60, t_start)
    return report


# ---- 7 --------------------------------------------------------------------------------------------------
def overload(p: Params) -> Report:
    """Far more tasks at once than ``broker.max_queued``: explicit QueueFull for the excess, every other task
    answered correctly, the queue never above its bound, the broker's memory bounded. And the bound is
    not lower than configured: while that job holds tasks, a burst to a service with no workers yet
    must queue exactly ``max_queued`` (no more, no fewer) before a worker for it starts."""
    tasks, limit, seconds = p.n(5_000, 1_000), (200 if p.short else 500), 0.05
    extra = limit // 2
    report = Report("overload", f"{tasks:,} tasks submitted at once through a window of {tasks:,} to a broker with "
                    f"max_queued = {limit}; {seconds * 1000:.0f} ms tasks on 1 daemon × 2 processes; meanwhile "
                    f"{limit + extra:,} tasks to a service with no workers yet, then a worker for it",
                    expected_errors={"QueueFull": None}, planned=tasks + limit + extra)
    hb = FAST if p.short else DEFAULT_HB
    later = {"later": "ndpipe.chaos.handlers:work"}
    with Cluster(SERVICES, broker={**hb, "max_queued": limit}, master={"window": tasks}) as c:
        c.start_broker()
        c.start_worker(2)
        with c.master() as m, c.master() as watcher, c.master(window=limit + extra + 16) as m2:
            c.wait_slots(m, 2)
            assert c.broker is not None
            before = _rss(c.broker.pid)
            sampler = Sampler(c.broker.pid, watcher, _queues).start()
            hist, t0 = History(), time.monotonic()
            submitter = submit_in_background(m, hist, range(tasks), seconds, c.log_dir)
            wait_for(lambda: _work(watcher.status())["queued"] >= limit // 2, 60, "the work queue filling", 0.01)
            held = watcher.status()["tasks"]
            later_ids = range(10**6, 10**6 + limit + extra)
            for tid in later_ids:
                hist.track(tid, SIZE, m2.call("later", (tid, SIZE, 0.0, c.log_dir)))
            wait_for(lambda: sum(t in hist.first_at for t in later_ids) >= extra, 60, "QueueFull for the excess")
            queued_later = _later(watcher.status())
            c.start_worker(2, overrides={"services": later})
            submitter.join(p.wait(120))
            finish(c, hist, report, p.wait(300), t0)
            sampler.stop()
            counters = watcher.status()["counters"]
        peak = max([before, *sampler.rss])
        full = report.errors.get("QueueFull", 0)
        samples, timeouts = len(sampler.rss), sampler.peaks["status timeouts"]
        report.notes.append(f"broker RSS {before / MB:.1f} MB before, peak {peak / MB:.1f} MB "
                            f"(+{(peak - before) / MB:.1f} MB); work queue peak {sampler.peaks['queued']} of {limit}")
        report.notes.append(f"the service with no workers queued {queued_later} of max_queued = {limit} while the "
                            f"broker held {held} tasks of the job; {samples} samples, {timeouts} STATUS timeouts")
        report.notes.append(f"broker counters: {counters['submitted']:,} accepted, {counters['rejected']:,} rejected "
                            f"(resends included), {counters['duplicates']:,} duplicates")
        report.checks["QueueFull raised for the excess (> 0)"] = full > 0
        report.checks["ok + QueueFull == submitted"] = report.ok + full == report.submitted
        report.checks[f"a service with no workers queues exactly max_queued = {limit}, other services' tasks "
                      "not counted"] = queued_later == limit and held > 0
        report.checks[f"no queue ever above max_queued = {limit}"] = max(sampler.peaks["queued"],
                                                                         sampler.peaks["later"]) <= limit
        report.checks["at least 10 STATUS samples, under 10 % timeouts"] = (
            samples - timeouts >= 10 and timeouts * 10 < samples)
        report.checks["broker RSS grew < 64 MB"] = peak - before < RSS_LIMIT
    return report


def _later(status: dict[str, Any]) -> int:
    return int(status["services"].get("later", {}).get("queued", 0))


def _queues(status: dict[str, Any]) -> dict[str, int]:
    return {"queued": _work(status)["queued"], "later": _later(status)}


# ---- 8 --------------------------------------------------------------------------------------------------
COMMANDS = sorted({v for k, v in vars(P).items() if isinstance(v, bytes) and len(v) == 1})  # incl. C_* bytes
UNKNOWN = [b"", b"\x00", b"\x1a", b"\x7f", b"\xff", b"\x01\x01", b"SUBMIT"]
NAMES = [f"g{k}" for k in range(8)]  # garbage service names shared by fake READYs and SUBMITs


class Garbage:
    """Seeded generator of malformed (and a few well-formed but pointless) messages for one broker socket."""

    def __init__(self, rng: random.Random, side: str, oversize: int) -> None:
        self.rng, self.side, self.oversize = rng, side, oversize
        self.pool = rng.randbytes(1 << 20)  # frames are slices of it: random bytes without the cost
        self.big = bytes(2 * oversize + 4096)
        self.own, self.other = (P.MASTER, P.WORKER) if side == "frontend" else (P.WORKER, P.MASTER)
        self.kinds: list[tuple[str, Callable[[], list[Any]], float]] = [
            ("random frames", self.random_frames, 15), ("bad header", self.bad_header, 8),
            ("truncated", self.truncated, 10), ("command, garbage body", self.command, 55),
            ("other side's header", self.other_side, 8), ("unknown command", self.unknown, 3),
            ("too many frames", self.too_many, 0.3), ("oversized frame", self.oversized, 0.3),
        ]
        self.weights = [w for _, _, w in self.kinds]

    def __call__(self) -> tuple[str, list[Any]]:
        name, make, _ = self.rng.choices(self.kinds, self.weights)[0]
        return name, make()

    # ---- pieces
    def blob(self, high: int = 2000) -> bytes:
        n = self.rng.randint(0, high)
        at = self.rng.randrange(len(self.pool) - n)
        return self.pool[at:at + n]

    def blobs(self, high: int = 5) -> list[bytes]:
        return [self.blob() for _ in range(self.rng.randint(0, high))]

    def tid(self) -> bytes:
        r = self.rng.random()
        if r < 0.1:
            return b""
        if r < 0.2:
            return self.blob(200)[:65].ljust(65, b"x")
        return self.rng.randbytes(self.rng.randint(1, P.MAX_TASK_ID))

    def service(self) -> bytes:
        choice = self.rng.choice(["fresh", "fresh", "shared", "work", "empty", "long", "utf8"])
        if choice == "fresh":  # a new name each time: does the broker keep a queue per name?
            return "".join(self.rng.choices(string.ascii_letters, k=self.rng.randint(1, 24))).encode()
        return {"shared": self.rng.choice(NAMES).encode(), "work": b"work", "empty": b"", "long": b"s" * 300,
                "utf8": b"\xff\xfe\xfd"}[choice]

    def options(self) -> bytes:
        if self.rng.random() < 0.3:
            return self.blob(16)
        flags = self.rng.choice([0, 0, P.FLAG_BATCH, self.rng.randrange(1 << 16)])
        return P.OPTIONS.pack(self.rng.choice([0, 1, 50, self.rng.randrange(1 << 32)]), self.rng.randrange(5), flags)

    def control_map(self) -> bytes:
        value: Any = self.rng.choice([
            [1, 2, 3], 7, "text", None,
            {"services": "work"}, {"services": []}, {"services": [1, 2]}, {"slots": 3},
            {"services": [self.rng.choice(NAMES)], "slots": self.rng.choice([0, -1, 10**6, "2", 2.5])},
            {"pid": 1, "host": "x" * 100}, {b"\xff": b"\x00"},
        ])
        return self.blob() if self.rng.random() < 0.3 else msgpack.packb(value, use_bin_type=True)

    def code(self) -> bytes:
        return self.rng.choice([P.CRASHED.encode(), P.TIMEOUT.encode(), b"NOT_A_CODE", b"lower", b"", b"X" * 40,
                                self.blob(40)])

    def body(self, command: bytes) -> list[Any]:
        """Frames after header + command: shaped like the command's, with garbage in them."""
        r = self.rng
        if command == P.SUBMIT:
            return [self.service(), self.tid(), self.options(), *self.blobs(4)]
        if command in (P.CANCEL, P.W_RESULT, P.W_CANCEL, P.RESULT):
            return [self.tid(), *self.blobs(3)]
        if command in (P.W_ERROR, P.ERROR):
            return [self.tid(), self.code(), self.control_map()]
        if command == P.READY:
            if r.random() < 0.02:  # a well-formed READY for a garbage service (never "work")
                info = {"services": r.sample(NAMES, 2), "slots": r.randint(1, 8), "pid": 0, "host": "garbage"}
                return [msgpack.packb(info)]
            return [self.control_map(), *self.blobs(2)]
        if command in (P.HEARTBEAT, P.WELCOME, P.STATUS_REPLY):
            return [self.control_map(), *self.blobs(2)]
        if command == P.TASK:
            return [self.tid(), self.service(), self.blob(12), *self.blobs(3)]
        return self.blobs(3)  # PING, STATUS, BYE, PONG, DRAIN, DISCONNECT, C_*: extra frames

    # ---- kinds
    def random_frames(self) -> list[Any]:
        return [self.blob() for _ in range(max(1, self.rng.randint(0, 40)))]  # 0 frames: one empty frame

    def bad_header(self) -> list[Any]:
        header = self.rng.choice([b"", self.own[:-1], self.own + b"\x00", b"NDPM02", b"NDPW01", self.blob(8)])
        return [header, self.rng.choice(COMMANDS), *self.blobs()]

    def truncated(self) -> list[Any]:
        command = self.rng.choice(COMMANDS)
        full = [self.own, command, *self.body(command)]
        return full[:self.rng.randint(1, max(1, min(len(full) - 1, 5)))]

    def command(self) -> list[Any]:
        command = self.rng.choice(COMMANDS)
        return [self.own, command, *self.body(command)]

    def other_side(self) -> list[Any]:
        command = self.rng.choice(COMMANDS)
        return [self.other, command, *self.body(command)]

    def unknown(self) -> list[Any]:
        return [self.own, self.rng.choice(UNKNOWN), *self.blobs()]

    def too_many(self) -> list[Any]:
        head = [self.own, P.SUBMIT, b"work", self.rng.randbytes(16), P.OPTIONS.pack(0, 0, 0)]
        return [*head, *[b""] * (P.MAX_FRAMES + 64)]

    def oversized(self) -> list[Any]:
        n = self.oversize + self.rng.randint(1, 4096)  # libzmq drops the connection; the DEALER reconnects
        return [self.own, P.SUBMIT, b"work", self.rng.randbytes(16), P.OPTIONS.pack(0, 0, 0),
                memoryview(self.big)[:n]]


def _drain(socks: list[zmq.Socket[Any]], cap: int = 1000) -> int:
    got = 0
    for sock in socks:
        for _ in range(cap):
            try:
                sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            got += 1
    return got


def garbage_sender(args: dict[str, Any]) -> None:
    """Body of one garbage process: ``args["messages"]`` messages to one broker socket over a few DEALERs,
    starting at monotonic ``args["start_at"]``, for at most ``args["limit"]`` s; results as JSON to ``args["out"]``."""
    rng = random.Random(args["seed"])
    make = Garbage(rng, args["side"], args["oversize"])
    ctx = zmq.Context()
    socks = []
    for _ in range(args["sockets"]):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 10_000
        sock.connect(args["endpoint"])
        socks.append(sock)
    time.sleep(max(0.0, min(30.0, args["start_at"] - time.monotonic())))
    t0 = time.monotonic()
    deadline, sent, again, replies, kinds = t0 + args["limit"], 0, 0, 0, Counter[str]()
    for attempt in range(args["messages"] * 20):
        if sent >= args["messages"] or time.monotonic() > deadline:
            break
        kind, frames = make()
        try:
            socks[attempt % len(socks)].send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # this DEALER's pipe is full (or reconnecting after an oversized frame)
            again += 1
            time.sleep(0.001)
            continue
        sent += 1
        kinds[kind] += 1
        if args["read"] and sent % 64 == 0:
            replies += _drain(socks)
    t1 = time.monotonic()
    replies += _drain(socks) if args["read"] else 0
    with open(args["out"], "w") as f:
        json.dump({"sent": sent, "start": t0, "end": t1, "again": again, "replies": replies, "kinds": kinds}, f)
    for sock in socks:
        sock.close(0)
    ctx.term()


def _probe(status: dict[str, Any]) -> dict[str, int]:
    return {"services": len(status["services"]), "masters": status["masters"], "tasks": status["tasks"],
            "workers": len(status["workers"])}


def _run_senders(c: Cluster, messages: int, seed: int, start_at: float, limit: float,
                 oversize: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for k, (side, endpoint) in enumerate((("frontend", c.frontend), ("backend", c.backend))):
        args = {"endpoint": endpoint, "side": side, "messages": messages, "seed": seed * 1000 + k,
                "start_at": start_at, "limit": limit, "oversize": oversize, "sockets": 4, "read": True,
                "out": str(c.root / f"garbage-{side}.json")}
        code = "import json, sys; from ndpipe.chaos.load import garbage_sender; garbage_sender(json.loads(sys.argv[1]))"
        procs.append(_spawn(c, f"garbage-{side}", code, json.dumps(args)))
    return procs


def _sender_results(c: Cluster, procs: list[subprocess.Popen[bytes]], limit: float) -> list[dict[str, Any]]:
    out = []
    for proc, side in zip(procs, ("frontend", "backend"), strict=True):
        try:
            proc.wait(limit + 60)
        except subprocess.TimeoutExpired:
            continue  # the cluster kills it; its result is missing
        path = c.root / f"garbage-{side}.json"
        if path.exists():
            out.append({"side": side, **json.loads(path.read_text())})
    return out


def garbage(p: Params) -> Report:
    """Malformed multipart messages at both broker sockets while a job runs: the job must complete correctly,
    the broker stay up with bounded memory, and what the garbage made it hold be forgotten afterwards."""
    messages, tasks, seconds = (5_000, 300, 0.005) if p.short else (100_000, 2_000, 0.005)
    tasks = p.tasks or tasks
    oversize, limit = MB, (60.0 if p.short else 600.0)
    hb = FAST if p.short else DEFAULT_HB
    report = Report("garbage", f"{messages:,} malformed messages to each broker socket (2 processes × 4 DEALERs, "
                    f"seed {p.seed}; max_frame_bytes {oversize >> 20} MiB) while {tasks:,} tasks of "
                    f"{seconds * 1000:.0f} ms run on 1 daemon × 2 processes", planned=tasks)
    with Cluster(SERVICES, broker={**hb, "max_frame_bytes": oversize}) as c:
        c.start_broker()
        c.start_worker(2)
        assert c.broker is not None
        with c.master() as m, c.master() as watcher:
            c.wait_slots(m, 2)
            before, base = _rss(c.broker.pid), set(watcher.status()["services"])
            start_at = time.monotonic() + 1.5  # the senders import and connect first
            senders = _run_senders(c, messages, p.seed, start_at, limit, oversize)
            sampler = Sampler(c.broker.pid, watcher, _probe, every=0.2).start()
            time.sleep(max(0.0, start_at - time.monotonic()))
            hist, t0 = History(), time.monotonic()
            submit_in_background(m, hist, range(tasks), seconds, c.log_dir).join(p.wait(120))
            results = _sender_results(c, senders, limit)
            finish(c, hist, report, p.wait(300), t0)
            sampler.stop()
            after = _rss(c.broker.pid)
            expiry = hb["liveness"] * hb["heartbeat_interval"]
            time.sleep(expiry + 2 * hb["heartbeat_interval"])  # garbage peers expire; prune runs each interval
            settled = watcher.status()
            after = _rss(c.broker.pid)  # what the broker keeps once the flood is over
        _garbage_notes(report, results, hist, before, after, max([after, *sampler.rss]), sampler.peaks, settled)
        report.checks["garbage forgotten after liveness"] = (
            set(settled["services"]) == base and settled["tasks"] == 0 and settled["masters"] == 2
            and len(settled["workers"]) == 1)
        report.checks["broker alive"] = c.broker.poll() is None
        report.checks[f"{2 * messages:,} messages sent"] = sum(r["sent"] for r in results) >= 2 * messages
    return report


def _garbage_notes(report: Report, results: list[dict[str, Any]], hist: History, before: int, after: int,
                   peak: int, peaks: Counter[str], settled: dict[str, Any]) -> None:
    for r in results:
        rate = r["sent"] / max(1e-9, r["end"] - r["start"])
        top = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items()))
        report.notes.append(f"{r['side']}: {r['sent']:,} sent in {r['end'] - r['start']:.1f} s ({rate:,.0f} msg/s), "
                            f"{r['again']} refused by a full pipe, {r['replies']:,} replies read; {top}")
    if results:
        start, end = min(r["start"] for r in results), max(r["end"] for r in results)
        total = sum(r["sent"] for r in results)
        report.notes.append(f"together {total / max(1e-9, end - start):,.0f} msg/s; "
                            f"{sum(start <= t <= end for t in hist.first_at.values())} of the job's answers "
                            "arrived while the garbage flowed")
    report.notes.append(f"broker RSS {before / MB:.1f} MB before, {after / MB:.1f} MB after, peak {peak / MB:.1f} MB")
    report.notes.append(f"peaks during the garbage (STATUS every 0.2 s): {peaks['services']} services, "
                        f"{peaks['masters']} masters, {peaks['tasks']} tasks, {peaks['workers']} workers"
                        + (f", {peaks['status timeouts']} STATUS timeouts" if peaks["status timeouts"] else ""))
    report.notes.append(f"after liveness: services {sorted(settled['services'])}, {settled['masters']} masters, "
                        f"{settled['tasks']} tasks, {len(settled['workers'])} workers")
    # What the broker keeps: RSS once the flood is over. The peak during it is recorded, not checked:
    # it is the backlog of unread garbage in libzmq's pipes (up to broker.hwm messages per peer).
    report.checks["broker RSS grew < 64 MB"] = after - before < RSS_LIMIT
    report.notes.append(f"RSS peak during the flood +{(peak - before) / MB:.0f} MB: messages not yet read, "
                        "queued in libzmq's pipes (at most broker.rcvhwm messages per peer, not bytes)")
    report.checks["job overlapped the garbage"] = bool(results) and any(
        min(r["start"] for r in results) <= t <= max(r["end"] for r in results) for t in hist.first_at.values())


SCENARIOS: dict[str, Callable[[Params], Report]] = {
    "master_dies": master_dies,
    "overload": overload,
    "garbage": garbage,
}

