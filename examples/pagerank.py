"""PageRank over a partitioned graph with ``Master.iterate`` (each partition a block of nodes).

Partition ``i`` holds its nodes' ranks and out-degrees and, for every partition ``j`` its nodes link
to, the edges as (source index in ``i``, destination index in ``j``). A round takes the
contributions the partitions sent (``inbox``), makes the new ranks, and sends each partition ``j``
the sum of this partition's contributions to ``j``'s nodes — one dense float64 array per
destination partition, whatever the number of edges. The metric is the largest change of a rank.

Every node has at least one out-link (no dangling mass to share), so the reference is plain power
iteration, ``r <- (1 - d) / N + d * A^T (r / outdeg)``, starting from ``1 / N``: after ``k`` rounds the
partitions hold the reference's ``k``-th iterate (round 0 only sends the first contributions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ndpipe.examples.rounds import Step, run_local

DAMPING = 0.85


def graph(nodes: int, edges: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) of a seeded random graph in which every node has at least one out-link."""
    rng = np.random.default_rng(seed)
    src = np.concatenate([np.arange(nodes), rng.integers(0, nodes, edges - nodes)])
    dst = rng.integers(0, nodes, edges)
    return src.astype(np.int64), dst.astype(np.int64)


def partition(src: np.ndarray, dst: np.ndarray, nodes: int, parts: int) -> list[dict[str, Any]]:
    """One state per block of nodes (contiguous, sizes differing by at most one)."""
    bounds = np.linspace(0, nodes, parts + 1).astype(np.int64)
    owner = np.searchsorted(bounds, np.arange(nodes), side="right") - 1
    outdeg = np.bincount(src, minlength=nodes).astype(np.float64)
    states = []
    for i in range(parts):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        mine = (src >= lo) & (src < hi)
        s, d = src[mine], dst[mine]
        links = {}
        for j in range(parts):
            to_j = owner[d] == j
            if to_j.any():
                links[j] = [(s[to_j] - lo).astype(np.int32), (d[to_j] - bounds[j]).astype(np.int32),
                            int(bounds[j + 1] - bounds[j])]
        states.append({"nodes": nodes, "lo": lo, "rank": np.full(hi - lo, 1.0 / nodes),
                       "inv_outdeg": 1.0 / outdeg[lo:hi], "links": links})
    return states


def step(state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Step:
    """One PageRank round for one partition (the service ``pagerank_step``)."""
    change = float("inf")
    if round > 0:
        total = np.zeros_like(state["rank"])
        for _src, contribution in inbox:  # sorted by source: the same sum whatever the placement
            total += contribution
        new = (1.0 - DAMPING) / state["nodes"] + DAMPING * total
        change = float(np.max(np.abs(new - state["rank"]))) if new.size else 0.0
        state["rank"] = new
    share = state["rank"] * state["inv_outdeg"]
    out = {int(j): np.bincount(d, weights=share[s], minlength=n) for j, (s, d, n) in state["links"].items()}
    return state, out, change


def reference(src: np.ndarray, dst: np.ndarray, nodes: int, rounds: int) -> np.ndarray:
    """The ranks after ``rounds`` power-iteration steps (what round ``rounds`` leaves in the partitions)."""
    rank = np.full(nodes, 1.0 / nodes)
    inv_outdeg = 1.0 / np.bincount(src, minlength=nodes)
    for _ in range(rounds):
        rank = (1.0 - DAMPING) / nodes + DAMPING * np.bincount(dst, weights=(rank * inv_outdeg)[src], minlength=nodes)
    return rank


def ranks(states: list[dict[str, Any]]) -> np.ndarray:
    """The whole rank vector from the final states, in node order."""
    return np.concatenate([np.asarray(s["rank"]) for s in states])


def local(states: list[dict[str, Any]], max_rounds: int, tol: float) -> tuple[list[dict[str, Any]], int]:
    """The same steps in one process, looping over the partitions (the single-process baseline):
    (final states, rounds run)."""
    return run_local(step, states, max_rounds, tol)
