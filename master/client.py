"""The user-facing client: ``Master`` submits tasks and returns ``concurrent.futures.Future``s.

One background I/O thread owns the DEALER socket (ZeroMQ sockets are not thread-safe); user
threads encode their arguments (so encoding errors raise at ``submit``) and hand the frames over
as commands through a :class:`~ndpipe.master.ioloop.Channel`; the socket-free
:class:`~ndpipe.master.state.MasterState` decides what each command, answer and tick means. It
keeps every outstanding task until it resolves:

* **window** — at most ``window`` tasks outstanding; ``submit`` blocks beyond that.
* **exactly once** — a task resolves the first time an answer arrives; later answers for the
  same id (a task that ran twice after a requeue or a resend) are dropped.
* **broker liveness** — PING every interval; PONG carries a session token that changes when the
  broker restarted or forgot us, and then every outstanding task is resent under its own id (the
  broker drops duplicates it still holds). Silence for ``liveness`` intervals: a new socket, and
  resend; silence for ``broker_timeout``: every outstanding task fails with BrokerUnreachable.
* **timeouts** — per task, enforced here (TaskTimeout) and sent to the broker so it can drop a
  task still queued; ``Future.cancel()`` on a queued task cancels it at the broker too.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from ndpipe import protocol as P
from ndpipe.codec import Limits, encode_call
from ndpipe.config import MAX_TIMEOUT, MasterConfig, SecurityConfig
from ndpipe.errors import (
    BrokerUnreachable,
    EncodeError,
    NdpipeError,
)
from ndpipe.master.ioloop import (
    Ack,
    Cancel,
    Channel,
    Close,
    Command,
    IOLoop,
    IterStart,
    IterStop,
    Put,
    Release,
    Status,
    StatusWithdrawn,
    Submit,
)
from ndpipe.master.iterate import Iteration, make_run
from ndpipe.master.mapping import Mapper
from ndpipe.master.state import Pending
from ndpipe.master.stream import Stream
from ndpipe.refs import Ref, make_ref
from ndpipe.security import client_curve
from ndpipe.transport import unresolved

log = logging.getLogger("ndpipe.master")


class LoopFuture(Future[Any]):
    """A Future whose waiter runs the master's loop itself while the loop is free, so a lone call's
    answer is read by the thread that waits for it (no hand-off from the I/O thread)."""

    def __init__(self, drive: Callable[[Future[Any], float | None], bool]) -> None:
        super().__init__()
        self._drive = drive
        self.stream: Stream | None = None  # the parts of a streamed result (Master.stream)

    def _wait(self, timeout: float | None) -> float | None:
        if self.done():
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._drive(self, deadline) and deadline is not None:
            return max(0.0, deadline - time.monotonic())
        return timeout

    def result(self, timeout: float | None = None) -> Any:
        return super().result(self._wait(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._wait(timeout))


class Master:
    """Connect to a broker's frontend and submit tasks to its services.

    >>> with Master("tcp://127.0.0.1:5555") as m:                 # doctest: +SKIP
    ...     y = m.submit("matmul", a, b).result()
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        config: MasterConfig | None = None,
        window: int | None = None,
        timeout: float | None = None,
        security: SecurityConfig | None = None,
    ) -> None:
        cfg = config or MasterConfig()
        self.cfg = cfg
        # CurveZMQ (the YAML's ``security`` section): keys are read here, so a missing or wrong one is a
        # ConfigError in the caller's thread, before any connection is tried.
        self._curve = client_curve(security or SecurityConfig())
        self.endpoint = broker or cfg.broker
        self.timeout = timeout if timeout is not None else cfg.timeout
        self.window = window or cfg.window
        self._slots = threading.BoundedSemaphore(self.window)
        # Task ids: 8 random octets per master, then a counter. As unique as uuid4 across masters, and
        # no getrandom() syscall per task (~25 µs each on a VM: a tenth of a submit's cost).
        self._tid_prefix = os.urandom(8)
        self._tid_counter = itertools.count()
        self._mapper = Mapper(self)  # map()'s batching
        self._ident = b"M" + os.urandom(15)
        self._channel = Channel()
        self._closed = False
        self._lock = threading.RLock()  # orders close() against submit/cancel/status posts
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._io_main, name="ndpipe-master-io", daemon=True)
        self._error: BaseException | None = None
        self._loop: IOLoop | None = None
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._channel.close()
            raise NdpipeError(f"master cannot start: {self._error}") from self._error

    # ---- user API -------------------------------------------------------------------------------
    def submit(self, service: str, /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``service(*args, **kwargs)`` on a worker; returns a Future of its result."""
        return self.call(service, args, kwargs)

    def call(
        self,
        service: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
    ) -> Future[Any]:
        """Like :meth:`submit`, with per-task ``timeout`` (seconds) and ``max_attempts``.

        Future callbacks run in whichever thread runs the master's loop (its I/O thread, or a thread
        waiting in ``result()``): one may submit more work, but gets NdpipeError instead of waiting
        when the window is full, or for another result (waiting there would deadlock the loop).
        """
        timeout = self.timeout if timeout is None else timeout
        attempts = self.cfg.max_attempts if max_attempts is None else max_attempts
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout!r}")
        if not 0 <= attempts <= 0xFFFF:
            raise ValueError(f"max_attempts must be in [0, 65535] (0 = broker default), got {attempts!r}")
        self._check_open()
        return self._enqueue(service, encode_call(list(args), kwargs or {}), timeout, attempts)

    def _enqueue(self, service: str | bytes, payload: list[Any], timeout: float | None, attempts: int,
                 flags: int = 0, batch: int = 0, stages: tuple[str, ...] = ()) -> LoopFuture:
        """Check the frames, take a window slot, hand the task to the I/O thread."""
        self._check_frames(payload)
        options = P.OPTIONS.pack(int(timeout * 1000) if timeout else 0, attempts, flags)
        if not self._slots.acquire(blocking=not self._in_loop()):
            raise NdpipeError(f"window of {self.window} tasks is full inside a Future callback (the master's "
                              "I/O thread cannot wait for itself); submit from another thread")
        future = LoopFuture(self._drive)
        deadline = time.monotonic() + timeout if timeout else None
        tid = self._tid_prefix + next(self._tid_counter).to_bytes(8, "big")
        frame = service.encode() if isinstance(service, str) else service
        if flags & P.FLAG_STREAM:
            future.stream = Stream(future, lambda seq: self._ack(tid, seq))
        sink = weakref.ref(future.stream) if future.stream is not None else None  # dropped: the stream stops
        pending = Pending(tid, frame, options, payload, future, deadline, batch, stages, sink)
        with self._lock:
            if self._closed or self._error is not None:
                self._slots.release()
                self._check_open()
            # a closure over tid, not `pending`: that would make future and pending a GC cycle
            future.add_done_callback(lambda f: self._done(f, tid))
            self._post(Submit(pending))
        return future

    def _check_open(self) -> None:
        if self._error is not None:
            raise NdpipeError(f"master is closed: {self._error}")
        if self._closed:
            raise NdpipeError("master is closed")

    def _check_frames(self, payload: list[Any]) -> None:
        """Refuse here what the broker would refuse by dropping the link (and every reply on it)."""
        if len(payload) - 1 > self.cfg.max_frames:
            raise EncodeError(f"{len(payload) - 1} large arrays need as many frames; the limit is "
                              f"max_frames = {self.cfg.max_frames} (broker.max_frames must allow it too)")
        for frame in payload:
            size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
            if size > self.cfg.max_frame_bytes:
                raise EncodeError(f"an argument of {size} bytes exceeds max_frame_bytes = {self.cfg.max_frame_bytes}"
                                  " (broker.max_frame_bytes must allow it too); split it, e.g. with scatter()")

    def map(
        self, service: str, *iterables: Iterable[Any], timeout: float | None = None, chunksize: int | None = None
    ) -> Iterator[Any]:
        """``service(*items)`` for items zipped from ``iterables``; results in input order.

        Calls travel in batches of ``chunksize`` (one message, one broker task and one compute-process
        run per batch): that is what makes tiny tasks fast. ``None`` picks a size like
        ``multiprocessing.Pool.map``: about four batches per slot of the service, at most 1,024 calls;
        1 when the number of items is unknown (a generator): pass ``chunksize`` to batch those.
        ``timeout`` is per call (a batch gets ``timeout`` × its size). A batch that times out, crashes
        its process ``max_attempts`` times or cannot send its results back is split and its calls
        resubmitted one by one, so only the culprit fails.

        Submission runs ahead of consumption by up to ``window`` calls, or (batched) by enough batches
        to keep every slot busy twice over, within 256 MiB of encoded calls. The first error raises;
        the tasks still queued are then cancelled.
        """
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        return self._mapper.run(service, iterables, timeout, chunksize)

    # ---- streams: a generator's parts as they are made ------------------------------------------------
    def stream(self, service: str, /, *args: Any, **kwargs: Any) -> Stream:
        """Run a generator handler, ``service(*args, **kwargs)``, and receive what it yields as it
        yields it: iterate the :class:`~ndpipe.master.stream.Stream` returned. Parts come in order,
        each once; at most 8 are on their way at a time (a slow consumer slows the generator).
        Leaving the loop early, ``close()`` or the end of a ``with`` block stops the generator on
        the worker. A generator that raises ends the iteration with its error (after the parts it
        made); if its lane dies after some parts, the stream fails with StreamBroken (it is not
        rerun: its first parts would come twice). ``master.timeout`` bounds the whole stream."""
        self._check_open()
        future = self._enqueue(service, encode_call(list(args), kwargs), self.timeout, self.cfg.max_attempts,
                               P.FLAG_STREAM)
        stream, future.stream = future.stream, None  # the caller's alone: dropping it closes the stream
        assert stream is not None
        return stream

    # ---- iterations: resident partitions exchanging messages round by round --------------------------
    def iterate(self, service: str, states: Sequence[dict[str, Any]], *, max_rounds: int = 100, tol: float = 0.0,
                reduce: str = "max", checkpoint: int = 10, round_timeout: float | None = None,
                max_recoveries: int = 10, combine: str | None = None) -> Iteration:
        """Run ``service`` — ``step(state, inbox, round) -> (state, {destination: message}, metric)`` —
        over ``states`` (one dict per partition) round by round until the metric reduced over the
        partitions (``reduce``: "max" or "sum") is <= ``tol``, or for ``max_rounds`` rounds. Each
        partition is placed once on a lane and stays there; ``inbox`` is what the others sent it the
        round before, as ``(source, message)`` sorted by source. Iterate the returned
        :class:`~ndpipe.master.iterate.Iteration` for one RoundInfo per round; ``result()`` gives the
        final states in partition order. Every ``checkpoint`` rounds the states come back here; a lost
        lane (or broker) rolls the run back to the last checkpoint and replays it, so a deterministic
        step gives the same bits as a run without faults. A round longer than ``round_timeout`` counts
        as lost; more than ``max_recoveries`` losses fail the run. A step that raises (or returns the
        wrong shape) fails it with the remote traceback, naming the partition and round. ``combine``
        ("sum", "min", "max") folds the messages a compute process's partitions send to one destination
        into one before they travel (an inbox then holds one message per sending process); min and max
        are exact, a float sum may differ in its last bits with the placement (docs/iterate.md)."""
        run = make_run(service, states, max_rounds, tol, reduce, checkpoint, round_timeout, max_recoveries,
                       Limits(max_frames=self.cfg.max_frames), combine)
        with self._lock:
            self._check_open()
            self._post(IterStart(run))
        return Iteration(run, self._iter_stop)

    def _iter_stop(self, rid: bytes) -> None:
        with self._lock:
            if not self._closed and self._error is None:
                self._post(IterStop(rid))

    def _ack(self, tid: bytes, seq: int) -> None:
        with self._lock:
            if not self._closed and self._error is None:
                self._post(Ack(tid, seq))

    # ---- pipelines: stages routed by the broker, no master round trip between them ------------------
    def pipeline(self, stages: Sequence[str], x: Any, *, timeout: float | None = None,
                 max_attempts: int | None = None) -> Future[Any]:
        """Run ``x`` through ``stages`` (2..16 service names): ``stages[0](x)``, then each stage's result
        is the next one's only argument, forwarded by the broker untouched, never back here between
        stages. Returns a Future of the last stage's result. Each stage is retried on its own (a lane
        lost in stage 3 reruns stage 3 only, up to ``max_attempts``) and keeps its service's
        timeout; ``timeout`` bounds the whole pipeline. An error names the stage that failed."""
        names = self._check_stages(stages)
        timeout = self.timeout if timeout is None else timeout
        attempts = self.cfg.max_attempts if max_attempts is None else max_attempts
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout!r}")
        self._check_open()
        return self._enqueue(P.pack_stages(names), encode_call([x], {}), timeout, attempts, P.FLAG_PIPELINE,
                             stages=names)

    def pipeline_map(self, stages: Sequence[str], items: Iterable[Any], *,
                     timeout: float | None = None) -> Iterator[Any]:
        """:meth:`pipeline` for each item, streamed: up to ``window`` pipelines in flight, so the stages
        work on different items at once; results in input order, like :meth:`map`. The first error
        raises and the pipelines not yet answered are cancelled."""
        names = self._check_stages(stages)
        return self._mapper.in_order(lambda x: self.pipeline(names, x, timeout=timeout), items)

    @staticmethod
    def _check_stages(stages: Sequence[str]) -> tuple[str, ...]:
        names = (stages,) if isinstance(stages, str) else tuple(stages)
        if not 2 <= len(names) <= P.MAX_STAGES:
            raise ValueError(f"a pipeline has 2..{P.MAX_STAGES} stages, got {len(names)} (one stage: use call)")
        for name in names:
            if not isinstance(name, str) or not 0 < len(name.encode()) <= P.MAX_SERVICE:
                raise ValueError(f"a stage is a service name of 1..{P.MAX_SERVICE} octets, got {name!r:.80}")
        return names

    def scatter(
        self,
        service: str,
        array: np.ndarray,
        shards: int,
        axis: int = 0,
        *,
        timeout: float | None = None,
        progress: Callable[[int], Any] | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Split ``array`` into ``shards`` along ``axis``, run ``service(shard, **kwargs)`` on each,
        and concatenate the results along ``axis`` (``progress(1)`` is called per finished shard)."""
        array = np.asarray(array)
        if shards < 1:
            raise ValueError("shards must be >= 1")
        if array.ndim == 0 or not -array.ndim <= axis < array.ndim:
            raise ValueError(f"cannot split an array of shape {array.shape} along axis {axis}")
        pieces = np.array_split(array, min(shards, max(1, array.shape[axis])), axis=axis)
        futures = [self.call(service, (piece,), kwargs, timeout=timeout) for piece in pieces]
        if progress is not None:  # finished shards only: a bar must not fill when shards fail or are cancelled
            for future in futures:
                future.add_done_callback(lambda f: None if f.cancelled() or f.exception() is not None else progress(1))
        try:
            return np.concatenate([f.result() for f in futures], axis=axis)
        finally:
            for future in futures:
                future.cancel()

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The broker's view: services, queues, workers with their load, counters."""
        if self._in_loop():
            raise NdpipeError("status() cannot wait inside a Future callback (it runs the master's loop)")
        future: Future[dict[str, Any]] = LoopFuture(self._drive)
        request = os.urandom(8)
        with self._lock:
            self._check_open()
            self._post(Status(request, future))
        try:
            return future.result(timeout)
        except FutureTimeout as exc:  # not the builtin TimeoutError before Python 3.11
            with self._lock:
                if not self._closed and self._error is None:
                    self._post(StatusWithdrawn(request))
            why = unresolved(self.endpoint)
            raise BrokerUnreachable(f"no status from {self.endpoint} within {timeout} s"
                                    + (f": {why}" if why else "")) from exc

    def put(self, array: Any) -> Ref:
        """Send an array once: a small content-addressed :class:`~ndpipe.refs.Ref` to pass in any
        task's arguments (also nested) instead of the array. Each worker host fetches the bytes from
        this master once, keeps them in shared memory for all its lanes (``worker.cache_bytes``), and
        the handler receives the array itself, read-only. The master keeps a copy until
        :meth:`release` or :meth:`close`; the same content always gives the same ref."""
        ref, kept = make_ref(array)
        if kept.nbytes > self.cfg.max_frame_bytes:
            raise EncodeError(f"an array of {kept.nbytes} bytes exceeds max_frame_bytes = {self.cfg.max_frame_bytes} "
                              "(its bytes travel as one frame; the broker's and the workers' limits must allow it)")
        with self._lock:
            self._check_open()
            self._post(Put(ref.digest, ref.meta(), kept))
        return ref

    def release(self, ref: Ref) -> None:
        """Stop serving ``ref`` (hosts that cached it keep their copy until it is evicted); a task
        that needs it where it is not cached then fails with BadRequest saying so."""
        if not isinstance(ref, Ref):
            raise TypeError(f"release() takes a Ref from put(), got {type(ref).__name__}")
        with self._lock:
            self._check_open()
            self._post(Release(ref.digest))

    @property
    def counters(self) -> dict[str, int]:
        """What this master saw: ``late_answers`` (answers for tasks already resolved: a task that ran
        twice after a requeue or a resend, or one answered after its timeout or cancel; each dropped,
        never delivered twice), ``resends`` (times every outstanding task was resent) and ``fetches``
        (array refs' bytes asked for by workers, :meth:`put`)."""
        loop = self._loop
        return dict(loop.state.counters) if loop is not None else {"late_answers": 0, "resends": 0, "fetches": 0}

    def close(self) -> None:
        """Say BYE, fail what is outstanding, stop the I/O thread. Idempotent and thread-safe."""
        if self._in_loop():
            raise NdpipeError("Master.close() cannot run inside a Future callback (it runs the master's loop)")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._post(Close())
        self._thread.join()
        self._channel.fail_unread(NdpipeError("master closed before the task was sent"))
        self._channel.close()

    def __enter__(self) -> Master:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- user thread -> I/O thread --------------------------------------------------------------
    def _post(self, command: Command) -> None:
        """Run a command in this thread if the loop is free, else hand it to the I/O thread (callers
        hold ``_lock`` and have checked the master is open). Close always goes to the I/O thread."""
        loop = self._loop
        if loop is None or isinstance(command, Close) or not loop.run_posted(command):
            self._channel.post(command)

    def _drive(self, future: Future[Any], deadline: float | None) -> bool:
        loop = self._loop
        return loop is not None and not self._closed and loop.drive(future, deadline)

    def _in_loop(self) -> bool:
        """This thread runs the master's loop right now (the I/O thread, or a Future callback called
        from a pass a user thread runs): it must not block on the loop."""
        loop = self._loop
        return threading.current_thread() is self._thread or (loop is not None and loop.owner == threading.get_ident())

    def _done(self, future: Future[Any], tid: bytes) -> None:
        self._slots.release()
        if future.cancelled():
            with self._lock:
                if not self._closed and self._error is None:
                    self._post(Cancel(tid))

    # ---- I/O thread -----------------------------------------------------------------------------
    def _io_main(self) -> None:
        try:
            loop = self._loop = IOLoop(self.cfg, self.endpoint, self._ident, max(P.HWM, 4 * self.window),
                                       self._channel, self._curve)
        except Exception as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            loop.run()
        except Exception as exc:  # a bug: fail loudly rather than leave futures hanging
            log.exception("master I/O thread failed")
            error = NdpipeError(f"master I/O thread failed: {exc!r}")
            with self._lock:
                self._error = exc
            loop.state.fail_all(error)
            self._channel.fail_unread(error)
        finally:
            loop.close()
