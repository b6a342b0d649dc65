"""Handlers referenced from config.yaml (``ndpipe.examples.handlers:NAME``).

A handler is a plain function: arguments and result are numpy arrays, scalars, strings, bytes,
lists and dicts of these. ``mlp_forward`` is the demo's job: a two-layer MLP whose weights are
derived from a seed, so workers and the checking master build the same model without shipping it.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np


def echo(*args: Any) -> Any:
    """Return the argument (or the tuple of arguments) unchanged: the benchmark's identity task."""
    return args[0] if len(args) == 1 else list(args)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.asarray(a) @ np.asarray(b)
    return out


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Zero mean, unit variance along ``axis`` (row-wise for a shard of rows)."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=axis, keepdims=True)
    out: np.ndarray = (x - x.mean(axis=axis, keepdims=True)) / np.where(std == 0, 1.0, std)
    return out


@functools.lru_cache(maxsize=4)
def mlp_weights(seed: int, d_in: int, d_hidden: int, d_out: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)
    w2 = rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)
    return w1, np.zeros(d_hidden), w2, np.zeros(d_out)


def mlp_forward(x: np.ndarray, seed: int = 0, d_hidden: int = 512, d_out: int = 64) -> np.ndarray:
    """softmax(gelu(x @ W1 + b1) @ W2 + b2), row by row: a batch-inference step."""
    x = np.asarray(x, dtype=np.float64)
    return mlp(x, *mlp_weights(seed, x.shape[1], d_hidden, d_out))


def mlp(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """The forward pass itself, on given weights."""
    h = np.asarray(x, dtype=np.float64) @ w1 + b1
    h = 0.5 * h * (1.0 + np.tanh(0.7978845608028654 * (h + 0.044715 * h**3)))
    z = h @ w2 + b2
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


class MLP:
    """A resident service: the weights are made (or loaded) once per compute process, when the lane
    starts, and every task reuses them. In YAML::

        services:
          mlp: {handler: "ndpipe.examples.handlers:MLP", init: {d_in: 256, seed: 0}}

    ``weights`` may name an ``.npz`` file with arrays ``w1 b1 w2 b2`` instead of seeding them.
    """

    def __init__(self, d_in: int = 256, d_hidden: int = 512, d_out: int = 64, seed: int = 0,
                 weights: str | None = None) -> None:
        if weights is not None:
            with np.load(weights) as npz:
                self.params = tuple(np.array(npz[k]) for k in ("w1", "b1", "w2", "b2"))
        else:
            self.params = mlp_weights(seed, d_in, d_hidden, d_out)
        for p in self.params:
            p.setflags(write=False)  # shared by every task of this process: nobody may change them

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return mlp(x, *self.params)


def fail(message: str = "boom") -> None:
    """Always raises: shows how a handler's exception reaches the master."""
    raise ValueError(message)






def reciprocal(x: float) -> float:
    """``1 / x``: raises ZeroDivisionError for 0, so one call of a batch can fail alone."""
    return 1 / x




def sleep(seconds: float, value: Any = None) -> Any:
    """Sleep, then return ``value``: a stand-in for a long task."""
    time.sleep(seconds)
    return value





