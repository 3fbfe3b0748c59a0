"""`apply --to transformers-4.36` reproduces the seed script's output key for key, bit for bit: phi-2's rule to
today's layout, then the derived backward of the 4.36 rule (rules/seed-compat is retired)."""

from __future__ import annotations

from pathlib import Path

import torch
from phi_reference import PHI_MAPPING, MsftConfig, SeedConfig, random_state, seed_convert_weights, write_checkpoint
from safetensors.torch import load_file


def test_seed_compat_matches_seed_bit_for_bit(cli, tmp_path: Path) -> None:
    cfg = MsftConfig(vocab_size=64, n_embd=96, n_layer=3, n_head=4, rotary_dim=8)
    state = random_state(cfg, torch.float16, inv_freq=True, seed=11)
    src = write_checkpoint(tmp_path / "src", state, cfg, "bin")
    expected = seed_convert_weights(
        {k: v.clone() for k, v in state.items()}, PHI_MAPPING, SeedConfig(cfg.n_head, cfg.n_embd)
    )
    code, _, err = cli("apply", "--source", src, "--to", "transformers-4.36", "--out", tmp_path / "out")
    assert code == 0, err
    assert "then rule phi-to-transformers-4.36" in err
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # the scratch folder is gone
    assert sorted(got) == sorted(expected)
    assert "model.layers.0.self_attn.query_key_value.weight" in got
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key].view(torch.uint8), value.contiguous().view(torch.uint8)), key
    # The interleave really moved rows: a plain rename would not have matched.
    wqkv = state["transformer.h.0.mixer.Wqkv.weight"]
    assert not torch.equal(got["model.layers.0.self_attn.query_key_value.weight"], wqkv)
