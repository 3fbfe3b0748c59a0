"""Source sha256s: computed beside the copy, remembered by file identity, never trusted for a changed file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from phi_reference import MsftConfig, random_state, write_checkpoint
from safetensors import safe_open

import phi_rules
from phi_rules.source import digest

PHI2 = ROOT / "rules" / "phi-2.yaml"
CFG = MsftConfig(vocab_size=96, n_layer=2)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "src", random_state(CFG, torch.float16, seed=11), CFG)


def recorded(out: Path) -> dict[str, str]:
    with safe_open(out / "model.safetensors", "pt") as f:
        return json.loads(f.metadata()["phi_rules.source_sha256"])


def convert(rules: Path, source: Path, out: Path) -> None:
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=source))
    phi_rules.convert(phi_rules.load_rules(rules), out, options)


def flip_a_byte_keeping_size_and_mtime(path: Path) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


def test_a_digest_is_remembered_until_the_file_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: Path
) -> None:
    monkeypatch.setenv("PHI_RULES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digest, "FRESH_S", 0.0)  # the file was written a moment ago
    weights = source / "model.safetensors"
    convert(PHI2, source, tmp_path / "o1")
    true = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert recorded(tmp_path / "o1") == {"model.safetensors": true}
    (entry,) = (tmp_path / "cache" / "sha256").iterdir()
    assert entry.read_text().strip() == true
    entry.write_text("f" * 64 + "\n")  # what the next run reads instead of hashing the file
    convert(PHI2, source, tmp_path / "o2")
    assert recorded(tmp_path / "o2") == {"model.safetensors": "f" * 64}
    flip_a_byte_keeping_size_and_mtime(weights)  # its ctime still moves: a new identity
    convert(PHI2, source, tmp_path / "o3")
    assert (
        recorded(tmp_path / "o3")
        == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
        != {"model.safetensors": true}
    )


def test_a_file_changed_moments_ago_is_not_remembered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: Path
) -> None:
    """It may change again within the same timestamp tick, keeping its identity."""
    monkeypatch.setenv("PHI_RULES_CACHE", str(tmp_path / "cache"))
    convert(PHI2, source, tmp_path / "out")
    assert recorded(tmp_path / "out") == {
        "model.safetensors": hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    }
    assert not (tmp_path / "cache" / "sha256").exists()  # the target check is remembered; the digest is not


@pytest.mark.parametrize("cache", ["", "a-file/cache"])
def test_no_cache_or_an_unwritable_one_only_means_hashing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: Path, cache: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("PHI_RULES_CACHE", str(tmp_path / cache) if cache else "")
    monkeypatch.setattr(digest, "FRESH_S", 0.0)
    convert(PHI2, source, tmp_path / "out")
    assert recorded(tmp_path / "out") == {
        "model.safetensors": hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    }


def test_a_remembered_digest_never_vouches_for_a_changed_pinned_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: Path
) -> None:
    monkeypatch.setenv("PHI_RULES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digest, "FRESH_S", 0.0)
    weights = source / "model.safetensors"
    pin = hashlib.sha256(weights.read_bytes()).hexdigest()
    rule = tmp_path / "pinned.yaml"
    rule.write_text(
        f"version: 1\nname: pinned\nextends: {PHI2}\nsource: {{files: [{{name: model.safetensors, sha256: {pin}}}]}}\n"
    )
    convert(rule, source, tmp_path / "o1")  # checked, and remembered
    assert [e.read_text().strip() for e in (tmp_path / "cache" / "sha256").iterdir()] == [pin]
    flip_a_byte_keeping_size_and_mtime(weights)
    with pytest.raises(phi_rules.PhiRulesError, match=f"model.safetensors: sha256 mismatch: the rule pins {pin}"):
        convert(rule, source, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "o1", "pinned.yaml", "src"]


# --- the target check, remembered ---------------------------------------------------------------------
IMPORTS = """
import sys
from phi_rules.cli import main
code = main(sys.argv[1:])
print(code, "transformers" in sys.modules, "torch" in sys.modules)
"""


def _apply_in_child(source: Path, out: Path, cache: Path) -> list[str]:
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", IMPORTS, "apply", str(PHI2), "--source", str(source), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PHI_RULES_CACHE": str(cache)},
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_a_passed_target_check_is_remembered(source: Path, tmp_path: Path) -> None:
    """The same shape again (another fine-tune of a model converted before): neither transformers nor torch
    is imported, and the config files are the same bytes."""
    cache = tmp_path / "cache"
    assert _apply_in_child(source, tmp_path / "a", cache) == ["0", "True", "True"]
    other = write_checkpoint(tmp_path / "finetune", random_state(CFG, torch.float16, seed=12), CFG)
    assert _apply_in_child(other, tmp_path / "b", cache) == ["0", "False", "False"]
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_remembered_check_is_only_used_for_the_same_plan(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _apply_in_child(source, tmp_path / "a", cache)
    bigger = MsftConfig(vocab_size=96, n_layer=3)
    other = write_checkpoint(tmp_path / "deeper", random_state(bigger, torch.float16, seed=12), bigger)
    assert _apply_in_child(other, tmp_path / "b", cache)[1] == "True"  # another shape: checked again
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"] == 3
    for entry in (cache / "checked").iterdir():
        entry.write_text("{broken")
    assert _apply_in_child(source, tmp_path / "c", cache)[1] == "True"  # an unreadable entry: checked again


def test_a_remembered_check_still_refuses_what_the_model_would_use_otherwise(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same rule, outputs and config, another meaning: head_dim 10, rotary_dim 4 gives partial_rotary_factor 0.4;
    a rotary_dim 6 source given --set partial_rotary_factor=0.4 plans the same config, but the model would rotate
    4 dimensions where the source rotates 6. Refused with no cache, and after a remembered run alike."""
    four, six = (MsftConfig(vocab_size=96, n_embd=40, n_head=4, rotary_dim=r) for r in (4, 6))
    src4 = write_checkpoint(tmp_path / "src4", random_state(four, seed=1), four)
    src6 = write_checkpoint(tmp_path / "src6", random_state(six, seed=2), six)
    wrong = ("apply", PHI2, "--source", src6, "--set", "partial_rotary_factor=0.4", "--quiet", "--out")
    for cache in ("", str(tmp_path / "cache")):
        monkeypatch.setenv("PHI_RULES_CACHE", cache)
        assert cli("apply", PHI2, "--source", src4, "--out", tmp_path / f"a{bool(cache)}", "--quiet")[0] == 0
        code, _, err = cli(*wrong, tmp_path / f"b{bool(cache)}")
        assert code == 1 and "would use model.layers.0.self_attn.rotary_ndims = 4 where the source means 6" in err
        assert not (tmp_path / f"b{bool(cache)}").exists()


def test_the_remembered_key_holds_everything_the_check_compares(source: Path) -> None:
    """The direction, the rule's text, the values target.uses compares, the config, the outputs, the dtype:
    a change in any of them is another check."""
    from dataclasses import replace

    from phi_rules.planning import remembered

    options = phi_rules.Options(source=phi_rules.SourceOptions(source=source))
    plan = phi_rules.plan(phi_rules.load_rules(PHI2), options)
    first = remembered.key(plan, "float16")
    assert first is not None and first == remembered.key(plan, "float16")
    tensors = [replace(plan.tensors[0], shape=(1, *plan.tensors[0].shape)), *plan.tensors[1:]]
    others = [
        replace(plan, rules=replace(plan.rules, backward=True)),
        replace(plan, rules=replace(plan.rules, sha256="0" * 64)),
        replace(plan, uses={name: 2 * value for name, value in plan.uses.items()}),  # type: ignore[operator]
        replace(plan, config={**plan.config, "partial_rotary_factor": 0.25}),
        replace(plan, tensors=tensors),
    ]
    assert plan.uses and len({first, *(remembered.key(p, "float16") for p in others)}) == 1 + len(others)
    assert remembered.key(plan, "bfloat16") != first
