"""Every target's output loads without a word from transformers (#34): a warning on each load (an unrecognised
rope key, a field the class does not know) tells users something is wrong when nothing is. Checked with
transformers' logger and Python's warnings captured, for every target a shipped rule writes."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_phi3 import BASE, FAMILY, Cli, converts, phi3_model, save
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging


def load_said(folder: Path) -> list[str]:
    """What transformers logs (warnings and up) and warns while loading ``folder``."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logger = transformers_logging.get_logger("transformers")
    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    finally:
        logger.removeHandler(handler)
    return said + [str(w.message) for w in caught]


# A Phi-3-mini-4k in small, with original_max_position_embeddings at the top as its config.json has it.
MINI_4K = {**FAMILY["phi-3-mini-4k"], "original_max_position_embeddings": BASE["max_position_embeddings"]}
PHI_4 = {**FAMILY["phi-4"], "original_max_position_embeddings": BASE["max_position_embeddings"]}


@pytest.mark.parametrize(
    ("shape", "target"),
    [(PHI_4, "llama"), (MINI_4K, "mistral"), (FAMILY["phi-3-mini-128k"], "llama")],
    ids=["phi-4-to-llama", "phi-3-mini-4k-to-mistral", "longrope-to-llama"],
)
def test_phi3_outputs_and_their_way_back_load_silently(
    cli: Cli, tmp_path: Path, shape: dict[str, object], target: str
) -> None:
    src = save(phi3_model(shape), tmp_path / "src")
    assert load_said(src) == []  # the source itself is silent: anything below is the conversion's doing
    converts(cli, src, tmp_path / target, target)
    assert load_said(tmp_path / target) == []
    converts(cli, tmp_path / target, tmp_path / "back", "phi3")
    assert load_said(tmp_path / "back") == []


def test_a_legacy_conversion_loads_silently(cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli("apply", ROOT / "rules" / "examples" / "tiny-phi-2.yaml", "--out", tmp_path / "phi", "--quiet")
    assert code == 0, err
    assert load_said(tmp_path / "phi") == []
