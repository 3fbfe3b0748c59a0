"""rules/seed-compat/phi-2.yaml reproduces the seed script's output key for key, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import ROOT
from phi_reference import MsftConfig, random_state, write_checkpoint

# The seed's mapping and convert_weights, as in transformers' old convert_phi_weights_to_hf.py.
PHI_MAPPING = {
    "transformer.embd.wte.weight": "model.embed_tokens.weight",
    "lm_head.linear": "lm_head",
    "lm_head.ln": "model.final_layernorm",
    "layers": "model.layers",
    "transformer": "model",
    ".h.": ".layers.",
    "ln": "input_layernorm",
    "mixer": "self_attn",
    "Wqkv": "query_key_value",
    "out_proj": "dense",
}


class SeedConfig:
    def __init__(self, num_attention_heads: int, hidden_size: int) -> None:
        self.num_attention_heads, self.hidden_size = num_attention_heads, hidden_size


def seed_convert_weights(original_weights, mapping, config):
    converted_weights = {}
    original_weights_keys = sorted(original_weights.keys())
    for original_weights_key in original_weights_keys:
        new_key = original_weights_key
        if "rotary_emb" in new_key:
            continue
        if "Wqkv" in new_key:
            if "weight" in new_key:
                weight = original_weights[new_key]
                weights_shape = weight.shape
                weight = (
                    weight.view(3, config.num_attention_heads, -1, config.hidden_size)
                    .transpose(0, 1)
                    .reshape(*weights_shape)
                )
                original_weights[new_key] = weight
            elif "bias" in new_key:
                bias = original_weights[new_key]
                bias_shape = bias.shape
                bias = bias.view(3, config.num_attention_heads, -1).transpose(0, 1).reshape(*bias_shape)
                original_weights[new_key] = bias
        for k, v in mapping.items():
            if k in new_key:
                new_key = new_key.replace(k, v)
        converted_weights[new_key] = original_weights.pop(original_weights_key)
    return converted_weights


def test_seed_compat_matches_seed_bit_for_bit(cli, tmp_path: Path) -> None:
    cfg = MsftConfig(vocab_size=64, n_embd=96, n_layer=3, n_head=4, rotary_dim=8)
    state = random_state(cfg, torch.float16, inv_freq=True, seed=11)
    src = write_checkpoint(tmp_path / "src", state, cfg, "bin")
    expected = seed_convert_weights(
        {k: v.clone() for k, v in state.items()}, PHI_MAPPING, SeedConfig(cfg.n_head, cfg.n_embd)
    )
    code, _, err = cli(
        "apply", ROOT / "rules" / "seed-compat" / "phi-2.yaml", "--source", src, "--out", tmp_path / "out"
    )
    assert code == 0, err
    got = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert sorted(got) == sorted(expected)
    assert "model.layers.0.self_attn.query_key_value.weight" in got
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key].view(torch.uint8), value.contiguous().view(torch.uint8)), key
    # The interleave really moved rows: a plain rename would not have matched.
    wqkv = state["transformer.h.0.mixer.Wqkv.weight"]
    assert not torch.equal(got["model.layers.0.self_attn.query_key_value.weight"], wqkv)
