"""``ndpipe demo``: a local broker and worker pool over ipc (:mod:`ndpipe.cluster`, the harness the
tests and benchmarks use), running two real jobs, each checked against the same computation here in
one process:

* data parallelism: batch inference with a two-layer MLP (``ndpipe.examples.handlers:mlp_forward``),
  the batch split into shards, gathered in order;
* model parallelism: a 4-block transformer LM (``ndpipe.examples.lm``), the embedding, each block and
  the head resident services, batches of tokens streamed through the stage pipeline;
* iterative message passing: PageRank over a partitioned random graph (``ndpipe.examples.pagerank``),
  the partitions resident on the workers, rank contributions passed between them round by round
  until the ranks stop changing (``Master.iterate``).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from ndpipe.cluster import Cluster
from ndpipe.examples import lm, pagerank
from ndpipe.examples.handlers import mlp_forward

SERVICE = "mlp"
HANDLER = "ndpipe.examples.handlers:mlp_forward"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_demo(workers: int = 2, processes: int = 1, rows: int = 16384, shards: int = 64, dim: int = 256,
             lm_batches: int = 16, pagerank_edges: int = 1_000_000) -> int:
    """Run the demo; returns a process exit code (0 when every distributed result matches)."""
    root = tempfile.mkdtemp(prefix="ndpipe-demo-")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # run the clean-up below on SIGTERM too
    try:
        weights = lm.make_weights(f"{root}/lm.npz") if lm_batches else ""
        services = {SERVICE: HANDLER, "pagerank": "ndpipe.examples.pagerank:step",
                    **(lm.services(weights) if lm_batches else {})}
        cluster = Cluster(services, log_level="WARNING", root=root)
        print(f"ndpipe demo: broker + {workers} worker(s) × {processes} compute process(es) on ipc://{cluster.root}")
        with cluster.start(workers, processes), cluster.master() as master:
            ok = _mlp(master, workers, rows, shards, dim)
            if lm_batches:
                ok = _lm(master, weights, lm_batches) and ok
            if pagerank_edges:
                ok = _pagerank(master, pagerank_edges) and ok
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def _mlp(master: Any, workers: int, rows: int, shards: int, dim: int) -> bool:
    """Data parallelism: batch inference with an MLP, the batch scattered in shards."""
    x = np.random.default_rng(42).standard_normal((rows, dim))
    master.scatter(SERVICE, x[: 2 * workers], 2 * workers)  # warm up (weights cache)
    t0 = time.perf_counter()
    with tqdm(total=shards, unit="shard", desc="mlp_forward") as bar:
        y = master.scatter(SERVICE, x, shards, axis=0, progress=bar.update)
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    expected = mlp_forward(x)
    local = time.perf_counter() - t1
    ok = y.shape == expected.shape and bool(np.allclose(y, expected, rtol=1e-9, atol=1e-12))
    mb = (x.nbytes + y.nbytes) / 1e6
    print(f"{rows} rows × {dim} features in {shards} shards: {elapsed:.3f} s distributed "
          f"({rows / elapsed:,.0f} rows/s, {mb / elapsed:,.1f} MB/s moved), {local:.3f} s in one process")
    print("result matches the single-process forward pass" if ok else "MISMATCH against single-process result")
    return ok


def _lm(master: Any, weights: str, batches: int) -> bool:
    """Model parallelism: a 4-block transformer LM, each block a resident stage, batches streamed
    through the stage pipeline (routed by the broker, no round trip here between stages)."""
    stages = lm.stages(weights)
    tokens = [np.random.default_rng(i).integers(0, 512, (8, 32)) for i in range(batches)]
    master.pipeline(stages, tokens[0]).result(120)  # warm up
    t0 = time.perf_counter()
    out = []
    with tqdm(total=batches, unit="batch", desc=" → ".join(stages)) as bar:
        for logits in master.pipeline_map(stages, tokens):
            out.append(logits)
            bar.update()
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    model = lm.LM(weights)
    expected = [model(t) for t in tokens]
    local = time.perf_counter() - t1
    ok = all(np.allclose(a, b, rtol=0, atol=1e-5) and np.array_equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1))
             for a, b in zip(out, expected, strict=True))
    n = batches * tokens[0].size
    print(f"{batches} batches of 8 × 32 tokens through {len(stages)} stages: {elapsed:.3f} s distributed "
          f"({n / elapsed:,.0f} tokens/s), {local:.3f} s in one process")
    print("logits and greedy tokens match the single-process model" if ok
          else "MISMATCH against the single-process model")
    return _generate(master, weights, tokens[0][0]) and ok


def _generate(master: Any, weights: str, prompt: Any) -> bool:
    """Greedy generation streamed token by token from a resident generator service."""
    t0 = time.perf_counter()
    got: list[int] = []
    first = 0.0
    for token in master.stream("generate", prompt, max_new_tokens=16):
        first = first or time.perf_counter() - t0
        got.append(token)
    elapsed = time.perf_counter() - t0
    ok = got == lm.generate(weights, prompt, 16)
    print(f"greedy generation, streamed: {got} ({first * 1e3:.0f} ms to the first token, "
          f"{len(got) / elapsed:,.1f} tokens/s)")
    print("the same tokens as the single-process model" if ok else "MISMATCH against the single-process model")
    return ok


def _pagerank(master: Any, edges: int, parts: int = 8, tol: float = 1e-15) -> bool:
    """Iterative message passing: PageRank, the partitions resident on the workers."""
    nodes = max(parts, edges // 10)
    src, dst = pagerank.graph(nodes, edges, seed=7)
    states = pagerank.partition(src, dst, nodes, parts)
    t0 = time.perf_counter()
    run = master.iterate("pagerank", states, max_rounds=500, tol=tol, checkpoint=20)
    sent = 0
    with tqdm(total=None, unit="round", desc=f"pagerank ({parts} partitions)") as bar:
        for info in run:
            sent += info.bytes
            bar.set_postfix(change=f"{info.metric:.1e}", refresh=False)
            bar.update()
        final = run.result()
    elapsed = time.perf_counter() - t0
    rounds = bar.n
    t1 = time.perf_counter()
    local, local_rounds = pagerank.local(pagerank.partition(src, dst, nodes, parts), 500, tol)
    one = time.perf_counter() - t1
    ranks = pagerank.ranks(final)
    ok = (run.converged and local_rounds == rounds and ranks.tobytes() == pagerank.ranks(local).tobytes()
          and float(np.max(np.abs(ranks - pagerank.reference(src, dst, nodes, rounds - 1)))) <= 1e-10)
    print(f"{nodes:,} nodes, {edges:,} edges: {rounds} rounds to a change ≤ {tol:g} in {elapsed:.3f} s distributed "
          f"({rounds / elapsed:,.1f} rounds/s, {sent / rounds / 2**20:,.1f} MiB of messages per round), "
          f"{one:.3f} s in one process")
    print("ranks bit-identical to the same steps in one process, and to power iteration within 1e-10" if ok
          else "MISMATCH against the single-process PageRank")
    return ok
