"""Every check class: exit 1, one-line messages naming the keys, and nothing at DIR."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from phi_reference import MsftConfig, config_436, random_state, to_transformers_436, write_checkpoint

PHI2 = ROOT / "rules" / "phi-2.yaml"
CFG = MsftConfig(vocab_size=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)


def rule_variant(tmp_path: Path, changes: str, base: Path = PHI2, name: str = "variant.yaml") -> Path:
    """A rule that extends ``base`` with ``changes`` (YAML), as a user writes a variant."""
    path = tmp_path / name
    path.write_text(f"version: 1\nname: variant\nextends: {base}\n{textwrap.dedent(changes)}")
    return path


def source(tmp_path: Path, **changes: torch.Tensor | None) -> Path:
    state = random_state(CFG, seed=1)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return write_checkpoint(tmp_path / "src", state, CFG)


@pytest.fixture
def refused(cli, tmp_path: Path):
    """``refused(rules, source, *args, expect=[...])``: plan and apply both fail with those lines."""
    return lambda rules, src, *extra, expect: assert_refused(cli, tmp_path, rules, src, *extra, expect=expect)


def assert_refused(cli, tmp_path: Path, rules: Path, src: Path, *extra: str, expect: list[str]) -> str:
    out = tmp_path / "out"
    for command in (["plan", rules, "--source", src, *extra], ["apply", rules, "--source", src, "--out", out, *extra]):
        code, stdout, err = cli(*command)
        assert code == 1, (command, stdout, err)
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        for piece in expect:
            assert any(piece in line for line in lines), (piece, lines)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no partial folder left
    return err


def test_unconsumed_source_key(refused, tmp_path: Path) -> None:
    src = source(tmp_path, **{"transformer.h.0.mixer.extra.weight": torch.zeros(3)})
    refused(
        PHI2,
        src,
        expect=["1 source tensor(s) consumed by no step (rename or drop them): transformer.h.0.mixer.extra.weight"],
    )


def test_two_sources_one_output(refused, tmp_path: Path) -> None:
    rules = rule_variant(
        tmp_path,
        """
        edit_steps:
          - name: mlp
            before: names
            rename: {'transformer.h.{i}.mlp.{fc}.{p}': 'model.layers.{i}.mlp.fc1.{p}'}
        """,
    )
    refused(
        rules,
        source(tmp_path),
        expect=[
            "step 'mlp': two sources produce one output name 'model.layers.0.mlp.fc1.bias': "
            "transformer.h.0.mlp.fc1.bias and transformer.h.0.mlp.fc2.bias"
        ],
    )


def test_dead_rule(refused, tmp_path: Path) -> None:
    rules = rule_variant(tmp_path, "edit_steps: [{name: drop-rotary-buffers, drop: '.*rotary_emb.*'}]")
    err = refused(
        rules,
        source(tmp_path),
        expect=[
            "step 'drop-rotary-buffers': matched no tensor (a dead rule; add `optional: true` if that is expected)"
        ],
    )
    errors = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert errors[0].startswith(f"{rules}:")  # located in the rule file


def test_split_sizes_do_not_fit(refused, tmp_path: Path) -> None:
    rules = rule_variant(tmp_path, "let: {kv_size: hidden_size // num_attention_heads * num_key_value_heads + 1}")
    refused(
        rules,
        source(tmp_path),
        expect=[
            "step 'split-qkv': for transformer.h.0.mixer.Wqkv.weight: sizes [64, 65, 65] add up to 194, but dim 0 of "
            "shape [192, 64] is 192"
        ],
    )


def test_view_does_not_divide(refused, tmp_path: Path) -> None:
    cfg = MsftConfig(vocab_size=48, n_embd=64, n_layer=1, n_head=4, rotary_dim=8)
    src = write_checkpoint(tmp_path / "src436", to_transformers_436(random_state(cfg, seed=3), cfg), None)
    (src / "config.json").write_text(json.dumps(config_436(cfg)))
    refused(
        ROOT / "rules" / "transformers-4.36.yaml",
        src,
        "--set",
        "num_attention_heads=5",
        expect=[
            "step 'split-qkv': for model.layers.0.self_attn.query_key_value.bias: view(5, 3, -1) does not fit "
            "input shape [192]"
        ],
    )


def test_target_missing_parameter(refused, tmp_path: Path) -> None:
    src = source(tmp_path, **{"lm_head.linear.bias": None})
    refused(
        PHI2,
        src,
        expect=["PhiForCausalLM expects 1 parameter(s) the plan does not produce: lm_head.bias"],
    )


def test_target_unexpected_parameters(refused, tmp_path: Path) -> None:
    err = refused(
        PHI2,
        source(tmp_path),
        "--set",
        "n_layer=1",
        expect=["the plan produces 14 tensor(s) PhiForCausalLM does not have: model.layers.1."],
    )
    assert "model.layers.1.self_attn.q_proj.weight" in err


def test_target_wrong_shape(refused, tmp_path: Path) -> None:
    refused(
        PHI2,
        source(tmp_path),
        "--set",
        "n_inner=100",
        expect=[
            "6 tensor(s) have the wrong shape for PhiForCausalLM: model.layers.0.mlp.fc1.weight [256, 64] "
            "(expected [100, 64])"
        ],
    )


def test_unknown_target_config_field_is_reported_at_its_own_line(refused, tmp_path: Path) -> None:
    rules = rule_variant(tmp_path, "target:\n  config:\n    eos_token_id: 0\n    hiden_act: '\"gelu\"'\n")
    refused(
        rules,
        source(tmp_path),
        expect=[
            f"{rules}:7:16: target/config/hiden_act: PhiConfig has no field 'hiden_act'; did you mean 'hidden_act'?"
        ],
    )


def test_config_typo_in_a_base_is_reported_in_the_base(refused, tmp_path: Path) -> None:
    base = rule_variant(tmp_path, "target:\n  config:\n    layer_norm_epsilon: 0.5\n", name="base.yaml")
    rules = rule_variant(tmp_path, "description: a variant of a variant\n", base=base)
    refused(
        rules,
        source(tmp_path),
        expect=[f"{base}:6:25: target/config/layer_norm_epsilon: PhiConfig has no field 'layer_norm_epsilon'"],
    )


def test_already_converted_source_says_so(refused, cli, tmp_path: Path) -> None:
    converted = tmp_path / "converted"
    assert cli("apply", PHI2, "--source", source(tmp_path), "--out", converted)[0] == 0
    err = refused(
        PHI2,
        converted,
        expect=[
            "the source is already in transformers' PhiForCausalLM layout (33 of 33 source tensor names are its "
            "parameter names): it needs no conversion"
        ],
    )
    errors = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert len(errors) == 1  # that one line, not dozens of dead rules and unknown keys


def test_several_problems_reported_together(refused, tmp_path: Path) -> None:
    src = source(tmp_path, **{"transformer.stray": torch.zeros(1), "lm_head.linear.bias": None})
    refused(PHI2, src, expect=["consumed by no step", "does not produce: lm_head.bias"])


def test_existing_folder_needs_force(cli, tmp_path: Path) -> None:
    src = source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, err = cli("apply", PHI2, "--source", src, "--out", out)
    assert code == 1 and "folder exists and is not empty (use --force to replace a previous output)" in err
    assert (out / "keep.txt").read_text() == "old"
    code, _, err = cli("apply", PHI2, "--source", src, "--out", out, "--force")  # not ours: --force is not enough
    assert code == 1 and "'keep.txt', which phi-rules does not write" in err
    assert (out / "keep.txt").read_text() == "old"
    (out / "keep.txt").unlink()
    assert cli("apply", PHI2, "--source", src, "--out", out, "--force")[0] == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["apply", PHI2],
        ["plan"],
        ["apply", PHI2, "--out", "x", "--set", "1=2"],
        ["apply", PHI2, "--out", "x", "--device", "gpu"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(cli, args: list[object]) -> None:
    code, _, err = cli(*args)
    assert code == 2 and "usage: phi-rules" in err


def test_help_teaches(cli) -> None:
    code, out, _ = cli("--help")
    assert code == 0 and "examples:" in out and "phi-rules apply --source ./my-phi-checkpoint --out converted" in out
    assert all(f"phi-rules {c}" in out for c in ("detect", "verify", "plan", "validate", "list"))
    code, out, _ = cli("apply", "--help")
    assert code == 0 and "--max-shard-size" in out and "nothing is left at --out" in " ".join(out.split())


@pytest.mark.parametrize("option", ["--set", "--dtype", "--tokenizer"])
def test_verify_offers_nothing_it_would_ignore(cli, option: str) -> None:
    code, out, _ = cli("verify", "--help")
    assert code == 0 and option not in out
    code, _, err = cli("verify", "--source", "src", "out", option, "x")
    assert code == 2 and "unrecognized arguments" in err
