"""The mutation catalog stays true to the code: every deliberate bug still applies to exactly one
place, and every test said to catch it still exists. (Running the mutations themselves takes
~30 min: ``python -m ndpipe.chaos.mutations``, docs/RELIABILITY.md.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ndpipe.chaos.__main__ import ORDER
from ndpipe.chaos.mutations import MUTATIONS, Mutation, catalog_errors, copy_tree

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


def test_every_mutation_applies_once_and_its_catchers_exist() -> None:
    assert catalog_errors(ROOT) == []
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)


def test_every_chaos_catcher_is_a_scenario_that_runs_in_ci() -> None:
    for mut in MUTATIONS:
        for node in mut.catchers:
            scenario = re.search(r"test_scenario_passes_the_checker\[(\w+)\]", node)
            if scenario:
                assert scenario.group(1) in ORDER and scenario.group(1) != "partition", node


def test_a_mutation_changes_only_its_copy(tmp_path: Path) -> None:
    mut = MUTATIONS[0]
    original = (ROOT / mut.path).read_text()
    path = copy_tree(ROOT, tmp_path / "repo")
    mut.apply(tmp_path / "repo")
    assert (ROOT / mut.path).read_text() == original
    assert (tmp_path / "repo" / mut.path).read_text() == original.replace(mut.old, mut.new)
    assert (path / "ndpipe" / "broker" / "state.py").resolve() == (tmp_path / "repo" / "broker" / "state.py")
    stale = Mutation("stale", "", "", mut.path, "no such text", "", ())
    with pytest.raises(ValueError, match="occurs 0 times"):
        stale.apply(tmp_path / "repo")
