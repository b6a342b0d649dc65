"""The chaos scenarios, CI-sized: each injects its fault into real processes and must pass the
checker (nothing lost, duplicated, unexpected or wrong; only the errors the scenario demands) and
its recovery bounds. The full-sized runs are ``python -m ndpipe.chaos --all`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import pytest

from ndpipe.chaos.__main__ import ORDER, main, scenarios
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
    from ndpipe.chaos.handlers import expected
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
