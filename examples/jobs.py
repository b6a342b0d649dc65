"""Job functions for ``ndpipe master JOB [ARGS…]``: called with a connected Master."""

from __future__ import annotations

import numpy as np

from ndpipe.master import Master


def normalize_random(master: Master, rows: str = "1000", shards: str = "8") -> str:
    """Normalize a random matrix row-wise on the workers and check it against numpy here."""
    x = np.random.default_rng(0).standard_normal((int(rows), 32))
    y = master.scatter("normalize", x, int(shards))
    expected = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    ok = bool(np.allclose(y, expected))
    return f"normalized {y.shape[0]} rows in {shards} shards: {'OK' if ok else 'MISMATCH'}"
