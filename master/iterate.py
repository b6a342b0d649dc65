"""Iterations at the master (``Master.iterate``, PROTOCOL.md §5.7): the decisions, without a socket.

The master drives every run: it places the partitions (from its last checkpoint), starts each round,
and when the broker reports a round finished (IT_DONE: every partition's metric) it reduces the
metric and decides — another round, or the end (converged, or ``max_rounds``), when the lanes send
the final states back. Every ``checkpoint`` rounds the lanes also send each partition's state and
inbox as they were at the start of that round; the master keeps the last complete one (a lane that
dies cannot take it along).

Rollback. A lost partition (its lane died; the broker restarted; a round outlasted
``round_timeout``; the link dropped) starts a new **epoch**: every partition is placed again from
the checkpoint and the rounds after it are replayed. A deterministic step therefore gives the same
bits as a run without faults; rounds already reported are not reported again. More than
``max_recoveries`` rollbacks fail the run (:class:`~ndpipe.errors.IterationLost`).

:class:`IterRun` takes ``now`` and returns frames, like :class:`~ndpipe.master.state.MasterState`;
:class:`Iteration` is what the user holds.
"""

from __future__ import annotations

import logging
import math
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from ndpipe import protocol as P
from ndpipe import rounds as R
from ndpipe.codec import Limits, decode, encode
from ndpipe.errors import EncodeError, IterationLost, NdpipeError, ProtocolError, iteration_error

log = logging.getLogger("ndpipe.master")
REDUCERS: dict[str, Callable[[list[float]], float]] = {"max": max, "sum": math.fsum}
TIMEOUT_GRACE = 1.0  # seconds past round_timeout before the master itself calls a round lost
_END = object()


@dataclass(frozen=True, slots=True)
class RoundInfo:
    """One finished round: its number, the metric reduced over partitions, the bytes of the messages
    the partitions sent (encoded, those that stayed on their lane included), and its wall time."""

    round: int
    metric: float
    bytes: int
    seconds: float
    recoveries: int = 0  # rollbacks so far in this run


@dataclass(slots=True)
class Checkpoint:
    """Each partition's encoded state and inbox ``[(source, frames)]`` at the start of ``round``."""

    round: int
    states: list[list[Any]]
    inboxes: list[list[tuple[int, list[Any]]]]


