"""Apply each mutation of mutations.yaml to a scratch copy of the repo and run the tests that guard it.

Exit 0 when every mutation turns its tests red, 1 naming each survivor. ``python mutations/run.py [NAME …]``
runs only the named ones. Tests run with the scratch copy first on ``PYTHONPATH``, so an editable install
of the repo itself does not hide the mutation.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


SKIPPED = {".git", "__pycache__", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "dist"}


def _skipped(folder: str, names: list[str]) -> list[str]:
    """What the scratch copy leaves out: version control, caches, builds, benchmark data, outputs."""
    here = Path(folder)
    return [
        n
        for n in names
        if n in SKIPPED
        or n.endswith(".egg-info")
        or (here == ROOT / "bench" and n == "data")
        or (here == ROOT and n == "out")
    ]


def run(mutation: dict[str, str]) -> bool:
    """True when the mutation is killed (its tests fail)."""
    with tempfile.TemporaryDirectory(prefix="phi-rules-mutant-") as scratch:
        copy = Path(scratch) / "repo"
        # symlinks kept: phi_rules/data/rules links to rules/, so a mutated rule is the one the package reads
        shutil.copytree(ROOT, copy, symlinks=True, ignore=_skipped)
        target = copy / mutation["file"]
        text = target.read_text()
        if text.count(mutation["find"]) != 1:
            raise SystemExit(f"{mutation['name']}: {mutation['file']} does not hold its `find` exactly once")
        target.write_text(text.replace(mutation["find"], mutation["replace"]))
        env = {**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        tests = shlex.split(mutation["tests"])
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
        return result.returncode == 1  # 1: tests failed; 5 (nothing collected) or 0 leave the mutant alive


def main(names: list[str]) -> int:
    mutations = yaml.safe_load((ROOT / "mutations" / "mutations.yaml").read_text())
    chosen = [m for m in mutations if not names or m["name"] in names]
    survivors = []
    for m in chosen:
        start = time.monotonic()
        killed = run(m)
        print(f"{'killed ' if killed else 'SURVIVED'}  {m['name']}  ({time.monotonic() - start:.0f} s)", flush=True)
        if not killed:
            survivors.append(m["name"])
    print(f"{len(chosen) - len(survivors)} killed, {len(survivors)} survived")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
