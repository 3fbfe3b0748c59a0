"""The documentation is checked like code (#32).

The tutorial's rule (docs/examples/wpack-to-llama.yaml, a model phi-rules does not ship) is proven by
function: a random checkpoint with one fused ``W_pack`` of [q; k; v], converted by the CLI, loaded strictly
as ``LlamaForCausalLM``, gives the logits of transformers' Llama on the unfused weights. The generated
reference (docs/reference/) must be what docs/gen_reference.py writes today, the schema describes every key,
and the README keeps its promises: short, the common commands on its first screen, its links alive.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file
from transformers.models.llama import configuration_llama, modeling_llama
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()

Cli = Callable[..., tuple[int, str, str]]
WPACK_RULE = ROOT / "docs" / "examples" / "wpack-to-llama.yaml"
SIZES = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def llama(seed: int = 0) -> modeling_llama.LlamaForCausalLM:
    """The reference: transformers' Llama, random, with the sizes of the W_pack checkpoint."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = configuration_llama.LlamaConfig(**SIZES)
    model = modeling_llama.LlamaForCausalLM(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def wpack_checkpoint(model: torch.nn.Module, folder: Path, config: dict[str, object]) -> Path:
    """The reference's weights in the W_pack layout: q, k and v of each layer fused as rows [q; k; v], the
    rotary buffers that older saves carry, and a Baichuan-7B-style config.json."""
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    for i in range(SIZES["num_hidden_layers"]):
        at = f"model.layers.{i}.self_attn."
        parts = [state.pop(f"{at}{p}_proj.weight") for p in "qkv"]
        state[f"{at}W_pack.weight"] = torch.cat(parts)
        state[f"{at}rotary_emb.inv_freq"] = torch.ones(SIZES["hidden_size"] // SIZES["num_attention_heads"] // 2)
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def baichuan_config(**changes: object) -> dict[str, object]:
    config: dict[str, object] = {
        "architectures": ["BaiChuanForCausalLM"],
        "model_type": "baichuan",
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        **SIZES,
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def logits(model: torch.nn.Module, n: int) -> torch.Tensor:
    ids = torch.randint(0, SIZES["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        return model(ids).logits.float()


def test_wpack_tutorial_rule_converts_exactly(cli: Cli, tmp_path: Path) -> None:
    reference = llama()
    src = wpack_checkpoint(reference, tmp_path / "wpack", baichuan_config())
    code, _, err = cli("apply", WPACK_RULE, "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    converted, info = modeling_llama.LlamaForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, dtype=torch.float32
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    for n in (7, 33):
        delta = (logits(reference, n) - logits(converted.eval(), n)).abs().max().item()
        assert delta <= 1e-5, (n, delta)


def test_wpack_tutorial_rule_refuses_alibi(cli: Cli, tmp_path: Path) -> None:
    src = wpack_checkpoint(llama(), tmp_path / "wpack", baichuan_config(max_position_embeddings=None))
    code, _, err = cli("apply", WPACK_RULE, "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and "refused: config.json has no max_position_embeddings" in err, err
    assert not (tmp_path / "out").exists()


def test_tutorial_shows_the_tested_rule() -> None:
    """Each piece of the rule that the tutorial shows is a piece of the tested file, line for line."""
    rule = {line.strip() for line in WPACK_RULE.read_text().splitlines()}
    tutorial = (ROOT / "docs" / "rules" / "writing-a-rule.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", tutorial, re.S)
    assert len(blocks) >= 5
    for block in blocks:
        for line in block.splitlines():
            assert "…" in line or "--8<--" in line or line.strip() in rule, line


def test_generated_reference_is_up_to_date() -> None:
    """docs/reference/ mirrors the schema, the parser and the docstrings: a change to any of them without
    `python docs/gen_reference.py` fails here, naming the pages."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_reference.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_every_schema_key_is_described() -> None:
    """The rule language reference is generated from the schema's descriptions: none may be missing."""
    schema = json.loads((ROOT / "schemas" / "phi-rules.schema.json").read_text())
    undescribed = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, child in node.get("properties", {}).items():
                if "description" not in child:
                    undescribed.append(f"{path}/properties/{key}")
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    walk(schema, "#")
    assert not undescribed, undescribed


def test_reference_names_every_key_and_command() -> None:
    """What the generator must not lose: every key of the schema, every command and option of the parser."""
    from phi_rules.cli.parser import build

    language = (ROOT / "docs" / "reference" / "rule-language.md").read_text()
    for key in (
        "source.config_defaults",
        "target.adapter.fused",
        "reverse.refuse",
        "rename.match",
        "block_diagonal.rows",
    ):
        assert f"| `{key}` |" in language, key
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    sub = next(a for a in build()._actions if a.dest == "command")
    for name, parser in sub.choices.items():  # type: ignore[union-attr]
        assert f"\n## {name}\n" in cli, name
        for action in parser._actions:
            for option in [] if isinstance(action, argparse._HelpAction) else action.option_strings:
                assert f"`{option}`" in cli, (name, option)


README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_opens_with_what_people_run() -> None:
    lines = README.splitlines()
    assert len(lines) <= 150, len(lines)
    first_screen = "\n".join(lines[:40])
    assert "--to llama --out" in first_screen  # Phi-3/Phi-4 -> Llama
    assert re.search(r"apply --source \S*lora\S* --to llama", first_screen)  # and its adapter


def test_readme_keeps_the_set_up_commands() -> None:
    """The contract of a fresh clone (CI runs the second; the first converts the shipped example offline)."""
    assert (
        "    python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . && phi-rules apply "
        "rules/examples/tiny-phi-2.yaml --out out/tiny-phi-2 --force\n" in README
    )
    assert (
        "    python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e '.[test]' && "
        "python -m pytest -q\n" in README
    )


@pytest.mark.parametrize("link", sorted(set(re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README))))
def test_readme_links_resolve(link: str) -> None:
    assert (ROOT / link).is_file(), link