@dataclass(slots=True, eq=False)
class IterRun:
    """One run's decisions. The I/O thread calls it; the user's thread reads ``infos`` and ``future``."""

    rid: bytes
    service: str
    checkpoint: Checkpoint
    max_rounds: int
    tol: float
    reduce: str = "max"
    every: int = 10  # rounds between checkpoints (0: only the initial states)
    round_timeout: float | None = None
    max_recoveries: int = 10
    limits: Limits = field(default_factory=Limits)
    combine: str | None = None  # "sum", "min", "max": each lane folds its partitions' messages per destination
    future: Future[list[Any]] = field(default_factory=Future)
    infos: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    epoch: int = 0
    round: int = 0
    started: float = 0.0  # when the current round started
    gathering: bool = False
    recoveries: int = 0
    reported: int = -1  # the last round given to the user (a replay does not report it again)
    converged: bool = False
    pending: dict[int, tuple[list[Any], list[tuple[int, list[Any]]]]] = field(default_factory=dict)
    final: dict[int, Any] = field(default_factory=dict)

    @property
    def parts(self) -> int:
        return len(self.checkpoint.states)

    @property
    def deadline(self) -> float | None:
        """When the round (or the gather) under way counts as lost: ``round_timeout`` and a grace, so the
        lane's own timer on a hung step (which starts when the step does) usually says so first."""
        if self.round_timeout is None or self.future.done():
            return None
        return self.started + self.round_timeout + TIMEOUT_GRACE

    # ---- decisions --------------------------------------------------------------------------------
    def start(self, now: float) -> list[R.Frames]:
        """A new epoch: every partition placed from the checkpoint, then its round started."""
        self.epoch += 1
        self.round, self.gathering = self.checkpoint.round, False
        self.pending, self.final = {}, {}
        out = []
        for part, (state, inbox) in enumerate(zip(self.checkpoint.states, self.checkpoint.inboxes, strict=True)):
            ctl = {"service": self.service, "parts": self.parts, "part": part, "epoch": self.epoch,
                   "round": self.round, "state": len(state), "inbox": [[src, len(f)] for src, f in inbox],
                   "combine": self.combine}
            out.append(R.frames(P.MASTER, P.IT_PLACE, self.rid, ctl, state + [f for _, fs in inbox for f in fs]))
        return out + [self._round(now)]

    def _round(self, now: float) -> R.Frames:
        self.started = now
        ckpt = self.every > 0 and self.round % self.every == 0 and self.round != self.checkpoint.round
        timeout_ms = int(self.round_timeout * 1000) if self.round_timeout else 0  # the lanes enforce it too
        return R.frames(P.MASTER, P.IT_ROUND, self.rid, {"epoch": self.epoch, "round": self.round, "checkpoint": ckpt,
                                                         "timeout_ms": timeout_ms})

    def on_message(self, command: bytes, ctl: dict[str, Any], payload: list[Any], now: float) -> list[R.Frames]:
        """IT_DONE, IT_STATE, IT_FAIL of this run (another epoch's are dropped)."""
        if self.future.done() or ctl.get("epoch") != self.epoch:
            return []
        if command == P.IT_DONE:
            return self._done(ctl, now)
        if command == P.IT_STATE:
            self._state(ctl, payload)
            return []
        code = str(ctl.get("code", ""))
        if code == P.LOST:
            return self.recover(now, str(ctl.get("message", "partitions lost")))
        self.fail(iteration_error(code, self.rid.hex(), ctl))
        return []

    def _done(self, ctl: dict[str, Any], now: float) -> list[R.Frames]:
        if ctl.get("round") != self.round or self.gathering:
            return []
        parts = ctl.get("parts")
        if not isinstance(parts, dict) or sorted(parts) != list(range(self.parts)):
            raise ProtocolError(f"IT_DONE must report every partition 0..{self.parts - 1}")
        metric = self._reduce([parts[p][0] for p in range(self.parts)])
        if len(self.pending) == self.parts:  # this round's checkpoint is whole: it replaces the last one
            order = range(self.parts)
            self.checkpoint = Checkpoint(self.round, [self.pending[p][0] for p in order],
                                         [self.pending[p][1] for p in order])
        self.pending = {}
        if self.round > self.reported:
            self.reported = self.round
            self.infos.put(RoundInfo(self.round, metric, int(sum(int(m[1]) for m in parts.values())),
                                     now - self.started, self.recoveries))
        self.converged = metric <= self.tol  # never with a NaN
        if self.converged or self.round + 1 >= self.max_rounds:
            self.gathering, self.started = True, now  # the gather gets a round's time of its own
            return [R.frames(P.MASTER, P.IT_END, self.rid, {"epoch": self.epoch, "gather": True})]
        self.round += 1
        return [self._round(now)]

    def _reduce(self, metrics: list[Any]) -> float:
        """The round's metric, in partition order: NaN if any partition's is NaN (never converged), inf
        where a sum overflows."""
        try:
            values = [float(m) for m in metrics]
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"IT_DONE: a metric is not a number: {exc}") from exc
        if any(math.isnan(v) for v in values):
            return math.nan
        try:
            return float(REDUCERS[self.reduce](values))
        except (OverflowError, ValueError):  # fsum of huge values, or of inf and -inf
            return math.inf if self.reduce == "sum" and not (math.inf in values and -math.inf in values) else math.nan

    def _state(self, ctl: dict[str, Any], payload: list[Any]) -> None:
        part = R.part_of(ctl, self.parts)
        inbox_idx = R.index(ctl, "inbox", 2, self.parts)
        chunks = R.split(payload, [R.num(ctl, "state", 1, P.MAX_FRAMES + 1), *(n for _, n in inbox_idx)])
        if ctl.get("kind") == "checkpoint":
            if ctl.get("round") == self.round:
                self.pending[part] = (chunks[0], [(src, c) for (src, _), c in zip(inbox_idx, chunks[1:], strict=True)])
            return
        if not self.gathering:
            return
        try:
            self.final[part] = decode(chunks[0], self.limits)
        except NdpipeError as exc:
            self.fail(iteration_error(P.BAD_REQUEST, self.rid.hex(), {
                "message": f"partition {part}: its final state cannot be decoded: {exc}", "part": part}))
            return
        if len(self.final) == self.parts:
            resolve(self.future, value=[self.final[p] for p in range(self.parts)])
            self.infos.put(_END)

    def recover(self, now: float, why: str) -> list[R.Frames]:
        """Roll back to the checkpoint in a new epoch, or fail after ``max_recoveries``."""
        if self.future.done():
            return []
        self.recoveries += 1
        if self.recoveries > self.max_recoveries:
            self.fail(IterationLost(f"iteration {self.rid.hex()}: lost partitions {self.recoveries} times "
                                    f"(max_recoveries {self.max_recoveries}); the last time: {why}", self.rid.hex()))
            return [R.frames(P.MASTER, P.IT_END, self.rid, {"epoch": self.epoch, "gather": False})]
        log.warning("iteration %s: %s; rolling back to round %d (recovery %d of %d)", self.rid.hex()[:8], why,
                    self.checkpoint.round, self.recoveries, self.max_recoveries)
        return self.start(now)

    def tick(self, now: float) -> list[R.Frames]:
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            return self.recover(now, f"round {self.round} took longer than round_timeout = {self.round_timeout:g} s")
        return []

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            resolve(self.future, error=error)
            self.infos.put(_END)

    def cancel(self) -> list[R.Frames]:
        """The user closed it: free the partitions."""
        if self.future.cancel():
            self.infos.put(_END)
        return [R.frames(P.MASTER, P.IT_END, self.rid, {"epoch": self.epoch, "gather": False})]


