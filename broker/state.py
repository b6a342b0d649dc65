"""Socket-free broker state: fair service queues, workers and their lanes, the in-flight table, expiry.

A worker is a daemon (:class:`HostRecord`: liveness, services, credit per lane) and its lanes
(:class:`LaneRecord`: one compute process each, on its own connection: the unit of dispatch). A lane
joins with the key its daemon got in WELCOME; it dies with its daemon (expiry, DISCONNECT) or alone
(LANE_GONE, an unroutable TASK). Answers are taken only from the lane holding the task or its
daemon, so a lane presumed dead cannot settle a task that has moved on.

Every method that depends on time takes ``now`` (a ``time.monotonic()`` value) so the whole state
machine is unit-tested without sleeping. The poll loop in :mod:`ndpipe.broker.server` reads frames,
calls these methods and sends what they return; it holds no task bookkeeping of its own.

Task life cycle (PROTOCOL.md §5)::

    submit ──► QUEUED ──dispatch──► INFLIGHT ──result/error──► done (forgotten)
                 ▲  │                  │
                 │  └─cancel/timeout/master gone──► dropped
                 └──── worker dead / crashed / handed back (attempt check) ──┘

Payload frames are stored as received and forwarded untouched; the broker never decodes them.

Dispatch picks the least-loaded lane with credit (in-flight / slots; ties: the one that waited
longest) in O(log n): each service keeps a heap of (load, last dispatch, seq, version, lane).
Every change to a lane's credit or load goes through :meth:`BrokerState._offer` (or ``_index``),
which bumps its version and pushes a fresh entry, so older entries are stale and skipped when
popped; an entry popped while the lane has no credit is dropped, and the lane comes back with
the next change that frees credit (each of those calls ``_offer``). A heap grown past twice its
service's lanes is rebuilt.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from ndpipe import protocol as P
from ndpipe.broker.budget import ByteBudget, payload_bytes
from ndpipe.broker.records import (
    DONE,
    INFLIGHT,
    QUEUED,
    Failure,
    HostRecord,
    LaneRecord,
    ServiceQueue,
    Task,
    task_key,
)
from ndpipe.broker.tally import Tallies

log = logging.getLogger("ndpipe.broker")
__all__ = ["DONE", "INFLIGHT", "QUEUED", "BrokerState", "Failure", "HostRecord", "LaneRecord", "ServiceQueue",
           "Task"]


class BrokerState:
    """Queues, workers, masters and in-flight tasks of one broker instance."""

    def __init__(
        self,
        heartbeat_interval: float = P.HEARTBEAT_INTERVAL,
        liveness: int = P.LIVENESS,
        max_attempts: int = P.MAX_ATTEMPTS_DEFAULT,
        max_queued: int = P.MAX_QUEUED,
        max_services: int = P.MAX_SERVICES,
        unroutable_timeout: float = P.UNROUTABLE_TIMEOUT,
        budget: ByteBudget | None = None,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.budget = budget or ByteBudget()  # payload bytes held, and their bounds
        self.refused = ""  # why the last SUBMIT was answered QUEUE_FULL
        self.liveness = liveness
        self.max_attempts = max_attempts
        self.max_queued = max_queued
        self.max_services = max_services
        self.unroutable_timeout = unroutable_timeout
        self._unroutable: dict[str, float] = {}  # service no live lane serves -> since when tasks wait for it
        self.broker_id = os.urandom(8)
        self.tasks: dict[bytes, Task] = {}
        self.queues: dict[str, ServiceQueue] = {}
        self.hosts: dict[bytes, HostRecord] = {}  # worker daemons by their connection's routing id
        self.by_key: dict[bytes, HostRecord] = {}
        self.by_name: dict[str, HostRecord] = {}
        self.lanes: dict[bytes, LaneRecord] = {}  # lanes by their connection's routing id
        self.by_service: dict[str, list[LaneRecord]] = {}
        self.broken_by: dict[str, list[LaneRecord]] = {}  # service -> lanes where its constructor failed
        self.masters: dict[bytes, tuple[float, int, bytes]] = {}  # id -> (expires, session number, id)
        self.failures: list[Failure] = []  # filled by state changes, drained by the loop
        self.cancels: list[tuple[LaneRecord, bytes]] = []  # (lane, task): W_CANCEL to send (lane and daemon)
        self.stops: list[tuple[LaneRecord, bytes]] = []  # (lane, stream): W_CANCEL to the lane only (it stops)
        self.streams: dict[bytes, Task] = {}  # stream tasks held: the ones a leaving master must stop
        self._sessions = 0
        self._deadlines: list[tuple[float, bytes]] = []
        self._dirty: set[str] = set()  # services that may be able to dispatch
        self._served: dict[str, int] = {}  # service -> sequence number of its last dispatch
        # service -> heap of (load, last dispatch, seq, version, worker): workers that may have credit
        self._free: dict[str, list[tuple[float, float, int, int, LaneRecord]]] = {}
        self._seq = itertools.count()
        # array-ref fetches forwarded to masters: request -> (worker connection, digest, expires)
        self.fetches: OrderedDict[bytes, tuple[bytes, bytes, float, bytes]] = OrderedDict()  # + the master asked
        self._fetch_ids = itertools.count(1)
        self.counters = dict.fromkeys(
            ("submitted", "completed", "failed", "requeued", "duplicates", "rejected", "cancelled", "dropped",
             "staged", "parts", "fetched_bytes"), 0
        )
        self.tallies = Tallies(max_services)  # per service, for metrics (ndpipe.broker.metrics)

    @property
    def expiry(self) -> float:
        return self.heartbeat_interval * self.liveness

    # ---- masters --------------------------------------------------------------------------------
    def master_seen(self, master: bytes, now: float) -> bytes:
        """Refresh a master's liveness (a new record gets a new session number). Returns the id object
        kept in the table, so every task of that master shares one bytes object instead of a copy each."""
        rec = self.masters.get(master)
        if rec is None:
            self._sessions += 1
            self.masters[master] = (now + self.expiry, self._sessions, master)
            return master
        self.masters[master] = (now + self.expiry, rec[1], rec[2])
        return rec[2]

    def session(self, master: bytes) -> bytes:
        """The token PONG carries: it changes when the broker restarted or forgot the master."""
        return self.broker_id + self.masters[master][1].to_bytes(8, "big")

    def master_gone(self, master: bytes) -> int:
        """Forget a master (BYE or expiry) and drop its queued tasks; return how many. Its streams
        under way are stopped (nobody consumes their parts, so they would wait for acks for ever)."""
        self.masters.pop(master, None)
        for task in [t for t in self.streams.values() if t.master == master and t.state == INFLIGHT]:
            self._stop_stream(task)
        dropped = 0
        for queue in self.queues.values():
            for task in queue.drop_master(master):
                self._finish(task)
                dropped += 1
        return dropped

    # ---- submissions ----------------------------------------------------------------------------
    def submit(
        self,
        master: bytes,
        tid: bytes,
        service: str,
        payload: list[Any],
        now: float,
        timeout_ms: int = 0,
        max_attempts: int = 0,
        flags: int = 0,
        stages: tuple[str, ...] = (),
        account: bytes | None = None,
    ) -> str | None:
        """Queue a master's task ``tid`` (of a pipeline: its first stage). Return None when queued or a
        duplicate, else the error code to send. ``account`` is whom its bytes count against (the
        master's key with curve on, so one key cannot multiply its budget over many connections)."""
        master_tid, tid = tid, task_key(master, tid)
        if tid in self.tasks:
            self.counters["duplicates"] += 1
            return None
        if master not in self.masters:
            self.master_seen(master, now)
        queue = self.queues.get(service)
        if queue is None:
            if len(self.queues) >= self.max_services:  # service names are free text: bound them too
                self.refused = (f"the broker already queues tasks for {self.max_services} services "
                                f"(broker.max_services); {service!r} is not one of them")
                self.counters["rejected"] += 1
                return P.QUEUE_FULL
            queue = self.queues[service] = ServiceQueue()
        if len(queue) >= self.max_queued:
            self.refused = f"service {service!r} has {self.max_queued} tasks queued (broker.max_queued)"
            self.counters["rejected"] += 1
            return P.QUEUE_FULL
        nbytes = payload_bytes(payload)
        account = account or master
        why = self.budget.refusal(account, service, nbytes)
        if why is not None:
            self.refused = why
            self.counters["rejected"] += 1
            return P.QUEUE_FULL
        deadline = now + timeout_ms / 1000.0 if timeout_ms else None
        task = Task(tid, service, master, payload, max_attempts or self.max_attempts, timeout_ms, deadline,
                    flags=flags, stages=stages, master_tid=master_tid, account=account, born=now)
        self.budget.add(task, nbytes)
        self.tasks[tid] = task
        if flags & P.FLAG_STREAM:
            self.streams[tid] = task
        queue.push(task)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, tid))
        self._dirty.add(service)
        self.counters["submitted"] += 1
        tally = self.tallies.get(service) or self.tallies.of(service)
        tally.submitted += 1
        tally.bytes_from_masters += nbytes
        return None

    def reject(self) -> None:
        """A SUBMIT refused before it reached :meth:`submit` (BAD_REQUEST): counted as rejected."""
        self.counters["rejected"] += 1

    def cancel(self, master: bytes, tid: bytes) -> bool:
        """Cancel a task that is still queued, or a stream under way (its lane stops the generator);
        other in-flight tasks run to completion. ``tid`` is the master's id."""
        task = self.tasks.get(task_key(master, tid))
        if task is None or task.master != master:
            return False
        if task.state == QUEUED:
            self._drop_queued(task)
        elif task.flags & P.FLAG_STREAM:
            self._stop_stream(task)
        else:
            return False
        self.counters["cancelled"] += 1
        return True

    # ---- streams: parts forwarded as they come, acknowledged by the master ------------------------
    def part(self, lid: bytes, tid: bytes, seq: int) -> Task | None:
        """A lane sent part ``seq`` of a stream: the task to forward it for, or None (not the holder,
        not a stream, or not the next part: every part reaches the master once, in order)."""
        task = self._holder(lid, tid)
        if task is None or not task.flags & P.FLAG_STREAM or seq != task.parts:
            self.counters["dropped"] += 1
            return None
        task.parts += 1
        self.counters["parts"] += 1
        return task

    def ack(self, master: bytes, tid: bytes) -> Task | None:
        """The master consumed parts of its stream ``tid`` (its own id): the task, whose lane
        (``worker``) to tell W_ACK, or None."""
        task = self.tasks.get(task_key(master, tid))
        if task is None or task.master != master or task.state != INFLIGHT or task.worker not in self.lanes:
            return None
        return task

    def _stop_stream(self, task: Task) -> None:
        self._settle_running(task, self.stops)

    def _settle_running(self, task: Task, tell: list[tuple[LaneRecord, bytes]]) -> None:
        """Settle an in-flight task at the broker: free its lane's credit, and note in ``tell`` (W_CANCEL
        to the lane, or to the lane and its daemon) that the lane should stop it."""
        rec = self.lanes.get(task.worker or b"")
        if rec is not None and task.tid in rec.inflight:
            rec.inflight.discard(task.tid)
            self._offer(rec)
            tell.append((rec, task.tid))
        self._finish(task)

    def _drop_queued(self, task: Task) -> None:
        self.queues[task.service].discard()
        self._finish(task)

    # ---- workers: daemons (hosts) and their lanes ---------------------------------------------------
    def worker_ready(
        self, hid: bytes, services: Iterable[str], slots: int, now: float, info: dict[str, Any] | None = None,
        lanes: int = 1, name: str | None = None,
    ) -> HostRecord:
        """Register a worker daemon whose ``lanes`` will each get ``slots`` credit once they join.

        A second READY on the same connection, or one under the same name (the daemon registering
        again on a new socket), replaces the old registration and hands its tasks back."""
        name = name or hid.hex()
        if hid in self.hosts:
            self.worker_gone(hid, now, penalize=False)
        old = self.by_name.get(name)
        if old is not None:
            self.worker_gone(old.hid, now, penalize=False)
        rec = HostRecord(hid, name, tuple(services), lanes, slots, os.urandom(P.KEY_BYTES), now + self.expiry,
                         info or {})
        self.hosts[hid] = rec
        self.by_key[rec.key] = rec
        self.by_name[name] = rec
        return rec

    def lane_ready(self, lid: bytes, key: bytes, index: int, now: float, pid: int = 0,
                   broken: dict[str, dict[str, Any]] | None = None) -> LaneRecord | None:
        """A lane joins the worker whose key it presents; None if no live worker has that key or the
        index is out of its range. A lane joining where one is registered replaces it (hand-back).
        ``broken``: services whose constructor failed in that lane; it is offered none of their tasks,
        and what waits for a service no live lane can serve fails with UNAVAILABLE."""
        host = self.by_key.get(key)
        if host is None or not 0 <= index < host.nlanes:
            return None
        old = host.lanes.get(index)
        if old is not None:
            self.lane_gone(old.wid, now, penalize=False)
        if lid in self.lanes:  # the connection was another lane before: that one is gone
            self.lane_gone(lid, now, penalize=False)
        rec = LaneRecord(lid, host, index, pid, host.credit,
                         broken={k: v for k, v in (broken or {}).items() if k in host.services})
        host.lanes[index] = rec
        self.lanes[lid] = rec
        for service in rec.services:
            self.by_service.setdefault(service, []).append(rec)
        for service in rec.broken:
            self.broken_by.setdefault(service, []).append(rec)
        self._offer(rec)
        return rec

    def _unservable(self, service: str) -> dict[str, Any]:
        """The UNAVAILABLE details of a service some lane could not construct."""
        witnesses = self.broken_by[service]
        lane = witnesses[0]
        why = lane.broken[service]
        error = f"{why.get('type', '?')}: {why.get('message', '')}"
        return {"type": why.get("type", ""), "traceback": why.get("traceback", ""),
                "lanes": [w.address for w in witnesses[:8]],
                "message": f"service {service!r} has no live worker that can serve it: its constructor "
                           f"failed in lane {lane.address} (pid {lane.pid}): {error}"}

    def worker_seen(self, hid: bytes, now: float, stats: bytes | None = None) -> bool:
        """A message from a daemon's connection: it is alive (and so are its lanes)."""
        rec = self.hosts.get(hid)
        if rec is None:
            return False
        rec.expires = now + self.expiry
        for lane in rec.lanes.values():
            self.lane_seen(lane.wid)
        if stats is not None:
            rec.stats = stats
        return True

    def lane_seen(self, lid: bytes) -> bool:
        rec = self.lanes.get(lid)
        if rec is None:
            return False
        if rec.stalled:
            rec.stalled = False
            self._offer(rec)
        return True

    def worker_drain(self, hid: bytes) -> None:
        rec = self.hosts.get(hid)
        if rec is not None:
            rec.draining = True  # every lane's credit is now 0: their heap entries are dropped when popped

    def worker_gone(self, hid: bytes, now: float, penalize: bool = True) -> list[Task]:
        """Remove a worker daemon and all its lanes; requeue their in-flight tasks at the head of
        their queues. ``penalize`` is False for a graceful DISCONNECT: handed-back tasks keep their
        attempt count. Returns the tasks requeued."""
        rec = self.hosts.pop(hid, None)
        if rec is None:
            return []
        self.by_key.pop(rec.key, None)
        if self.by_name.get(rec.name) is rec:
            del self.by_name[rec.name]
        requeued: list[Task] = []
        for lane in list(rec.lanes.values()):
            requeued += self.lane_gone(lane.wid, now, penalize)
        return requeued

    def lane_ended(self, hid: bytes, index: int, pid: int, now: float) -> list[Task] | None:
        """The daemon says its lane ``index`` (process ``pid``) ended: hand back what it held. None if
        that lane is not registered (already replaced, or never joined)."""
        host = self.hosts.get(hid)
        lane = host.lanes.get(index) if host is not None else None
        if lane is None or lane.pid != pid:
            return None
        return self.lane_gone(lane.wid, now, penalize=False)

    def lane_gone(self, lid: bytes, now: float, penalize: bool = True) -> list[Task]:
        """Remove one lane; requeue its in-flight tasks (``penalize`` as in :meth:`worker_gone`)."""
        rec = self.lanes.pop(lid, None)
        if rec is None:
            return []
        if rec.host.lanes.get(rec.index) is rec:
            del rec.host.lanes[rec.index]
        for service in rec.services:
            peers = self.by_service.get(service, [])
            if rec in peers:
                peers.remove(rec)
        for service in rec.broken:
            witnesses = self.broken_by.get(service, [])
            if rec in witnesses:
                witnesses.remove(rec)
        requeued = []
        for tid in rec.inflight:
            task = self.tasks.get(tid)
            if task is not None and task.worker == lid and task.state == INFLIGHT:
                if self._requeue(task, penalize, "worker lost while running the task"):
                    requeued.append(task)
        rec.inflight.clear()
        return requeued

    def _requeue(self, task: Task, penalize: bool, why: str) -> bool:
        if task.master not in self.masters:  # nobody waits; a master that comes back resends
            self._finish(task)
            return False
        if task.parts:  # a rerun would deliver its first parts again: the stream fails, saying how far it got
            self._finish(task)
            details = {"message": f"{why} after {task.parts} parts of the stream were delivered; it is not "
                                  "run again (its first parts would come twice)", "parts": task.parts}
            self.failures.append(Failure(task, P.STREAM_BROKEN, details))
            self._failed(task, P.STREAM_BROKEN)
            return False
        if not penalize:
            task.attempt -= 1
        elif task.attempt >= task.max_attempts:
            self._finish(task)
            details = {"message": f"{why}, {task.attempt} of {task.max_attempts} attempts", "attempts": task.attempt}
            self.failures.append(Failure(task, P.MAX_ATTEMPTS, details))
            self._failed(task, P.MAX_ATTEMPTS)
            return False
        task.state = QUEUED
        task.worker = None
        self.queues[task.service].push(task, front=True)
        self._dirty.add(task.service)
        self.counters["requeued"] += 1
        self.tallies.of(task.service).requeued += 1
        return True

    def _failed(self, task: Task, code: str) -> None:
        """Count a task that ends with an error sent to its master (TIMEOUT also as timed out)."""
        self.counters["failed"] += 1
        tally = self.tallies.of(task.service)
        tally.fail(code)
        if code == P.TIMEOUT:
            tally.timed_out += 1

    def _finish(self, task: Task) -> None:
        if task.flags & P.FLAG_STREAM:
            self.streams.pop(task.tid, None)
        task.state = DONE
        task.payload = []  # a dead entry may linger in a lane: do not let it hold the payload
        self.budget.remove(task)
        self.tasks.pop(task.tid, None)

    # ---- results --------------------------------------------------------------------------------
    def _holder(self, sender: bytes, tid: bytes) -> Task | None:
        """The task if ``sender`` may answer it: the lane it is in flight at, or that lane's daemon
        (which reports what its lane could not say: a crash, a timeout). Anyone else's answer is
        dropped: a lane presumed dead, a stranger, a task waiting in its queue."""
        task = self.tasks.get(tid)
        if task is None or task.state != INFLIGHT or task.worker is None:
            return None
        lane = self.lanes.get(task.worker)
        if lane is None or (sender != lane.wid and sender != lane.host.hid):
            return None
        return task

    def _release(self, task: Task) -> None:
        """Free the slot the task held at its lane."""
        lane = self.lanes.get(task.worker or b"")
        if lane is not None and task.tid in lane.inflight:
            lane.inflight.discard(task.tid)
            self._offer(lane)

    def complete(self, lid: bytes, tid: bytes, result: list[Any] | None = None, now: float | None = None
                 ) -> Task | None:
        """A lane answered; return the task to deliver, or None if the answer is not the holder's
        (late, from a lane presumed dead, or unknown: the task is then still owed by its holder) or
        it was a pipeline stage before the last (``result`` becomes the next stage's input). ``now``
        times the task (submit to result) for the latency histogram."""
        task = self._holder(lid, tid)
        if task is None:
            self.counters["dropped"] += 1
            return None
        self._release(task)
        tally = self.tallies.get(task.service) or self.tallies.of(task.service)
        nbytes = sum(map(len, result)) if result else 0
        tally.bytes_from_workers += nbytes
        if task.stage + 1 < len(task.stages):
            if task.master in self.masters:  # nobody waits for a pipeline whose master left: it ends here
                self._next_stage(task, result or [])
            else:
                self._finish(task)
            return None
        self._finish(task)
        self.counters["completed"] += 1
        tally.completed += 1
        tally.bytes_to_masters += nbytes
        if now is not None:
            tally.observe(now - task.born)
        return task

    def _next_stage(self, task: Task, result: list[Any]) -> None:
        """The stage's result frames, untouched, are the next stage's input: queued at the head of its
        service's queue (a pipeline under way finishes before new ones start), attempts counted anew."""
        self.budget.remove(task)
        task.stage += 1
        task.service = task.stages[task.stage]
        task.payload, task.flags = result, P.FLAG_CHAINED
        self.budget.add(task, payload_bytes(result))  # counted, never refused: the pipeline is under way
        task.attempt, task.state, task.worker = 0, QUEUED, None
        self.counters["staged"] += 1
        queue = self.queues.get(task.service)
        if queue is None:
            queue = self.queues[task.service] = ServiceQueue()
        queue.push(task, front=True)
        self._dirty.add(task.service)

    def fail(self, sender: bytes, tid: bytes, code: str, now: float, why: str = "",
             pid: int | None = None) -> Task | None:
        """A lane or its daemon reported an error. CRASHED is retried (attempt check); others go to the
        master. ``why`` (the report's message) ends up in the MAX_ATTEMPTS error of a task that
        crashed too often. A daemon's report naming a lane process (``pid``) counts only if that
        process holds the task: a pipeline's next stage may run at a sibling lane under the same id.
        Returns the task whose error must be forwarded, or None."""
        task = self._holder(sender, tid)
        lane = self.lanes.get(task.worker or b"") if task is not None else None
        if task is not None and pid is not None and lane is not None and sender != lane.wid and pid != lane.pid:
            task = None
        if task is None:
            self.counters["dropped"] += 1
            return None
        self._release(task)
        if code == P.CRASHED:
            self._requeue(task, True, why or "compute process died while running the task")
            return None
        self._finish(task)
        self._failed(task, code)
        return task

    # ---- array refs: bytes fetched from a task's master ---------------------------------------------
    def fetch(self, sender: bytes, tid: bytes, digest: bytes, now: float) -> tuple[bytes, bytes] | str:
        """A worker needs the bytes of an array ref in task ``tid``'s arguments: (master, request) to
        forward FETCH to, or why not. Only the task's holder may ask (its lane or that lane's daemon),
        and only the task's own master is asked: a worker cannot read another master's arrays."""
        task = self._holder(sender, tid)
        if task is None:
            return "the task is not in flight at this worker"
        if task.master not in self.masters:
            return "the task's master is gone"
        while self.fetches and next(iter(self.fetches.values()))[2] <= now:  # no DATA came: forget
            self.fetches.popitem(last=False)
        if len(self.fetches) >= P.FETCH_MAX:
            return f"{P.FETCH_MAX} fetches already wait at the broker"
        request = next(self._fetch_ids).to_bytes(8, "big")
        self.fetches[request] = (sender, digest, now + P.FETCH_TIMEOUT, task.master)
        return task.master, request

    def fetched(self, request: bytes, digest: bytes, nbytes: int, master: bytes | None = None) -> bytes | None:
        """A master's DATA: the worker connection to forward it to, or None (unknown, expired, another
        digest, or from a master that was not asked)."""
        entry = self.fetches.get(request)
        if entry is None or entry[1] != digest or (master is not None and entry[3] != master):
            return None
        del self.fetches[request]
        self.counters["fetched_bytes"] += nbytes
        return entry[0]

    # ---- dispatch -------------------------------------------------------------------------------
    def dispatch(self, now: float) -> Iterator[tuple[Task, LaneRecord]]:
        """Yield (task, worker) pairs to send: least-loaded worker with credit, ties LRU; O(log n) each."""
        while self._dirty:
            service = max(self._dirty, key=self._urgency)
            self._dirty.discard(service)
            queue = self.queues.get(service)
            heap = self._free.get(service)
            if not queue or not heap:
                continue
            tally = self.tallies.of(service)
            while len(queue):
                best = self._pop_free(heap)
                if best is None:
                    break
                task = queue.pop()
                if task is None:
                    self._index(best)  # not used after all: index it again
                    break
                task.state = INFLIGHT
                task.worker = best.wid
                task.attempt += 1
                tally.bytes_to_workers += task.nbytes
                best.inflight.add(task.tid)
                best.last_dispatch = now
                self._served[service] = next(self._seq)
                self._index(best)  # less credit: other services need no new pass, so not _offer
                yield task, best

    def _urgency(self, service: str) -> tuple[int, int]:
        """Which waiting service a free lane serves first: a pipeline's later stage before an earlier
        one or a fresh task (else the intermediate results pile up in the broker and a pipeline's
        latency becomes the time to drain every queue before it), then the service served longest ago
        (one service's deep queue must not starve another's on shared lanes)."""
        queue = self.queues.get(service)
        return (queue.head_stage() if queue else 0), -self._served.get(service, 0)

    def _pop_free(self, heap: list[tuple[float, float, int, int, LaneRecord]]) -> LaneRecord | None:
        """The least-loaded worker with credit, taken off the heap (stale entries are dropped)."""
        while heap:
            _load, _last, _seq, version, rec = heapq.heappop(heap)
            if version == rec.version and rec.free > 0 and self.lanes.get(rec.wid) is rec:
                return rec
        return None

    def _offer(self, rec: LaneRecord) -> None:
        """The worker's credit may have grown: index it afresh and give its services a dispatch pass."""
        self._index(rec)
        self._dirty.update(rec.services)

    def _index(self, rec: LaneRecord) -> None:
        rec.version += 1
        if rec.free <= 0:
            return
        entry = (len(rec.inflight) / rec.slots, rec.last_dispatch, next(self._seq), rec.version, rec)
        for service in rec.services:
            heap = self._free.setdefault(service, [])
            heapq.heappush(heap, entry)
            if len(heap) > 2 * len(self.by_service.get(service, ())) + 16:
                self._rebuild(service)

    def _rebuild(self, service: str) -> None:
        """Drop the stale entries of one service's heap (each worker has at most one live entry)."""
        heap = [(len(r.inflight) / r.slots, r.last_dispatch, next(self._seq), r.version, r)
                for r in self.by_service.get(service, ()) if r.free > 0]
        heapq.heapify(heap)
        self._free[service] = heap

    # ---- time -----------------------------------------------------------------------------------
    def stall(self, task: Task) -> None:
        """The TASK could not be sent because the worker's link is full: hand back that one task
        (no attempt counted) and send that worker nothing more until it speaks again."""
        rec = self.lanes.get(task.worker or b"")
        if rec is not None:
            rec.inflight.discard(task.tid)
            rec.stalled = True
        task.attempt -= 1
        task.state = QUEUED
        task.worker = None
        self.queues[task.service].push(task, front=True)
        self._dirty.add(task.service)

    # ---- time -----------------------------------------------------------------------------------
    def expire(self, now: float) -> tuple[list[bytes], list[bytes]]:
        """Housekeeping: returns (dead worker daemons, expired masters).

        The tasks of dead daemons' lanes are requeued; timed-out tasks go to ``failures`` with TIMEOUT (and to
        ``cancels`` when a worker still runs them); expired masters lose their queued tasks.
        """
        dead = [w.hid for w in self.hosts.values() if w.expires <= now]
        for wid in dead:
            self.worker_gone(wid, now)
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, tid = heapq.heappop(self._deadlines)
            task = self.tasks.get(tid)
            if task is not None and task.deadline == deadline:
                self._time_out(task)
        if len(self._deadlines) > 2 * len(self.tasks) + 1024:  # entries of tasks long finished
            self._deadlines = [(t.deadline, t.tid) for t in self.tasks.values() if t.deadline is not None]
            heapq.heapify(self._deadlines)
        gone = [m for m, (expires, _, _) in self.masters.items() if expires <= now]
        for master in gone:
            self.master_gone(master)
        self._expire_unroutable(now)
        return dead, gone

    def _expire_unroutable(self, now: float) -> None:
        """Tasks wait for a service no live lane serves at most ``unroutable_timeout`` seconds (a worker
        may be starting), or liveness × interval when a lane reported its constructor failed (lanes
        join one by one after a restart: a healthy one may still come), then fail with UNAVAILABLE
        naming the service and why: never a silent wait."""
        waiting: dict[str, float] = {}
        for service, queue in self.queues.items():
            if not len(queue) or self.by_service.get(service):
                continue
            since = waiting[service] = self._unroutable.get(service, now)
            broken = bool(self.broken_by.get(service))
            limit = min(self.unroutable_timeout, self.expiry) if broken else self.unroutable_timeout
            if since == now and not broken:
                log.warning("tasks wait for service %r, which no live worker serves; they fail in %g s "
                            "(broker.unroutable_timeout) unless one comes", service, limit)
            elif now - since >= limit:
                del waiting[service]
                why = self._unservable(service) if broken else self._unrouted(service, since, now)
                self._fail_queue(queue, why)
        self._unroutable = waiting

    def _unrouted(self, service: str, since: float, now: float) -> dict[str, Any]:
        served = sorted(name for name, lanes in self.by_service.items() if lanes)
        return {"message": f"no live worker serves {service!r} (waited {now - since:.0f} s, "
                           f"broker.unroutable_timeout); served now: {', '.join(served) or 'none'}",
                "served": served}

    def _fail_queue(self, queue: ServiceQueue, details: dict[str, Any]) -> None:
        while (task := queue.pop()) is not None:
            self._finish(task)
            self.failures.append(Failure(task, P.UNAVAILABLE, details))
            self._failed(task, P.UNAVAILABLE)

    def _time_out(self, task: Task) -> None:
        if task.state == QUEUED:
            self._drop_queued(task)
        else:
            self._settle_running(task, self.cancels)
        details = {"message": f"no result within {task.timeout_ms} ms (attempt {task.attempt})"}
        self.failures.append(Failure(task, P.TIMEOUT, details))
        self._failed(task, P.TIMEOUT)

    def prune(self) -> None:
        """Forget services with nothing queued and no workers (names come and go with jobs)."""
        for name in [n for n, q in self.queues.items() if not q.size and not self.by_service.get(n)]:
            del self.queues[name]  # size counts live tasks only: what remains in its lanes is dead
        for name in [n for n, peers in self.by_service.items() if not peers and n not in self.queues]:
            del self.by_service[name]
            self._free.pop(name, None)
            self._served.pop(name, None)
        for name in [n for n, witnesses in self.broken_by.items() if not witnesses]:
            del self.broken_by[name]

    @property
    def has_work(self) -> bool:
        """Anything for the loop to send: a service that may dispatch, failures, cancels or stops."""
        return bool(self._dirty or self.failures or self.cancels or self.stops)

    def take_failures(self) -> list[Failure]:
        out, self.failures = self.failures, []
        return out

    def take_cancels(self) -> list[tuple[LaneRecord, bytes]]:
        out, self.cancels = self.cancels, []
        return out

    def take_stops(self) -> list[tuple[LaneRecord, bytes]]:
        out, self.stops = self.stops, []
        return out

    def snapshot(self, now: float) -> dict[str, Any]:
        """A plain-data view for STATUS replies and logs."""
        inflight: dict[str, int] = {}
        for rec in self.lanes.values():  # O(tasks in flight), not O(tasks held): a STATUS stays cheap
            for tid in rec.inflight:
                task = self.tasks.get(tid)
                if task is not None:
                    inflight[task.service] = inflight.get(task.service, 0) + 1
        services: dict[str, dict[str, int]] = {}
        for name in set(self.queues) | set(self.by_service) | set(self.broken_by):
            peers = self.by_service.get(name, [])
            services[name] = {
                "queued": len(self.queues.get(name) or ()),
                "inflight": inflight.get(name, 0),
                "workers": len({id(lane.host) for lane in peers}),
                "lanes": len(peers),
                "slots": sum(lane.slots for lane in peers),
                "broken": len(self.broken_by.get(name, ())),
            }
        workers = [
            {
                "id": w.name,
                "conn": w.hid.hex(),
                "services": list(w.services),
                "slots": sum(lane.slots for lane in w.lanes.values()),
                "inflight": sum(len(lane.inflight) for lane in w.lanes.values()),
                "draining": w.draining,
                "expires_in": round(w.expires - now, 3),
                "lanes": [{"lane": i, "address": lane.address, "pid": lane.pid, "slots": lane.slots,
                           "inflight": len(lane.inflight), "broken": sorted(lane.broken)}
                          for i, lane in sorted(w.lanes.items())],
                "info": w.info,
                "stats": w.stats,
            }
            for w in self.hosts.values()
        ]
        return {
            "broker_id": self.broker_id.hex(),
            "heartbeat_interval": self.heartbeat_interval,
            "liveness": self.liveness,
            "masters": len(self.masters),
            "tasks": len(self.tasks),
            "services": services,
            "workers": workers,
            "counters": dict(self.counters),
        }
