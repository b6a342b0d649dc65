"""How a worker daemon and a master judge their link to the broker: one socket-free rule for both.

Beat (HEARTBEAT, PING) every ``interval``. Anything heard from the broker proves it alive. Silent
for ``liveness`` intervals, the link counts as dead: the caller opens a new socket and calls
:meth:`BrokerLink.reconnected`, which gives the new socket max(liveness × interval, back-off) before
the next verdict; the back-off doubles from ``backoff_min`` to ``backoff_max`` while the broker
stays silent (a dead broker is not hammered with new connections) and drops back when it speaks.
Every method takes ``now`` (``time.monotonic()``), so the rule is unit-tested without sleeping.
"""

from __future__ import annotations

from ndpipe import protocol as P


class BrokerLink:
    def __init__(self, interval: float, liveness: int, now: float, backoff_min: float = P.RECONNECT_MIN,
                 backoff_max: float = P.RECONNECT_MAX) -> None:
        self.interval = interval
        self.liveness = liveness
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.backoff = backoff_min
        self.last_heard = now
        self.deadline = now + interval * liveness  # silent until then: dead
        self.next_beat = now

    @property
    def expiry(self) -> float:
        return self.interval * self.liveness

    def heard(self, now: float) -> None:
        """A message from the broker: alive, and the back-off starts over."""
        self.last_heard = now
        self.deadline = now + self.expiry
        self.backoff = self.backoff_min

    def adopt(self, interval: float, liveness: int, now: float) -> None:
        """The broker's own settings (WELCOME, PONG) replace ours."""
        self.interval, self.liveness = interval, liveness
        self.deadline = self.last_heard + self.expiry
        self.next_beat = min(self.next_beat, now + interval)

    def beat_due(self, now: float) -> bool:
        return now >= self.next_beat

    def beaten(self, now: float) -> None:
        self.next_beat = now + self.interval

    def silent(self, now: float) -> bool:
        """Silent for over liveness × interval (or the back-off, after a reconnect): time for a new socket."""
        return now > self.deadline

    def reconnected(self, now: float) -> None:
        """A new socket was opened: a full period (at least the back-off) before the next verdict."""
        self.deadline = now + max(self.expiry, self.backoff)
        self.backoff = min(self.backoff * 2, self.backoff_max)
        self.next_beat = now + self.interval
