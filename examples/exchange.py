"""The smallest iteration: partitions on a ring pass their vector to the next one and average.

``state = {"x": array}``; each round partition ``i`` sends ``x`` to ``(i + 1) % n`` and replaces its
``x`` by the mean of its own and what it received. With two partitions this is the A -> B -> A
exchange of docs/iterate.md. The metric is the largest change of any element; the states converge
to the mean of the starting vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ndpipe.examples.rounds import Step, run_local


def ring_step(state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Step:
    x = np.asarray(state["x"], dtype=np.float64)
    change = float("inf")
    if inbox:
        (_src, received), = inbox
        new = (x + received) / 2.0
        change = float(np.max(np.abs(new - x)))
        x = new
    n = int(state["n"])
    return {**state, "x": x}, {(int(state["i"]) + 1) % n: x}, change


def ring_states(n: int, size: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"i": i, "n": n, "x": rng.standard_normal(size)} for i in range(n)]


def ring_local(states: list[dict[str, Any]], max_rounds: int, tol: float) -> list[dict[str, Any]]:
    """The same rounds in one process (the reference)."""
    return run_local(ring_step, states, max_rounds, tol)[0]
