"""Shared fixtures: the CLI run in-process (real argument parsing and printing) and paths."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
PHI_RULES = [sys.executable, "-m", "phi_rules"]  # the CLI in a process of its own


def run_phi_rules(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``phi-rules ARGS`` as a child process, for what must not share this process (signals, hub settings)."""
    return subprocess.run([*PHI_RULES, *map(str, args)], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)


@pytest.fixture(autouse=True, scope="session")
def digest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source digests are remembered in a folder of this test run's own, never in the user's cache; child
    processes inherit it."""
    folder = tmp_path_factory.mktemp("phi-rules-cache")
    os.environ["PHI_RULES_CACHE"] = str(folder)
    return folder


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``phi-rules ARGS``; returns (exit code, stdout, stderr). argparse's exit 2 is returned too."""
    from phi_rules.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        out, err = capsys.readouterr()
        return code, out, err

    return run
