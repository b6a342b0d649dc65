"""Iterations (``Master.iterate``): the cost of a round, and PageRank against one process and Ray,
in the same run.

    python -m ndpipe.bench iterate        # or: python bench/iterate.py   (--help for options)

1. **Per-round overhead.** A ring of 2, 8, 32 and 64 partitions with 4-float states and messages
   (``examples.exchange.ring_step``): ms per round through ndpipe (1 daemon × 2 lanes), through the
   same loop written by hand with pyzmq (``_rawiter``: a driver and 2 worker processes), and the same
   steps looping in one process; ndpipe's difference to the last is what a round's hops, barrier
   and convergence check cost.
2. **PageRank**, the same ``examples.pagerank.step`` everywhere: one process looping over the
   partitions; ndpipe (1 daemon × 2 lanes, the partitions resident); the hand-written pyzmq loop; and
   where Ray is installed, one
   actor per partition with the driver routing the messages between rounds. ms per round, the bytes
   the broker routed per round against the sum of the message sizes, and the answers checked: every
   run's final ranks must be bit-identical to the single process's (with ``combine="sum"``, which
   folds each lane's messages per destination before they travel, equal to 1e-12 relative).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

from ndpipe.bench._common import SERVICES, bench_cluster, machine_line
from ndpipe.bench._rawiter import RawIterate
from ndpipe.examples import pagerank
from ndpipe.examples.exchange import ring_local, ring_states

ITER_SERVICES = {**SERVICES, "ring": "ndpipe.examples.exchange:ring_step", "pagerank": "ndpipe.examples.pagerank:step"}


def overhead_rows(sizes: list[int], rounds: int) -> list[tuple[int, float, float, float]]:
    """(partitions, ndpipe s/round, raw pyzmq s/round, one process s/round) for the tiny ring."""
    rows = []
    with bench_cluster(1, 2, services=ITER_SERVICES) as cluster, cluster.master() as m:
        m.iterate("ring", ring_states(2), max_rounds=20).result(60)  # warm-up
        for parts in sizes:
            t0 = time.perf_counter()
            run = m.iterate("ring", ring_states(parts), max_rounds=rounds, tol=-1.0, checkpoint=0)
            got = run.result(300)
            wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            want = ring_local(ring_states(parts), rounds, -1.0)
            local = time.perf_counter() - t0
            assert all(a["x"].tobytes() == b["x"].tobytes() for a, b in zip(got, want, strict=True))
            with RawIterate("ndpipe.examples.exchange:ring_step", ring_states(parts), procs=2) as raw:
                t0 = time.perf_counter()
                raw.run(rounds)
                raw_wall = time.perf_counter() - t0
                assert all(a["x"].tobytes() == b["x"].tobytes() for a, b in zip(raw.states(), want, strict=True))
            rows.append((parts, wall / rounds, raw_wall / rounds, local / rounds))
    return rows


def pagerank_rows(nodes: int, edges: int, parts: int, rounds: int) -> tuple[list[tuple[str, float, float]], str]:
    """(name, ms/round, bytes moved per round) for one process, ndpipe and Ray; and a note."""
    src, dst = pagerank.graph(nodes, edges, seed=1)
    rows = []
    t0 = time.perf_counter()
    want, _ = pagerank.local(pagerank.partition(src, dst, nodes, parts), rounds, -1.0)
    rows.append(("one process, looping over the partitions", (time.perf_counter() - t0) / rounds, 0.0))
    states = pagerank.partition(src, dst, nodes, parts)
    with bench_cluster(1, 2, services=ITER_SERVICES) as cluster, cluster.master() as m:
        m.iterate("ring", ring_states(2), max_rounds=5).result(60)  # warm-up
        before = m.status()["counters"]
        run = m.iterate("pagerank", states, max_rounds=rounds, tol=-1.0, checkpoint=0)
        t0 = time.perf_counter()
        infos = list(run)
        got = run.result(300)
        wall = time.perf_counter() - t0
        routed = m.status()["counters"]["iter_routed_bytes"] - before["iter_routed_bytes"]
        run = m.iterate("pagerank", pagerank.partition(src, dst, nodes, parts), max_rounds=rounds, tol=-1.0,
                        checkpoint=0, combine="sum")
        t0 = time.perf_counter()
        folded = run.result(300)
        folded_wall = time.perf_counter() - t0
        folded_routed = m.status()["counters"]["iter_routed_bytes"] - before["iter_routed_bytes"] - routed
    assert np.array_equal(pagerank.ranks(got), pagerank.ranks(want)), "ndpipe's ranks differ from one process's"
    assert np.allclose(pagerank.ranks(folded), pagerank.ranks(want), rtol=1e-12, atol=0), "combine='sum' is off"
    sent = sum(i.bytes for i in infos) / len(infos)
    rows.append((f"ndpipe, {parts} resident partitions on 2 lanes", wall / rounds, routed / rounds))
    rows.append(("ndpipe, the same with combine='sum'", folded_wall / rounds, folded_routed / rounds))
    with RawIterate("ndpipe.examples.pagerank:step", pagerank.partition(src, dst, nodes, parts), procs=2) as raw:
        t0 = time.perf_counter()
        raw.run(rounds)
        raw_wall = time.perf_counter() - t0
        assert np.array_equal(pagerank.ranks(raw.states()), pagerank.ranks(want)), "raw ranks differ"
    rows.append(("raw pyzmq loop, 2 processes, the driver routes", raw_wall / rounds, 0.0))
    ray = ray_row(states, rounds, want)
    if ray is not None:
        rows.append(ray)
    note = (f"messages per round: {sent / 2**20:.1f} MiB in all (every partition to every partition it links "
            f"to); the broker routed {routed / rounds / 2**20:.1f} MiB of them per round (the others stayed "
            "in their lane)" + ("" if ray is not None else "; Ray row skipped: Ray is not installed"))
    return rows, note


def ray_row(states: list[dict[str, Any]], rounds: int, want: list[dict[str, Any]]) -> tuple[str, float, float] | None:
    """One Ray actor per partition; the driver routes each round's messages to the next round's calls."""
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        actor = ray.remote(_PartitionActor)
        actors: list[Any] = [actor.remote(s) for s in states]
        inboxes: list[list[tuple[int, Any]]] = [[] for _ in states]
        t0 = time.perf_counter()
        for rnd in range(rounds):
            outs = ray.get([a.step.remote(inboxes[i], rnd) for i, a in enumerate(actors)])
            inboxes = [[] for _ in states]
            for i, (out, _metric) in enumerate(outs):
                for j, message in out.items():
                    inboxes[j].append((i, message))
        wall = time.perf_counter() - t0
        got = ray.get([a.state.remote() for a in actors])
        assert np.array_equal(pagerank.ranks(got), pagerank.ranks(want)), "Ray's ranks differ from one process's"
        return (f"Ray, {len(states)} actors, the driver routing messages", wall / rounds, 0.0)
    finally:
        ray.shutdown()


class _PartitionActor:
    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def step(self, inbox: list[tuple[int, Any]], rnd: int) -> tuple[dict[int, Any], float]:
        self._state, out, metric = pagerank.step(self._state, inbox, rnd)
        return out, metric

    def state(self) -> dict[str, Any]:
        return self._state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=200, help="rounds of the tiny ring, per size")
    ap.add_argument("--nodes", type=int, default=200_000)
    ap.add_argument("--edges", type=int, default=2_000_000)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--pr-rounds", type=int, default=20, help="PageRank rounds")
    ap.add_argument("--quick", action="store_true", help="a smoke run: small graph, few rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.nodes, args.edges, args.pr_rounds = 30, 20_000, 200_000, 5
    print(machine_line())
    print(f"\nper-round overhead: a ring of tiny partitions (4 floats), {args.rounds} rounds each, "
          "1 daemon × 2 lanes, no checkpoints\n")
    head = (f"{'partitions':>10} {'ndpipe ms/round':>16} {'raw pyzmq':>10} {'ndpipe ÷ raw':>13} {'one process':>12} "
            f"{'ndpipe overhead ms':>19}")
    print(head)
    print("-" * len(head))
    for parts, ours, raw, local in overhead_rows([2, 8, 32, 64], args.rounds):
        print(f"{parts:>10} {ours * 1e3:16.3f} {raw * 1e3:10.3f} {ours / raw:13.2f} {local * 1e3:12.3f} "
              f"{(ours - local) * 1e3:19.3f}")
    print("(raw pyzmq: the loop written by hand — a driver ROUTER, 2 worker processes holding the partitions, "
          "every message through the driver, no broker, checkpoint or recovery)")
    print(f"\nPageRank: {args.nodes:,} nodes, {args.edges:,} edges, {args.parts} partitions, {args.pr_rounds} rounds, "
          "the same step function; every run's final ranks checked bit-identical to one process's "
          "(combine: to 1e-12)\n")
    rows, note = pagerank_rows(args.nodes, args.edges, args.parts, args.pr_rounds)
    base = rows[0][1]
    head = f"{'configuration':<48} {'ms/round':>9} {'× one process':>14} {'routed MiB/round':>17}"
    print(head)
    print("-" * len(head))
    for name, per_round, moved in rows:
        print(f"{name:<48} {per_round * 1e3:9.1f} {base / per_round:14.2f} {moved / 2**20:17.1f}")
    print(f"\n({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
