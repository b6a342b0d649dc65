"""The broker's gatekeeper when CurveZMQ is on: its ZAP handler and the per-message key check.

ZAP (RFC 27) lets libzmq ask, during each CURVE handshake, whether a client key may connect; the
broker answers from its own poll loop (no authenticator thread), on a REP socket bound to
``inproc://zeromq.zap.01`` **before** the frontend and backend bind, so no connection is ever
accepted unchecked. After the handshake every message carries the key it was sent with (the
User-Id the ZAP reply set), and :meth:`Guard.admits` checks it against the lists as they are now:
a routing id is never trusted on its own.

Routing ids are bound to the first key that used them: a message whose routing id another key
holds is refused, so a peer that took over an id (ROUTER_HANDOVER, which reconnects need) cannot
answer, submit or cancel in its name.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from ndpipe import protocol as P
from ndpipe.broker.state import BrokerState
from ndpipe.config import SecurityConfig
from ndpipe.errors import ConfigError
from ndpipe.security import MASTERS, WORKERS, AllowLists, zap_reply
from ndpipe.transport import Throttle

log = logging.getLogger("ndpipe.broker")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class Guard:
    """Allow-lists, the ZAP socket, and which key holds which routing id."""

    def __init__(self, ctx: zmq.Context[Any], sec: SecurityConfig) -> None:
        self.sec = sec
        self.lists = AllowLists.load(sec)
        # (frontend?, routing id) -> the key that first used it; the two ROUTERs name peers separately
        self.owner: dict[tuple[bool, bytes], bytes] = {}
        self.refused = Throttle(log)
        self.counters = {"handshakes_refused": 0, "messages_refused": 0}  # shown in an admin's STATUS
        self.zap: zmq.Socket[Any] = ctx.socket(zmq.REP)
        self.zap.linger = 0
        try:
            self.zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self.zap.close()
            raise ConfigError(f"security.curve: cannot start the ZAP handler: {exc}") from exc
        log.info("CurveZMQ on: %s", self.lists.describe())

    def close(self) -> None:
        self.zap.close(linger=0)

    def on_zap(self) -> None:
        """Answer every ZAP request waiting (each handshake waits for its answer)."""
        while True:
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply, refused = zap_reply(self.lists, request)
            self.zap.send_multipart(reply)
            if refused:
                self.counters["handshakes_refused"] += 1
                self.refused.warning("refused a connection: %s", refused)

    def reload(self) -> list[tuple[bool, bytes]]:
        """SIGHUP: read the allow-lists again. Connections of keys still listed go on untouched; a
        key no longer listed is refused from its next message. Returns the (frontend?, routing id)
        of peers whose key was removed, for the broker to forget now (a revoked worker must not keep
        receiving tasks until it expires). A list that cannot be read keeps the old ones (and says
        why), so a typo does not lock everybody out."""
        try:
            lists = AllowLists.load(self.sec)
        except ConfigError as exc:
            log.error("allow-lists not reloaded, the previous ones stay: %s", exc)
            return []
        self.lists = lists
        revoked = [peer for peer, key in self.owner.items()
                   if not lists.admits(MASTERS if peer[0] else WORKERS, key)]
        for peer in revoked:
            del self.owner[peer]
        log.info("allow-lists reloaded: %s; %d connections of removed keys dropped", lists.describe(), len(revoked))
        return revoked

    def admits(self, rid: bytes, key: bytes, front: bool) -> bool:
        """May this message (from routing id ``rid``, authenticated as ``key``) be acted on at all?"""
        if not self.lists.admits(MASTERS if front else WORKERS, key):
            self.counters["messages_refused"] += 1
            self.refused.warning("refused a message from key %s: no longer in security.%s", key.decode(),
                                 "masters or admins" if front else "workers")
            return False
        holder = self.owner.setdefault((front, rid), key)
        if holder != key:
            self.counters["messages_refused"] += 1
            self.refused.warning("refused a message from key %s: its routing id belongs to key %s",
                                 key.decode(), holder.decode())
            return False
        return True

    def may_submit(self, key: bytes) -> bool:
        return key in self.lists.masters

    def is_admin(self, key: bytes) -> bool:
        return key in self.lists.admins

    def key_of(self, rid: bytes, front: bool) -> bytes | None:
        return self.owner.get((front, rid))

    def ready_refusal(self, state: BrokerState, rid: bytes, key: bytes, ready: P.ReadyInfo, cap: int) -> str:
        """Why a worker key's READY is not taken (or ""): a READY under a registered name replaces that
        worker, so only the key that registered it may; and one key's daemons may register at most
        ``cap`` slots (lanes × credit) in all, so no key attracts nearly all the work."""
        same_name = state.by_name.get(ready.name)
        if same_name is not None and self.key_of(same_name.hid, front=False) not in (None, key):
            return f"the name {ready.name!r} is another key's worker"
        mine = sum(h.nlanes * h.credit for h in state.hosts.values()
                   if self.key_of(h.hid, front=False) == key and h.hid != rid and h.name != ready.name)
        if mine + ready.lanes * ready.credit > cap:
            return f"{mine} + {ready.lanes * ready.credit} slots would pass broker.max_slots_per_key = {cap}"
        return ""

    def forget(self, masters: set[bytes], workers: set[bytes]) -> None:
        """Drop the bindings of routing ids the broker no longer knows (run at housekeeping)."""
        for peer in [p for p in self.owner if p[1] not in (masters if p[0] else workers)]:
            del self.owner[peer]
