"""Regenerate the tiny phi-msft checkpoint shipped in rules/examples/tiny-phi-2/ (run from the repo root).

Deterministic: a test regenerates it and compares bytes, so the shipped files are known to be
exactly this random model, whose logits the tests can compute independently.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from phi_reference import MsftConfig, random_state, write_checkpoint

TINY = MsftConfig(vocab_size=1024, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128)


def build(folder: Path) -> None:
    """fp16, two shards with an index, named like phi-2's files."""
    state = random_state(TINY, torch.float16, seed=2024)
    write_checkpoint(folder, state, TINY, shards=2)


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "rules/examples/tiny-phi-2"))
