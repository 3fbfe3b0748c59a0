"""An explicit head_dim (which transformers honours: Phi3, Llama and Mistral take it over hidden/heads) is
read by the Phi3 layout and written for Llama and Mistral: the conversion is exact both ways, by logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_phi3 import Cli, assert_same_function, converts, load_strictly, phi3_model, save

WIDE_HEADS = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


@pytest.mark.parametrize("target", ["llama", "mistral"])
def test_an_explicit_head_dim_converts_exactly_and_back(cli: Cli, tmp_path: Path, target: str) -> None:
    model = phi3_model(WIDE_HEADS)
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape[0] == (4 + 2 * 2) * 16  # not hidden/heads = 8
    src = save(model, tmp_path / "src")
    converts(cli, src, tmp_path / "there", target)
    assert json.loads((tmp_path / "there" / "config.json").read_text())["head_dim"] == 16
    assert_same_function(model, load_strictly(tmp_path / "there", target))
    converts(cli, tmp_path / "there", tmp_path / "back", "phi3")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["head_dim"] == 16
    back = load_strictly(tmp_path / "back", "phi3")
    assert_same_function(model, back)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
