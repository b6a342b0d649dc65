"""The one broker-link rule shared by the worker daemon and the master, with an injected clock."""

from __future__ import annotations

import pytest

from ndpipe.link import BrokerLink

pytestmark = pytest.mark.timeout(10)


def test_silent_only_after_liveness_intervals_without_a_word() -> None:
    link = BrokerLink(1.0, 3, now=0.0)
    assert not link.silent(3.0) and link.silent(3.01)
    link.heard(2.0)
    assert not link.silent(5.0) and link.silent(5.01)


def test_beats_every_interval_from_the_start() -> None:
    link = BrokerLink(0.5, 3, now=10.0)
    assert link.beat_due(10.0)
    link.beaten(10.0)
    assert not link.beat_due(10.49) and link.beat_due(10.5)


def test_back_off_grows_while_the_broker_stays_silent_and_resets_when_it_speaks() -> None:
    link = BrokerLink(0.1, 3, now=0.0, backoff_min=0.5, backoff_max=2.0)
    waits = []
    now = 0.0
    for _ in range(5):  # the broker never answers: each new socket waits longer, up to the maximum
        link.reconnected(now)
        waits.append(round(link.deadline - now, 3))
        now = link.deadline + 0.001
        assert link.silent(now)
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0]
    link.heard(now)
    link.reconnected(now)
    assert link.deadline - now == 0.5  # heard again: back to the minimum


def test_the_brokers_settings_replace_ours() -> None:
    link = BrokerLink(1.0, 3, now=0.0)
    link.beaten(0.0)
    link.adopt(0.2, 5, now=0.1)
    assert link.next_beat == pytest.approx(0.3) and link.expiry == pytest.approx(1.0)
    assert link.silent(1.01) and not link.silent(0.99)
