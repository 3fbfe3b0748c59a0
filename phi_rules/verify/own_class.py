"""The reference for sources that are today's transformers architectures (Phi3, Llama, Mistral): the
source folder through transformers' own class for it, never through the rule being verified.

Both sides are built on ``meta`` from their own config.json and filled one decoder layer at a time.
Each output layer runs on the source layer's input (teacher forcing), with each side's own rotary
embedding and attention mask (a sliding window where its config has one), so a divergence is pinned
to the layer that causes it. With longrope, the probe runs at a second length past
``original_max_position_embeddings``, where the long factors take over.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.errors import PhiRulesError
from phi_rules.verify.common import TOKENS, Adapter, Converted, Report, Row, delta, tolerance

if TYPE_CHECKING:
    import torch


def _lengths(config: Any, max_length: int | None = None) -> list[int]:
    """The probe lengths; none longer than ``max_length`` (an accepted refusal's exact range), where given."""
    rope = getattr(config, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    lengths = [TOKENS]
    if rope.get("rope_type") == "longrope" and original:
        lengths = [min(TOKENS, int(original)), int(original) + 8]  # both sides of the switch to the long factors
    if max_length is None:
        return lengths
    return list(dict.fromkeys(min(n, max_length) for n in lengths))


def _mask(config: Any, t: int) -> torch.Tensor:
    """Causal, and within the sliding window where the config has one (as the model builds it)."""
    import torch

    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = j <= i
    window = getattr(config, "sliding_window", None)
    if window:
        allowed &= i - j < int(window)
    return torch.zeros(t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def _final_norm(model: Any) -> tuple[Any, str]:
    if hasattr(model.model, "norm"):
        return model.model.norm, "model.norm."
    return model.model.final_layernorm, "model.final_layernorm."


def verify_own_class(
    source: Path, out: Path, tol: float, adapters: tuple[Path, Path] | None = None, max_length: int | None = None
) -> Report:
    """Compare the source folder, run by transformers' class for its own architecture, with the output;
    ``adapters``: the original adapter folder and its conversion, merged into each side's weights by its names."""
    import torch

    if not (source / "config.json").is_file():
        raise PhiRulesError(f"{source}: no config.json: verify runs the source through its own transformers class")
    rows: list[Row] = []

    def add(part: str, ref: torch.Tensor, got: torch.Tensor, hint: str) -> None:
        rows.append(Row(part, delta(ref, got), tol * max(1.0, ref.abs().max().item()), hint))

    with torch.no_grad(), ExitStack() as stack:
        original, converted = (Adapter(a, stack) for a in adapters) if adapters else (None, None)
        src, conv = Converted(source, stack, original), Converted(out, stack, converted)
        tol = tolerance(tol, src.files, conv.files)
        arch = json.loads((source / "config.json").read_text()).get("architectures", ["?"])[0]
        a, b = src.model.model, conv.model.model
        vocab = min(a.embed_tokens.num_embeddings, b.embed_tokens.num_embeddings)
        for t in _lengths(src.model.config, max_length):
            at = f" at {t} tokens" if t != TOKENS else ""
            ids = torch.tensor([(7919 * i + 13) % vocab for i in range(t)])[None]
            with (
                src.loaded(a.embed_tokens, "model.embed_tokens.") as e1,
                conv.loaded(b.embed_tokens, "model.embed_tokens.") as e2,
            ):
                x, y = e1(ids), e2(ids)
            add(f"embeddings{at}", x, y, "check model.embed_tokens.weight")
            masks = (_mask(src.model.config, t), _mask(conv.model.config, t))
            for i in range(min(len(a.layers), len(b.layers))):
                where = f"model.layers.{i}"
                with src.loaded(a.layers[i], f"{where}.") as l1, conv.loaded(b.layers[i], f"{where}.") as l2:
                    ref = l1(x, attention_mask=masks[0], position_embeddings=src.positions(x))
                    got = l2(x, attention_mask=masks[1], position_embeddings=conv.positions(x))
                add(
                    f"layer {i}{at}",
                    ref,
                    got,
                    f"check {where} (q/k/v and gate/up rows, rope_parameters, sliding_window)",
                )
                x = ref
            if len(a.layers) != len(b.layers):
                rows.append(
                    Row(
                        "layers",
                        float("inf"),
                        0.0,
                        f"the source has {len(a.layers)} layers, the output {len(b.layers)}",
                    )
                )
            (n1, p1), (n2, p2) = _final_norm(src.model), _final_norm(conv.model)
            with src.loaded(n1, p1) as f1, conv.loaded(n2, p2) as f2:
                x, y = f1(x), f2(x)
            add(f"final norm{at}", x, y, f"check {p2}weight")
            tied = "model.embed_tokens." if getattr(src.model.config, "tie_word_embeddings", False) else "lm_head."
            tied2 = "model.embed_tokens." if getattr(conv.model.config, "tie_word_embeddings", False) else "lm_head."
            with src.loaded(src.model.lm_head, tied) as h1, conv.loaded(conv.model.lm_head, tied2) as h2:
                add(f"logits{at}", h1(x), h2(x), f"check lm_head (the reference is {arch})")
    return Report(rows)
