"""``python -m ndpipe.chaos SCENARIO [--tasks N] [--seed S] [--short]`` or ``--all``.

Runs each scenario on its own fresh cluster and prints the checker's table. Exit status 1 if any
scenario failed (a lost, duplicated, unexpected or wrong answer, an unexpected error, fewer tasks
submitted than planned, or a recovery bound missed or without a sample); 3 if none failed but one
was skipped (the partition scenario without root): a skipped scenario is not a passed one.
``--short`` runs the CI-sized variants (seconds each).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from ndpipe.chaos.checker import Report
from ndpipe.chaos.scenarios import Params

MODULES = ("ndpipe.chaos.scenarios", "ndpipe.chaos.partition", "ndpipe.chaos.load", "ndpipe.chaos.links",
           "ndpipe.chaos.stages", "ndpipe.chaos.iterations", "ndpipe.chaos.spool")
ORDER = ("workers_killed", "worker_frozen", "task_hangs", "broker_crashes", "partition", "master_dies",
         "overload", "garbage", "worker_oom", "master_frozen", "master_link_cut", "master_link_silent",
         "pipeline_killed", "cache_pressure", "stream_killed", "iterate_lane_killed", "iterate_worker_frozen",
         "iterate_master_killed", "spool_killed")


def scenarios() -> dict[str, Callable[[Params], Report]]:
    found: dict[str, Callable[[Params], Report]] = {}
    for name in MODULES:
        found.update(importlib.import_module(name).SCENARIOS)
    return {k: found[k] for k in sorted(found, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))}


def main(argv: list[str] | None = None) -> int:
    table = scenarios()
    ap = argparse.ArgumentParser(prog="python -m ndpipe.chaos", description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("scenario", nargs="?", choices=sorted(table), help="the scenario to run")
    ap.add_argument("--all", action="store_true", help="run every scenario in turn")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per job (default: the scenario's)")
    ap.add_argument("--seed", type=int, default=1, help="seed of every random choice (replay a failure with it)")
    ap.add_argument("--short", action="store_true", help="the CI-sized variant (seconds)")
    args = ap.parse_args(argv)
    if not args.all and not args.scenario:
        ap.error("name a scenario or pass --all")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = list(table) if args.all else [args.scenario]
    failed, skipped = [], []
    for name in names:
        print(f"\n===== {name} (seed {args.seed}{', short' if args.short else ''}) =====", flush=True)
        if name == "partition":
            from ndpipe.chaos.partition import available
            reason = available()
            if reason:
                print(f"SKIPPED (not passed): {reason}")
                skipped.append(name)
                continue
        report = table[name](Params(tasks=args.tasks, seed=args.seed, short=args.short))
        print(report.table(), flush=True)
        if not report.passed:
            failed.append(name)
    passed = len(names) - len(failed) - len(skipped)
    print(f"\n{passed} of {len(names)} scenarios passed" + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + (f"; SKIPPED: {', '.join(skipped)}" if skipped else ""))
    return 1 if failed else 3 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
