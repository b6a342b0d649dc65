"""The same pipeline over tcp:// on loopback with free ports, as across hosts: large arrays
(out-of-band, zero-copy frames) both ways, and a worker that joins after the job started."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tests.conftest import STEADY

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_large_arrays_over_tcp_and_a_late_worker(make_cluster) -> None:  # type: ignore[no-untyped-def]
    front, back = free_port(), free_port()
    c = make_cluster(broker={**STEADY, "frontend": f"tcp://127.0.0.1:{front}", "backend": f"tcp://127.0.0.1:{back}"})
    c.start_broker()
    c.start_worker(processes=1)
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal((1024, 1024)),  # 8 MiB float64
              np.asfortranarray(rng.integers(0, 255, (700, 900), dtype=np.uint8)),
              rng.standard_normal((300, 200)).astype(np.complex64)[::2, ::3]]  # non-contiguous
    with c.master() as m:
        c.wait_slots(m, 1)
        futs = [m.submit("echo", a) for a in arrays * 4]
        c.start_worker(processes=1)  # joins mid-job over tcp
        for fut, a in zip(futs, arrays * 4, strict=True):
            r = fut.result(timeout=60)
            assert r.dtype == a.dtype and r.shape == a.shape and np.array_equal(r, a)
        assert r.flags.writeable
        c.wait_slots(m, 2)
        assert m.submit("echo", arrays[1]).result(timeout=30).flags.f_contiguous  # order kept
