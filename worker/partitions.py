"""The partitions a lane holds for iterations (``Master.iterate``, PROTOCOL.md §5.7), socket-free.

A partition's state lives here, decoded, from placement (W_PLACE) to the end of its run: it never
travels again except in a checkpoint or at the end. A round (W_STEP) runs ``step(state, inbox,
round)`` for each partition this lane holds, in partition order; the inbox is every message sent
to the partition in the previous round as ``(source, message)`` sorted by source. Messages go
through the codec even when their destination is on this lane (so a step sees the same values
wherever the partitions sit: a tuple arrives as a list, an array as a fresh read-only copy); those
never leave the process. The others go in the W_STEPPED reply, and the broker routes them.

Everything a step does wrong — raise, return something that is not ``(dict, dict, number)``, send to
a partition that does not exist, produce what the codec cannot carry — becomes an error entry naming
the partition and the round, with the remote traceback; the lane carries on.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ndpipe import protocol as P
from ndpipe import rounds as R
from ndpipe.codec import Limits, decode, encode
from ndpipe.errors import EncodeError, ProtocolError
from ndpipe.worker.compute import MAX_TRACEBACK, Handler, error_details

Inbox = list[tuple[int, list[Any]]]  # (source, encoded message frames)
Sent = tuple[int, int, list[Any]]  # (source, destination, encoded message)
MAX_MESSAGE = 2000  # characters of an error message in W_STEPPED (its traceback: compute.MAX_TRACEBACK)
COMBINERS = {"sum": np.add, "min": np.minimum, "max": np.maximum}  # Master.iterate(combine=...)


@dataclass(slots=True, eq=False)
class Partition:
    run: bytes
    epoch: int
    part: int
    parts: int
    service: str
    state: Any
    placed_round: int  # the round it was placed for: its inbox came whole with it
    combine: str | None = None  # "sum", "min", "max": this lane folds its partitions' messages per destination
    inboxes: dict[int, Inbox] = field(default_factory=dict)  # round -> messages for it so far


class StepError(Exception):
    """What a step did wrong; carries the partition and round in its message, and the partition."""

    def __init__(self, message: str, part: int = -1, code: str = P.HANDLER_ERROR) -> None:
        super().__init__(message)
        self.part, self.code = part, code


def _frames_copy(frames: list[Any]) -> list[Any]:
    """Encoded frames that no longer share memory with the step's arrays (which it may change in place
    next round while zmq still sends them)."""
    return [f if isinstance(f, bytes) else bytes(f) for f in frames]


class Partitions:
    """Every partition this lane holds, by (run, partition)."""

    def __init__(self, handlers: dict[str, Handler], max_frames: int = P.MAX_FRAMES) -> None:
        self.handlers = handlers
        self.limits = Limits(max_frames=max_frames)
        self.held: dict[tuple[bytes, int], Partition] = {}

    # ---- messages from the broker -----------------------------------------------------------------
    def place(self, run: bytes, ctl: dict[str, Any], payload: list[Any]) -> list[R.Frames]:
        """W_PLACE: hold a partition (dropping what this lane holds of an older epoch of the run)."""
        parts = R.num(ctl, "parts", 1, P.MAX_PARTITIONS)
        part, epoch = R.part_of(ctl, parts), R.num(ctl, "epoch", 1, 1 << 31)
        rnd, service = R.num(ctl, "round", 0, 1 << 31), str(ctl.get("service", ""))
        combine = ctl.get("combine")
        if combine is not None and combine not in COMBINERS:
            raise ProtocolError(f"W_PLACE combine must be one of {sorted(COMBINERS)}, got {combine!r:.40}")
        inbox_idx = R.index(ctl, "inbox", 2, parts)
        chunks = R.split(payload, [R.num(ctl, "state", 1, P.MAX_FRAMES + 1), *(n for _, n in inbox_idx)])
        self._drop_older(run, epoch)
        try:
            state = decode(chunks[0], self.limits)
        except Exception as exc:  # DecodeError: the master encoded it, so this is a bug or hostile input
            return self._failed(run, epoch, rnd, part, P.BAD_REQUEST, exc, f"partition {part}'s state")
        inbox = [(src, _frames_copy(c)) for (src, _), c in zip(inbox_idx, chunks[1:], strict=True)]
        self.held[(run, part)] = Partition(run, epoch, part, parts, service, state, rnd, combine, {rnd: inbox})
        return []

    def inbox(self, run: bytes, ctl: dict[str, Any], payload: list[Any]) -> None:
        """W_INBOX: messages from other lanes' partitions for the next round."""
        epoch, rnd = R.num(ctl, "epoch", 1, 1 << 31), R.num(ctl, "round", 0, 1 << 31)
        held = {p.part: p for (r, _), p in self.held.items() if r == run and p.epoch == epoch}
        if not held:
            return  # a run dropped meanwhile, or an older epoch's messages
        parts = next(iter(held.values())).parts
        idx = R.index(ctl, "msgs", 3, parts)
        for (src, dst, _n), chunk in zip(idx, R.split(payload, [n for *_, n in idx]), strict=True):
            target = held.get(dst)
            if target is None:
                raise ProtocolError(f"W_INBOX: a message for partition {dst}, which this lane does not hold")
            target.inboxes.setdefault(rnd, []).append((src, _frames_copy(chunk)))

    def end(self, run: bytes, ctl: dict[str, Any]) -> list[R.Frames]:
        """W_END: the final states (``gather``), then the run is dropped here."""
        epoch = R.num(ctl, "epoch", 1, 1 << 31)
        mine = sorted((p for (r, _), p in self.held.items() if r == run and p.epoch <= epoch), key=lambda p: p.part)
        out: list[R.Frames] = []
        for p in mine:
            del self.held[(run, p.part)]
            if not ctl.get("gather") or p.epoch != epoch:
                continue
            try:
                frames = encode(p.state)
                if len(frames) > self.limits.max_frames:
                    raise EncodeError(f"it has {len(frames) - 1} arrays, over max_frames - 1 = "
                                      f"{self.limits.max_frames - 1} (use fewer, larger arrays)")
            except Exception as exc:  # the master is told which partition's state could not travel
                details = error_details(exc, False)
                details["message"] = f"partition {p.part}: its final state cannot be sent: {exc}"
                out.append(R.frames(P.WORKER, P.W_STATE, run, {"epoch": epoch, "part": p.part, "error": details}))
                continue
            out.append(R.frames(P.WORKER, P.W_STATE, run, {"epoch": epoch, "part": p.part, "state": len(frames)},
                                frames))
        return out

    def step(self, run: bytes, ctl: dict[str, Any]) -> list[R.Frames]:
        """W_STEP: run round ``ctl.round`` of this lane's partitions of the run; the W_STEPPED to send
        (an error entry instead, naming the partition, if anything went wrong)."""
        epoch, rnd = R.num(ctl, "epoch", 1, 1 << 31), R.num(ctl, "round", 0, 1 << 31)
        wanted = ctl.get("parts")
        expect = ctl.get("expect", {})
        if not isinstance(wanted, list) or not isinstance(expect, dict):
            raise ProtocolError("W_STEP needs parts (list) and expect (map)")
        try:
            return self._round(run, epoch, rnd, wanted, expect, bool(ctl.get("checkpoint")))
        except StepError as exc:
            return self._stepped(run, epoch, rnd, [self._error(exc, rnd)], [], [], [])
        except (MemoryError, ProtocolError):
            raise
        except Exception as exc:  # a bug here must fail the run, not the lane (and not leave the round hanging)
            part = wanted[0] if wanted and isinstance(wanted[0], int) else -1
            error = StepError(f"partition {part}, round {rnd}: internal error running the round: {exc!r}", part)
            error.__cause__ = exc
            return self._stepped(run, epoch, rnd, [self._error(error, rnd)], [], [], [])

    def _round(self, run: bytes, epoch: int, rnd: int, wanted: list[Any], expect: dict[Any, Any],
               checkpoint: bool) -> list[R.Frames]:
        mine = [self.held.get((run, p)) for p in wanted]
        held = [p for p in mine if p is not None and p.epoch == epoch]
        if len(held) != len(wanted):
            missing = [w for w, p in zip(wanted, mine, strict=True) if p is None or p.epoch != epoch]
            raise StepError(f"partitions {missing} are not held by this lane (it was restarted?)", missing[0], P.LOST)
        results: list[dict[str, Any]] = []
        sends: list[tuple[int, int, list[Any]]] = []  # (source, destination, encoded message)
        folded: dict[int, list[tuple[int, Any]]] = {}  # combine: destination -> [(source, value)]
        ckpts: list[tuple[dict[str, Any], list[Any]]] = []
        for p in held:
            inbox = sorted(p.inboxes.pop(rnd, []), key=lambda m: m[0])
            remote = sum(1 for src, _ in inbox if not self._local(run, src))
            if rnd != p.placed_round and remote != expect.get(p.part, 0):
                raise StepError(f"round {rnd}: partition {p.part} has {remote} messages from other lanes, "
                                f"{expect.get(p.part, 0)} were sent", p.part, P.LOST)
            if checkpoint:
                ckpts.append(self._checkpoint(p, inbox, rnd))
            try:
                metric, sent = self._run_one(p, inbox, rnd)
            except StepError as exc:
                exc.part = p.part
                raise
            for dst, value in sent:  # encoded now: the step may change its arrays afterwards
                frames = self._encode_message(f"partition {p.part}, round {rnd}", p.part, dst, value)
                if p.combine:
                    folded.setdefault(dst, []).append((p.part, frames))
                else:
                    sends.append((p.part, dst, frames))
            results.append({"part": p.part, "metric": metric, "bytes": 0})
        if folded:
            sends += self._fold(folded, next(p.combine for p in held if p.combine), rnd)
        return self._route(run, epoch, rnd, results, sends, ckpts)

    def _checkpoint(self, p: Partition, inbox: Inbox, rnd: int) -> tuple[dict[str, Any], list[Any]]:
        """The partition's state and inbox as they are at the start of the round (§5.7 rule 5)."""
        try:
            state = _frames_copy(encode(p.state))
        except Exception as exc:
            raise StepError(f"partition {p.part}, round {rnd}: its state cannot be encoded for a checkpoint: {exc}",
                            p.part) from exc
        frames = state + [f for _, fs in inbox for f in fs]
        if len(frames) > self.limits.max_frames:
            raise StepError(f"partition {p.part}, round {rnd}: its checkpoint (state and inbox) has {len(frames)} "
                            f"frames, over max_frames {self.limits.max_frames}: send fewer, larger arrays", p.part)
        return {"part": p.part, "state": len(state), "inbox": [[src, len(f)] for src, f in inbox]}, frames

    def _fold(self, folded: dict[int, list[tuple[int, list[Any]]]], how: str, rnd: int) -> list[Sent]:
        """One message per destination from this lane: its partitions' messages (as the codec delivers
        them) folded in source order (``combine``), labelled with the lowest source."""
        out = []
        for dst in sorted(folded):
            messages = folded[dst]
            if len(messages) == 1:
                out.append((messages[0][0], dst, messages[0][1]))
                continue
            where = f"partition {messages[0][0]}, round {rnd}"
            try:
                values = [decode(frames, self.limits) for _, frames in messages]
                shapes = {np.shape(v) for v in values}
                if len(shapes) != 1:
                    raise ValueError(f"shapes {sorted(shapes)} differ")
                acc = values[0]
                for value in values[1:]:
                    acc = COMBINERS[how](acc, value)
            except Exception as exc:
                raise StepError(f"{where}: combine={how!r} cannot fold the messages for partition {dst} "
                                f"(numbers or numeric arrays of one shape): {exc}", messages[0][0]) from exc
            out.append((messages[0][0], dst, self._encode_message(where, messages[0][0], dst, acc)))
        return out

    def _route(self, run: bytes, epoch: int, rnd: int, results: list[dict[str, Any]], sends: list[Sent],
               ckpts: list[tuple[dict[str, Any], list[Any]]]) -> list[R.Frames]:
        """Messages to partitions held here go to their inbox for the next round; the others into the
        W_STEPPED, for the broker to route. Each partition's ``bytes`` counts the messages it sent."""
        out_idx: list[list[int]] = []
        out_frames: list[Any] = []
        sizes: dict[int, int] = {}
        for src, dst, frames in sends:
            sizes[src] = sizes.get(src, 0) + sum(len(f) for f in frames)
            target = self.held.get((run, dst))
            if target is not None and target.epoch == epoch:
                target.inboxes.setdefault(rnd + 1, []).append((src, frames))
            else:
                out_idx.append([src, dst, len(frames)])
                out_frames += frames
        for entry in results:
            entry["bytes"] = sizes.get(entry["part"], 0)
        return self._stepped(run, epoch, rnd, results, out_idx, out_frames, ckpts)

    # ---- one partition's step -------------------------------------------------------------------
    def _run_one(self, p: Partition, inbox: Inbox, rnd: int) -> tuple[float, list[tuple[int, Any]]]:
        """Call the step; (metric, [(destination, message)]) or StepError saying what went wrong."""
        where = f"partition {p.part}, round {rnd}"
        handler = self.handlers.get(p.service)
        if handler is None:
            raise StepError(f"{where}: this worker has no service {p.service!r}")
        try:
            messages = [(src, decode(frames, self.limits)) for src, frames in inbox]
        except Exception as exc:
            raise StepError(f"{where}: a message in its inbox cannot be decoded: {exc}") from exc
        try:
            returned = handler(p.state, messages, rnd)
        except MemoryError:
            raise
        except Exception as exc:
            raise StepError(f"{where}: the step raised {type(exc).__name__}: {exc}") from exc
        state, out, metric = _checked(where, returned)
        sent = [(dst, out[key]) for dst, key in _destinations(where, out, p.parts)]
        p.state = state
        return float(metric), sent

    def _encode_message(self, where: str, part: int, dst: int, value: Any) -> list[Any]:
        try:
            frames = _frames_copy(encode(value))
        except EncodeError as exc:
            raise StepError(f"{where}: the message for partition {dst} cannot be sent: {exc}", part) from exc
        if len(frames) > self.limits.max_frames:
            raise StepError(f"{where}: the message for partition {dst} has {len(frames) - 1} arrays "
                            f"(at most max_frames - 1 = {self.limits.max_frames - 1})", part)
        return frames

    # ---- helpers --------------------------------------------------------------------------------
    def _local(self, run: bytes, src: int) -> bool:
        return (run, src) in self.held

    def _drop_older(self, run: bytes, epoch: int) -> None:
        for key in [k for k, p in self.held.items() if k[0] == run and p.epoch < epoch]:
            del self.held[key]

    @staticmethod
    def _error(exc: StepError, rnd: int) -> dict[str, Any]:
        """The W_STEPPED entry for what went wrong: the message names the partition and round; the
        traceback is the step's own where it raised."""
        details = error_details(exc.__cause__ or exc, exc.code == P.HANDLER_ERROR)
        message = str(exc)
        if not message.startswith(("partition", "round")):
            message = f"partition {exc.part}, round {rnd}: {message}"
        # the tails, as for a constructor's error: W_STEPPED is a control message, whatever the step raised
        details["message"] = message[:MAX_MESSAGE]
        details["traceback"] = details.get("traceback", "")[-MAX_TRACEBACK:]
        return {"part": exc.part, "code": exc.code, "error": details}

    def _stepped(self, run: bytes, epoch: int, rnd: int, results: list[dict[str, Any]], out_idx: list[list[int]],
                 out_frames: list[Any], ckpts: list[tuple[dict[str, Any], list[Any]]]) -> list[R.Frames]:
        """The round's W_STEPPED, cut into messages of at most ``max_frames`` payload frames (what every
        receiver reads of one message): all but the last say ``more``; the last carries the metrics, which
        is what the broker counts for the barrier. A message or checkpoint always fits one piece whole."""
        budget = self.limits.max_frames
        pieces: list[R.Frames] = []
        idx: list[list[int]] = []
        ck: list[dict[str, Any]] = []
        frames: list[Any] = []

        def cut() -> None:
            nonlocal idx, ck, frames
            ctl = {"epoch": epoch, "round": rnd, "out": idx, "ckpt": ck, "more": True}
            pieces.append(R.frames(P.WORKER, P.W_STEPPED, run, ctl, frames))
            idx, ck, frames = [], [], []

        at = 0
        for entry in out_idx:
            n = entry[2]
            if frames and len(frames) + n > budget:
                cut()
            idx.append(entry)
            frames += out_frames[at:at + n]
            at += n
        for body, fs in ckpts:
            if frames and len(frames) + len(fs) > budget:
                cut()
            ck.append(body)
            frames += fs
        ctl = {"epoch": epoch, "round": rnd, "parts": results, "out": idx, "ckpt": ck}
        return [*pieces, R.frames(P.WORKER, P.W_STEPPED, run, ctl, frames)]

    def _failed(self, run: bytes, epoch: int, rnd: int, part: int, code: str, exc: BaseException,
                what: str) -> list[R.Frames]:
        details = error_details(exc, False)
        details["message"] = f"{what} cannot be handled: {exc}"
        return self._stepped(run, epoch, rnd, [{"part": part, "code": code, "error": details}], [], [], [])


