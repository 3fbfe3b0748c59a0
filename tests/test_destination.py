"""Where the output goes (#22 data loss): --out never touches the source, --force replaces only a previous
output of ours, and what killed runs left beside --out is cleared by the next run, not by a live one.

Each case checks the source and a neighbouring file byte for byte afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT
from phi_reference import MsftConfig, random_state, write_checkpoint

CFG = MsftConfig(vocab_size=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
PHI2 = str(ROOT / "rules" / "phi-2.yaml")
Cli = Callable[..., tuple[int, str, str]]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """ptest/src (a checkpoint) beside ptest/important/notes.txt."""
    write_checkpoint(tmp_path / "ptest" / "src", random_state(CFG, seed=1), CFG)
    (tmp_path / "ptest" / "important").mkdir()
    (tmp_path / "ptest" / "important" / "notes.txt").write_text("do not lose me\n")
    return tmp_path / "ptest"


@pytest.mark.parametrize(
    ("out", "says"),
    [
        ("src", "--out is the source"),
        (".", "--out contains the source"),
        ("src/converted", "--out lies inside the source"),
    ],
    ids=["out-is-source", "out-contains-source", "out-inside-source"],
)
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_out_touching_the_source_is_refused(cli: Cli, tree: Path, out: str, says: str, force: bool) -> None:
    before = snapshot(tree)
    code, _, err = cli("apply", PHI2, "--source", tree / "src", "--out", tree / out, *(["--force"] if force else []))
    assert code == 1 and says in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tree) == before  # nothing removed, nothing added (no lock, no partial folder)


def test_out_dot_in_the_source_folder_is_refused(cli: Cli, tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(tree)
    monkeypatch.chdir(tree / "src")
    code, _, err = cli("apply", PHI2, "--source", ".", "--out", ".", "--force")
    assert code == 1 and "--out is the source" in err, err
    assert snapshot(tree) == before


def test_out_reaching_the_source_through_a_symlink_is_refused(cli: Cli, tree: Path) -> None:
    """As in the HF cache: a snapshot folder of links into blobs/. --out the blobs folder destroys the weights."""
    blobs = tree / "blobs"
    (tree / "src").rename(blobs)
    snap = tree / "snapshot"
    snap.mkdir()
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    before = snapshot(tree)
    code, _, err = cli("apply", PHI2, "--source", snap, "--out", blobs, "--force")
    assert code == 1 and "--out contains the source" in err, err
    assert snapshot(tree) == before
    link = tree / "link-to-snapshot"
    link.symlink_to(snap)
    code, _, err = cli("apply", PHI2, "--source", snap, "--out", link, "--force")
    assert code == 1 and "--out is the source" in err, err
    assert snapshot(tree) == before


def test_out_dot_elsewhere_converts_into_the_current_folder(
    cli: Cli, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tree / "empty").mkdir()
    monkeypatch.chdir(tree / "empty")
    code, _, err = cli("apply", PHI2, "--source", tree / "src", "--out", ".", "--quiet")
    assert code == 0, err
    assert (tree / "empty" / "model.safetensors").is_file()
    assert [p.name for p in tree.iterdir() if p.name.startswith(".")] == []  # no ..old-*, no lock


def test_force_refuses_a_folder_that_is_not_our_output(cli: Cli, tree: Path) -> None:
    (tree / "out").mkdir()
    (tree / "out" / "config.json").write_text("{}")
    (tree / "out" / "thesis.tex").write_text("years of work\n")
    before = snapshot(tree)
    code, _, err = cli("apply", PHI2, "--source", tree / "src", "--out", tree / "out", "--force")
    assert code == 1 and "'thesis.tex', which phi-rules does not write" in err and "remove it yourself" in err, err
    assert snapshot(tree) == before


def test_force_refuses_weights_someone_else_wrote(cli: Cli, tree: Path) -> None:
    """The source folder's own shape (config.json, model.safetensors) is not ours: --force does not replace it."""
    other = tree / "other"
    write_checkpoint(other, random_state(CFG, seed=2), CFG)
    before = snapshot(tree)
    code, _, err = cli("apply", PHI2, "--source", tree / "src", "--out", other, "--force")
    assert code == 1 and "its weights were not written by phi-rules" in err, err
    assert snapshot(tree) == before


def test_force_replaces_a_previous_output(cli: Cli, tree: Path) -> None:
    out = tree / "out"
    assert cli("apply", PHI2, "--source", tree / "src", "--out", out, "--quiet")[0] == 0
    first = snapshot(out)
    write_checkpoint(tree / "src", random_state(CFG, seed=3), CFG)
    code, _, err = cli("apply", PHI2, "--source", tree / "src", "--out", out, "--force", "--quiet")
    assert code == 0, err
    assert snapshot(out) != first and (tree / "important" / "notes.txt").read_text() == "do not lose me\n"


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(cli: Cli, tree: Path) -> None:
    for name in (".out.partial-killed1", ".out.partial-killed2", ".out.old-killed"):
        (tree / name).mkdir()
        (tree / name / "model.safetensors").write_bytes(b"half")
    (tree / ".out.lock").write_text("")  # its lock file, but no process holds the lock any more
    (tree / ".other.partial-x").mkdir()  # another output's: not ours to judge
    code, _, err = cli("apply", PHI2, "--source", tree / "src", "--out", tree / "out")
    assert code == 0, err
    assert "removed 3 unfinished folder(s) that killed runs left" in err
    assert sorted(p.name for p in tree.iterdir() if p.name.startswith(".")) == [".other.partial-x"]


def test_a_live_runs_partial_folder_is_left_alone(cli: Cli, tree: Path) -> None:
    """While another run holds the lock, its partial folder is its own: this run stops and touches nothing."""
    from filelock import FileLock

    partial = tree / ".out.partial-live"
    partial.mkdir()
    with FileLock(tree / ".out.lock", timeout=0):
        code, _, err = cli("apply", PHI2, "--source", tree / "src", "--out", tree / "out")
    assert code == 1 and "another phi-rules apply is writing this folder" in err, err
    assert partial.is_dir()
    os.rmdir(partial)
