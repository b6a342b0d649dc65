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
        self.owner: dict[bytes, bytes] = {}  # routing id -> the key that first used it
        self.refused = Throttle(log)
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
                self.refused.warning("refused a connection: %s", refused)

    def reload(self) -> None:
        """SIGHUP: read the allow-lists again. Connections of keys still listed go on untouched; a
        key no longer listed is refused from its next message. A list that cannot be read keeps the
        old ones (and says why), so a typo does not lock everybody out."""
        try:
            lists = AllowLists.load(self.sec)
        except ConfigError as exc:
            log.error("allow-lists not reloaded, the previous ones stay: %s", exc)
            return
        self.lists = lists
        log.info("allow-lists reloaded: %s", lists.describe())

    def admits(self, rid: bytes, key: bytes, front: bool) -> bool:
        """May this message (from routing id ``rid``, authenticated as ``key``) be acted on at all?"""
        if not self.lists.admits(MASTERS if front else WORKERS, key):
            self.refused.warning("refused a message from key %s: no longer in security.%s", key.decode(),
                                 "masters or admins" if front else "workers")
            return False
        holder = self.owner.setdefault(rid, key)
        if holder != key:
            self.refused.warning("refused a message from key %s: its routing id belongs to key %s",
                                 key.decode(), holder.decode())
            return False
        return True

    def may_submit(self, key: bytes) -> bool:
        return key in self.lists.masters

    def is_admin(self, key: bytes) -> bool:
        return key in self.lists.admins

    def forget(self, live: set[bytes]) -> None:
        """Drop the bindings of routing ids the broker no longer knows (run at housekeeping)."""
        for rid in [r for r in self.owner if r not in live]:
            del self.owner[rid]
