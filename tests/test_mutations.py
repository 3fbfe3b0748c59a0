"""The kept mutations stay applicable: each `find` still stands exactly once in its file. (Whether each one is
killed is mutations/run.py's job, in CI; a stale entry is caught here, in seconds.)"""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

MUTATIONS = yaml.safe_load((ROOT / "mutations" / "mutations.yaml").read_text())


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m["name"] for m in MUTATIONS])
def test_each_mutation_still_applies(mutation: dict[str, str]) -> None:
    text = (ROOT / mutation["file"]).read_text()
    assert text.count(mutation["find"]) == 1, f"{mutation['file']} no longer holds this `find` exactly once"
    assert mutation["find"] != mutation["replace"] and mutation["tests"].startswith("tests/")


def test_mutation_names_are_unique() -> None:
    names = [m["name"] for m in MUTATIONS]
    assert len(names) == len(set(names)) and len(names) >= 30
