"""A lone call pays no thread hand-off: the thread that waits in ``result()`` runs the master's loop
(sends its SUBMIT, reads its answer) while the loop is free; several waiting threads and callbacks
still get their answers, and waiting inside a callback is refused instead of deadlocking."""

from __future__ import annotations

import threading
from concurrent.futures import Future, as_completed
from typing import Any

import pytest

from ndpipe.errors import NdpipeError

pytestmark = pytest.mark.timeout(90)


def test_a_lone_calls_answer_is_read_by_the_thread_waiting_for_it(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        me, by_me = threading.get_ident(), 0
        for i in range(20):
            resolved_in: list[int] = []
            future = m.submit("echo", i)
            future.add_done_callback(lambda _f, out=resolved_in: out.append(threading.get_ident()))
            assert future.result(timeout=20) == i
            by_me += resolved_in == [me]
        # The loop is free between calls, so the caller reads its own answer (a busy loop, which a
        # loaded machine can cause now and then, makes it wait for the I/O thread instead).
        assert by_me >= 10, f"only {by_me} of 20 answers were read by the waiting thread"


def test_many_threads_waiting_at_once_all_get_their_answers(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        results: dict[int, list[Any]] = {}

        def caller(k: int) -> None:
            results[k] = [m.submit("echo", (k, i)).result(timeout=30) for i in range(30)]

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {k: [[k, i] for i in range(30)] for k in range(6)}
        # and futures nobody calls result() on are answered too (by the I/O thread)
        futures = [m.submit("echo", i) for i in range(50)]
        assert sorted(f.result(0) for f in as_completed(futures, timeout=30)) == list(range(50))


def test_waiting_for_another_result_inside_a_callback_is_refused(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster.master() as m:
        cluster.wait_slots(m, 2)
        other = m.submit("sleep", 0.5, "late")
        outcome: list[object] = []

        def wait_inside(_f: Future[Any]) -> None:
            try:
                outcome.append(other.result(timeout=5))
            except NdpipeError as exc:
                outcome.append(exc)

        first = m.submit("echo", 1)
        first.add_done_callback(wait_inside)
        assert first.result(timeout=20) == 1
        assert other.result(timeout=20) == "late"
        assert len(outcome) == 1
        assert outcome[0] == "late" or (isinstance(outcome[0], NdpipeError) and "callback" in str(outcome[0]))
