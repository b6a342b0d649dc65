"""The chaos scenarios, CI-sized: each injects its fault into real processes and must pass the
checker (nothing lost, duplicated, unexpected or wrong; only the errors the scenario demands) and
its recovery bounds. The full-sized runs are ``python -m ndpipe.chaos --all`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import pytest

from ndpipe.chaos.__main__ import ORDER, main, scenarios
from ndpipe.chaos.handlers import expected
from ndpipe.chaos.scenarios import Params
from tests.conftest import in_ci

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("name", [n for n in ORDER if n != "partition"])
def test_scenario_passes_the_checker(name: str) -> None:
    report = scenarios()[name](Params(short=True, seed=7))
    print(report.table())
    assert report.passed, report.table()


@pytest.mark.root
def test_network_partition_between_namespace_hosts() -> None:
    from ndpipe.chaos.partition import available

    reason = available()
    if reason:
        if in_ci():
            pytest.fail(f"the partition scenario must run in CI: {reason}")
        pytest.skip(reason)
    report = scenarios()["partition"](Params(short=True, seed=7))
    print(report.table())
    assert report.passed, report.table()


def test_cli_runs_a_scenario_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker_oom", "--short", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "worker_oom" in out and "PASS" in out and "1 of 1 scenarios passed" in out
    with pytest.raises(SystemExit) as info:
        main(["no_such_scenario"])
    assert info.value.code == 2


def test_the_checker_catches_every_kind_of_fault() -> None:
    from concurrent.futures import Future

    from ndpipe.chaos.checker import History, Report, restarts_after
    from ndpipe.errors import TaskTimeout

    hist = History()
    for tid in range(6):
        hist.submitted(tid, 8)
    hist.deliver(0, [0, expected(0, 8)])  # ok
    hist.deliver(1, [1, expected(1, 8)])  # ok, then delivered again: duplicated
    hist.deliver(1, [1, expected(1, 8)])
    hist.deliver(2, [2, expected(2, 8) + 1e-9])  # wrong value
    hist.deliver(3, [4, expected(4, 8)])  # another task's answer: unexpected
    hist.deliver(99, [99, 0.0])  # nobody submitted 99: unexpected
    hist.deliver(4, TaskTimeout("late"))  # an error; 5 never answered: lost
    future: Future[object] = Future()
    hist.track(6, 8, future)
    future.set_result([6, expected(6, 8)])
    report = hist.check(Report("unit", "nothing"))
    assert (report.ok, report.duplicated, report.wrong, report.unexpected, report.lost) == (3, 1, 1, 2, 1)
    assert report.errors == {"TaskTimeout": 1} and not report.passed
    report.expected_errors = {"TaskTimeout": 1}
    assert not report.passed  # the lost, wrong, duplicated and unexpected answers still fail it
    clean = History()
    clean.submitted(0, 8)
    clean.deliver(0, TaskTimeout("x"))
    assert not clean.check(Report("u", "")).passed  # an error nobody expected fails the run
    assert clean.check(Report("u", "", expected_errors={"TaskTimeout": 1})).passed
    starts = {10: [(1, 1.0), (2, 2.0)], 11: [(3, 1.5), (2, 2.7)]}
    assert restarts_after(starts, {10}, 2.5) == ({2}, [pytest.approx(0.2)])


def test_a_run_fails_on_a_missed_bound_a_missing_sample_or_an_unsubmitted_task() -> None:
    from ndpipe.chaos.checker import History, Report

    hist = History()
    for tid in range(3):
        hist.submitted(tid, 8)
        hist.deliver(tid, [tid, expected(tid, 8)])
    ok = hist.check(Report("u", "", recovery={"requeue s": [0.1, 0.4]}, bounds={"requeue s": 0.5}, planned=3))
    assert ok.passed and "bound 0.5: ok" in ok.table()
    assert not hist.check(Report("u", "", recovery={"requeue s": [0.6]}, bounds={"requeue s": 0.5})).passed
    no_sample = hist.check(Report("u", "", recovery={"requeue s": []}, bounds={"requeue s": 0.5}))
    assert not no_sample.passed and "no sample  (bound 0.5: FAILED)" in no_sample.table()
    stalled = hist.check(Report("u", "", planned=4))  # the submitter stopped one task short
    assert not stalled.passed and "3 of 4 planned (FAILED)" in stalled.table()


def test_reruns_are_allowed_only_for_tasks_under_way_at_a_crash() -> None:
    from ndpipe.chaos.checker import History, Report
    from ndpipe.chaos.scenarios import check_reruns

    hist = History()
    for tid in range(4):
        hist.submitted(tid, 8)
    hist.first_at.update({0: 5.0, 1: 5.0, 2: 9.0, 3: 3.5})
    # Killed at 4.0, restarted at 4.3. Task 0 ran before the restart and again after: fine; task 1
    # first ran after the restart, so the new broker handed it out twice: a duplicate.
    crash = [(4.0, 4.3)]
    starts = {10: [(0, 3.9), (2, 8.0)], 11: [(0, 4.2), (1, 4.5), (1, 4.6)]}
    report = Report("u", "")
    check_reruns(report, hist, starts, crash, slots=4, late=1)
    assert not report.passed
    report = Report("u", "")
    check_reruns(report, hist, {10: [(0, 3.9)], 11: [(0, 4.2)]}, crash, slots=4, late=1)
    assert report.passed
    # in flight to the worker at the kill: it starts just after it, still handed out by the dead broker
    report = Report("u", "")
    check_reruns(report, hist, {10: [(0, 4.05)], 11: [(0, 4.4)]}, crash, slots=4, late=1)
    assert report.passed
    report = Report("u", "")
    check_reruns(report, hist, {10: [(3, 3.0)], 11: [(3, 4.4)]}, crash, slots=4, late=0)
    assert not report.passed  # answered at 3.5, before the crash: its answer was not lost
    report = Report("u", "")
    check_reruns(report, hist, {10: [(0, 3.9)], 11: [(0, 4.2)]}, crash, slots=4, late=2)
    assert not report.passed  # a late answer without a second run


def test_cli_counts_a_skipped_scenario_as_not_passed(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import ndpipe.chaos.partition as partition

    monkeypatch.setattr(partition, "available", lambda: "no root here (test)")
    assert main(["partition", "--short"]) == 3
    out = capsys.readouterr().out
    assert "SKIPPED (not passed): no root here (test)" in out and "0 of 1 scenarios passed; SKIPPED: partition" in out
