"""What the wheel carries: every package folder of the source tree (setuptools takes only the listed ones)."""

from __future__ import annotations

import tomllib
from conftest import ROOT


def test_every_package_folder_is_in_the_wheel() -> None:
    """A subpackage missing from pyproject.toml's list installs without error and fails at the first import
    (phi_rules.cli did, once: CI's wheel step caught it, the editable install never does)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "phi_rules").rglob("__init__.py")}
    assert folders == listed