COMBINE = (None, "sum", "min", "max")


def make_run(service: str, states: Sequence[Any], max_rounds: int, tol: float, reduce: str, checkpoint: int,
             round_timeout: float | None, max_recoveries: int, limits: Limits, combine: str | None = None) -> IterRun:
    """Check the arguments and encode the states (each error names what is wrong, and the partition)."""
    if not isinstance(service, str) or not 0 < len(service.encode()) <= P.MAX_SERVICE:
        raise ValueError(f"service must be a name of 1..{P.MAX_SERVICE} bytes, got {service!r:.80}")
    if not isinstance(states, Sequence) or isinstance(states, (str, bytes)):
        raise TypeError(f"states must be a list of dicts, one per partition, got {type(states).__name__}")
    if not 0 < len(states) <= P.MAX_PARTITIONS:
        raise ValueError(f"an iteration has 1..{P.MAX_PARTITIONS} partitions, got {len(states)}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds <= 0:
        raise ValueError(f"max_rounds must be a positive int, got {max_rounds!r}")
    if reduce not in REDUCERS:
        raise ValueError(f"reduce must be one of {sorted(REDUCERS)}, got {reduce!r}")
    if combine not in COMBINE:
        raise ValueError(f"combine must be None, 'sum', 'min' or 'max', got {combine!r}")
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 0:
        raise ValueError(f"checkpoint must be an int >= 0 (rounds between checkpoints; 0: none), got {checkpoint!r}")
    if round_timeout is not None and not 0 < round_timeout <= 86400:
        raise ValueError(f"round_timeout must be in (0, 86400] seconds or None, got {round_timeout!r}")
    if isinstance(max_recoveries, bool) or not isinstance(max_recoveries, int) or max_recoveries < 0:
        raise ValueError(f"max_recoveries must be an int >= 0, got {max_recoveries!r}")
    encoded = [_encoded_state(part, state, limits) for part, state in enumerate(states)]
    return IterRun(os.urandom(P.RUN_ID_BYTES), service, Checkpoint(0, encoded, [[] for _ in encoded]), max_rounds,
                   float(tol), reduce, checkpoint, round_timeout, max_recoveries, limits, combine=combine)


def _encoded_state(part: int, state: Any, limits: Limits) -> list[Any]:
    """A partition's state as frames of its own (the caller may change the dict afterwards)."""
    if not isinstance(state, dict):
        raise TypeError(f"partition {part}: a state must be a dict, got {type(state).__name__}")
    try:
        frames = encode(state)
    except EncodeError as exc:
        raise EncodeError(f"partition {part}: its state cannot be sent: {exc}") from exc
    if len(frames) > limits.max_frames:
        raise EncodeError(f"partition {part}: its state has {len(frames) - 1} arrays (at most max_frames - 1 = "
                          f"{limits.max_frames - 1}); put them in fewer, larger arrays")
    return [f if isinstance(f, bytes) else bytes(f) for f in frames]


def resolve(future: Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless the user cancelled it meanwhile (a Future, or a dropped Iteration)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


class Iteration(Iterator[RoundInfo]):
    """What ``Master.iterate`` returns: iterate for one :class:`RoundInfo` per finished round, then
    :meth:`result` for the final states in partition order. A failed run raises from both."""

    def __init__(self, run: IterRun, stop: Any) -> None:
        self._run = run
        self._stop = stop  # posts the cancel to the master's I/O thread
        self._ended = False

    @property
    def run_id(self) -> str:
        return self._run.rid.hex()

    @property
    def converged(self) -> bool:
        """Whether the metric reached ``tol`` (else the run stopped at ``max_rounds``)."""
        return self._run.converged

    @property
    def recoveries(self) -> int:
        return self._run.recoveries

    def __iter__(self) -> Iteration:
        return self

    def __next__(self) -> RoundInfo:
        if self._ended:
            raise StopIteration
        item = self._run.infos.get()
        if item is _END:
            self._ended = True
            future = self._run.future
            if not future.cancelled() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
            raise StopIteration
        assert isinstance(item, RoundInfo)
        return item

    def result(self, timeout: float | None = None) -> list[Any]:
        """The final states, in partition order (waits for the run to end)."""
        return self._run.future.result(timeout)

    def close(self) -> None:
        """Stop the run and free its partitions on the workers."""
        if not self._run.future.done():
            self._stop(self._run.rid)

    def __enter__(self) -> Iteration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        """Dropped while it runs (``break`` out of the loop): the run stops; the master's loop sees the
        cancelled future at its next tick and frees the partitions (nothing here may take a lock)."""
        try:
            if self._run.future.cancel():
                self._run.infos.put(_END)
        except Exception:
            pass
