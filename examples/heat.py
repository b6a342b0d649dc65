"""2-D heat diffusion (Jacobi sweeps) on horizontal strips exchanging halo rows with ``Master.iterate``.

The plate is an ``h × w`` grid whose border is held fixed (Dirichlet); every sweep replaces each
inner point by the mean of its four neighbours. Partition ``i`` holds rows ``[lo, hi)``; each round
it sends its first row to partition ``i - 1`` and its last row to ``i + 1`` (the halos) and, from
round 1 on, makes one sweep with the halos it received. The metric is the largest change of a
point. :func:`reference` makes the same sweeps on the whole grid in one process; the arithmetic per
point is the same, so the strips match it to the last bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Step = tuple[dict[str, Any], dict[int, Any], float]  # (new state, {destination: message}, metric)


def plate(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A seeded starting grid: hot top edge, cold bottom edge, random inside."""
    grid = np.random.default_rng(seed).random((h, w))
    grid[0, :], grid[-1, :] = 1.0, 0.0
    return grid


def strips(grid: np.ndarray, parts: int) -> list[dict[str, Any]]:
    bounds = np.linspace(0, grid.shape[0], parts + 1).astype(int)
    return [{"i": i, "n": parts, "lo": int(bounds[i]), "h": int(grid.shape[0]),
             "u": grid[bounds[i]:bounds[i + 1]].copy()} for i in range(parts)]


def _sweep(padded: np.ndarray) -> np.ndarray:
    """One Jacobi sweep of the inner points of ``padded`` (halo rows included); returns its inner rows."""
    new = padded[1:-1].copy()
    new[:, 1:-1] = 0.25 * (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:])
    return new


def step(state: dict[str, Any], inbox: list[tuple[int, Any]], round: int) -> Step:
    """One round for one strip (the service ``heat_step``)."""
    u, i, n = state["u"], int(state["i"]), int(state["n"])
    change = float("inf")
    if round > 0:
        halos = dict(inbox)
        above = halos.get(i - 1, u[:1])  # the plate's own border row has no neighbour: it stays
        below = halos.get(i + 1, u[-1:])
        new = _sweep(np.vstack([np.atleast_2d(above), u, np.atleast_2d(below)]))
        lo = int(state["lo"])
        if lo == 0:
            new[0] = u[0]  # the fixed top border
        if lo + u.shape[0] == int(state["h"]):
            new[-1] = u[-1]  # the fixed bottom border
        change = float(np.max(np.abs(new - u)))
        state["u"] = u = new
    out: dict[int, Any] = {}
    if i > 0:
        out[i - 1] = u[0]
    if i < n - 1:
        out[i + 1] = u[-1]
    return state, out, change


def reference(grid: np.ndarray, sweeps: int) -> np.ndarray:
    u = grid.copy()
    for _ in range(sweeps):
        inner = _sweep(np.vstack([u[:1], u, u[-1:]]))
        inner[0], inner[-1] = u[0], u[-1]
        u = inner
    return u
