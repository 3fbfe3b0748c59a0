"""The pre-commit hook, as a rule author's repository uses it: `pre-commit try-repo` on a temporary git repo.

The hook's environment holds PyYAML and jsonschema only: validating must not pull torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

GOOD = """\
# yaml-language-server: $schema=https://phi-rules.dev/schemas/phi-rules.schema.json
version: 1
name: my-finetune
extends: phi-msft       # a shipped rule (the phi-msft base), by name
source: {path: weights}
"""


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_hook_validates_rule_files_without_torch(tmp_path: Path) -> None:
    exe = shutil.which("pre-commit")
    if exe is None:
        pytest.fail("pre-commit is not installed: it is in the test extra")
    repo = tmp_path / "author"
    (repo / "rules").mkdir(parents=True)
    (repo / "rules" / "mine.yaml").write_text(GOOD)
    (repo / "rules" / "broken.yaml").write_text(GOOD.replace("extends: phi-msft", "extends: phi-mfst"))
    (repo / "notes.yaml").write_text("not: [a rule")  # outside rules/: the hook leaves it alone
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRE_COMMIT", "VIRTUAL_ENV", "PYTHON"))}
    env |= {"PRE_COMMIT_HOME": str(tmp_path / "cache"), "PHI_RULES_HOOK_ENV": str(tmp_path / "hook-env")}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for git in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-qm", "rules"]):
        assert _run(git, repo, env).returncode == 0
    run = _run([exe, "try-repo", str(ROOT), "phi-rules-validate", "--all-files"], repo, env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "rules/broken.yaml:4:10: extends: base rule 'phi-mfst' not found; did you mean 'phi-msft'?" in run.stdout
    assert "mine.yaml:" not in run.stdout and "notes.yaml" not in run.stdout
    hook_python = tmp_path / "hook-env" / "bin" / "python"
    assert _run([str(hook_python), "-c", "import torch"], repo, env).returncode != 0  # no torch in it

    (repo / "rules" / "broken.yaml").write_text(GOOD)
    assert _run(["git", "commit", "-qam", "fix"], repo, env).returncode == 0
    run = _run([exe, "try-repo", str(ROOT), "phi-rules-validate", "--all-files"], repo, env)
    assert run.returncode == 0, run.stdout + run.stderr