def _checked(where: str, returned: Any) -> tuple[dict[Any, Any], dict[Any, Any], Any]:
    """(state, messages, metric) if the step returned that shape, else StepError saying what it returned."""
    if not isinstance(returned, tuple) or len(returned) != 3:
        raise StepError(f"{where}: a step returns (state: dict, messages: dict[int, object], metric: float), "
                        f"got {_kind(returned)}")
    state, out, metric = returned
    if not isinstance(state, dict):
        raise StepError(f"{where}: the new state must be a dict, got {type(state).__name__}")
    if not isinstance(out, dict):
        raise StepError(f"{where}: the messages must be a dict {{destination partition: message}}, "
                        f"got {type(out).__name__}")
    if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
        raise StepError(f"{where}: the metric must be a number, got {type(metric).__name__}")
    try:
        metric = float(metric)
    except (OverflowError, ValueError) as exc:
        raise StepError(f"{where}: the metric {str(metric)[:40]} is not a float: {exc}") from exc
    return state, out, metric


def _destinations(where: str, out: dict[Any, Any], parts: int) -> list[tuple[int, Any]]:
    """(destination, key in ``out``) in destination order; StepError for a key that is no partition."""
    for key in out:
        if not _is_int(key) or not 0 <= int(key) < parts:
            raise StepError(f"{where}: a message for partition {key!r}, but partitions are 0..{parts - 1}")
    return sorted((int(key), key) for key in out)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return f"a tuple of {len(value)}" if isinstance(value, tuple) else f"a {type(value).__name__}"
