"""The same workloads with Ray, where Ray is installed (``pip install ray``): actors chained by
object refs for the pipeline, ``ray.put`` for the shared array. Each function returns None when Ray
is not importable, and the benchmark prints that it was skipped. One local Ray instance per
function, 2 CPUs, started and shut down inside it."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import numpy as np


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    return ray


def pipeline_row(x: Any, stages: int, calls: int, items: int) -> tuple[str, float, float, float] | None:
    """``stages`` actors computing ``x + 1``, chained stage to stage by object refs (no round trip to
    the driver): (name, p50 s, p99 s, inputs/s)."""
    ray = _ray()
    if ray is None:
        return None
    try:
        stage = ray.remote(_Stage)
        actors = [stage.remote() for _ in range(stages)]

        def chain(v: Any) -> Any:
            for actor in actors:
                v = actor.__call__.remote(v)
            return v

        for _ in range(20):
            ray.get(chain(x))
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            y = ray.get(chain(x))
            lat.append(time.perf_counter() - t0)
        assert np.array_equal(y, x + stages)
        t0 = time.perf_counter()
        out = ray.get([chain(x) for _ in range(items)])
        through = items / (time.perf_counter() - t0)
        assert all(np.array_equal(o, x + stages) for o in out)
        lat.sort()
        return ("Ray 4 actors, chained refs", statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                through)
    finally:
        ray.shutdown()


def put_row(arr: Any, tasks: int) -> tuple[str, float, int] | None:
    """``ray.put(arr)`` once, then ``tasks`` tasks each reading one element: (name, seconds, -1)."""
    ray = _ray()
    if ray is None:
        return None
    try:
        pick = ray.remote(_pick)
        ray.get(pick.remote(np.arange(4.0), 0))  # warm-up
        t0 = time.perf_counter()
        ref = ray.put(arr)
        got = ray.get([pick.remote(ref, i) for i in range(tasks)])
        wall = time.perf_counter() - t0
        flat = arr.reshape(-1)
        assert got == [float(flat[i % flat.size]) for i in range(tasks)]
        return ("Ray put (shared-memory object store)", wall, -1)
    finally:
        ray.shutdown()


class _Stage:
    def __call__(self, v: Any) -> Any:
        return v + 1


def _pick(w: Any, i: int) -> float:
    flat = w.reshape(-1)
    return float(flat[i % flat.size])
