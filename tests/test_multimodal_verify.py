"""``verify`` on Phi-4-multimodal conversions (#31): the phi4mm source's text decoder, run by transformers'
Phi3ForCausalLM from its config.json values and the base weights of its PEFT-wrapped linears (never through
the rule being verified), against the `--to phi3` and `--to phi4-multimodal` outputs, on both sides of
longrope's switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_multimodal import Cli, native_model, remote_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("phi4mm") / "remote"
    remote_checkpoint(native_model(), folder)
    return folder


@pytest.mark.parametrize("target", ["phi3", "phi4-multimodal"])
def test_verify_runs_the_text_decoder_as_reference(cli: Cli, source: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / target
    code, _, err = cli("apply", "--source", source, "--to", target, "--out", out, "--quiet", "--verify")
    assert code == 0, err
    code, shown, err = cli("verify", "--source", source, out)
    assert code == 0, shown + err
    assert "Phi3ForCausalLM, Phi4MMForCausalLM's text decoder reference" in shown, shown
    assert "probed 24 tokens: past original_max_position_embeddings 16 (longrope)" in shown, shown
    assert "no function check" not in shown + err


def test_verify_fails_a_changed_layer_and_a_moved_long_switch(cli: Cli, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "phi3"
    assert cli("apply", "--source", source, "--to", "phi3", "--out", out, "--quiet")[0] == 0
    weights = load_file(out / "model.safetensors")
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "config.json").write_text((out / "config.json").read_text())
    down = "model.layers.1.mlp.down_proj.weight"
    save_file({**weights, down: weights[down] * 1.01}, changed / "model.safetensors", metadata={"format": "pt"})
    code, shown, err = cli("verify", "--source", source, changed)
    assert code == 1 and "layer 1" in err, shown + err

    config = json.loads((out / "config.json").read_text())  # the switch to the long factors moved
    config.pop("original_max_position_embeddings", None)
    config["rope_parameters"].pop("original_max_position_embeddings", None)
    config["max_position_embeddings"] = 64
    (out / "config.json").write_text(json.dumps(config))
    code, shown, err = cli("verify", "--source", source, out)
    assert code == 1 and "diverges" in err and "rope_parameters" in err, shown + err  # longrope's scale moved too
    assert torch.equal(load_file(out / "model.safetensors")[down], weights[down])  # only the config differs
