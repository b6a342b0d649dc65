"""The rounds of ``Master.iterate`` in one process: the reference the examples, tests and benchmarks
compare the distributed runs with (the same step, the same inbox order: sorted by source)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Step = tuple[dict[str, Any], dict[int, Any], float]  # (new state, {destination: message}, metric)


def run_local(step: Callable[[dict[str, Any], list[tuple[int, Any]], int], Step], states: list[dict[str, Any]],
              max_rounds: int, tol: float) -> tuple[list[dict[str, Any]], int]:
    """Loop over the partitions round by round until the largest metric is <= ``tol`` or
    ``max_rounds``: (final states, rounds run). ``states`` is changed in place."""
    inboxes: list[list[tuple[int, Any]]] = [[] for _ in states]
    for rnd in range(max_rounds):
        nxt: list[list[tuple[int, Any]]] = [[] for _ in states]
        metrics = []
        for i, state in enumerate(states):
            states[i], out, metric = step(state, inboxes[i], rnd)
            metrics.append(metric)
            for j, message in out.items():
                nxt[j].append((i, message))
        inboxes = nxt
        if max(metrics) <= tol:
            return states, rnd + 1
    return states, max_rounds
