"""The reference for sources that are today's transformers architectures (Phi3, Llama, Mistral, or any class
a source's config.json names): the source folder through transformers' own class for it, never through
the rule being verified.

Both sides are built on ``meta`` from their own config.json and filled one decoder layer at a time. At the
everyday length each output layer runs on the source layer's input (teacher forcing), and its contribution
(output minus input) is compared with the source layer's, so a divergence is pinned to the layer that
causes it; the output also runs on its own, end to end, to its logits. Each layer gets the mask and
position embeddings its own model's forward builds. Past each length where a config changes the function
(a sliding window, chunked attention, longrope's or dynamic rope's switch), the probe runs again, on the
first layer of each kind (layers whose mask and rotary are the same objects on both sides compute the
same way at any length): the long probes cost a layer or two, not the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.errors import PhiRulesError
from phi_rules.verify.common import TOKENS, Adapter, Bounds, Converted, Probe, Report, Row, delta

if TYPE_CHECKING:
    import torch

PAST = 8  # tokens a probe reaches past a switch point
LENGTH_ROPES = ("longrope", "dynamic")  # rope types whose frequencies change with the length


def switch_points(config: Any) -> list[tuple[int, str, bool]]:
    """The lengths at which a config changes what the model computes, each with the field that says so and
    whether the whole sequence changes there (a rope switch: below it is another regime; a window or chunk
    changes only the queries past it, and every longer probe holds the shorter queries too)."""
    points: list[tuple[int, str, bool]] = []
    for field in ("sliding_window", "attention_chunk_size"):
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            points.append((value, f"{field} {value}", False))
    rope = getattr(config, "rope_parameters", None) or {}
    kinds = [rope] if "rope_type" in rope else [r for r in rope.values() if isinstance(r, dict)]  # per layer type
    for r in kinds:
        if r.get("rope_type") in LENGTH_ROPES:
            original = (
                r.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None)
                or getattr(config, "max_position_embeddings", None)
            )
            if isinstance(original, int) and original > 0:
                points.append((original, f"original_max_position_embeddings {original} ({r['rope_type']})", True))
    return points


def probes(source: Any, output: Any, max_length: int | None = None) -> list[Probe]:
    """The everyday length, and one past each switch point either config names (a point the other side
    lacks is exactly where the two differ), and one at a rope switch too where the everyday length is
    past it; up to the source's max_position_embeddings, as far as the model is meant to run, and up to
    ``max_length`` where an accepted refusal leaves the output exact only that far."""
    everyday = everyday_length(max_length)
    why: dict[int, list[str]] = {everyday: ["every layer, teacher-forced and end to end"]}
    limit = getattr(source, "max_position_embeddings", None)
    for point, field, whole in sorted({*switch_points(source), *switch_points(output)}):
        at = everyday if point < everyday else point + PAST
        if (isinstance(limit, int) and point >= limit) or (max_length is not None and at > max_length):
            continue
        why.setdefault(at, []).append(f"past {field}")
        if whole and point < everyday:
            why.setdefault(point, []).append(f"up to {field}")
    return [Probe(t, "; ".join(w)) for t, w in sorted(why.items())]


def everyday_length(max_length: int | None) -> int:
    """The probe that runs every layer and the model end to end: the usual length, or shorter where an accepted
    refusal leaves the output exact only up to ``max_length`` tokens."""
    return TOKENS if max_length is None else min(TOKENS, max_length)


def _kinds(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[int]:
    """The first layer of each kind: layers that get the same mask and position embeddings on both sides."""

    def key(kw: dict[str, Any]) -> tuple[int, ...]:
        return tuple(id(kw.get(k)) for k in ("attention_mask", "position_embeddings"))

    first: dict[tuple[int, ...], int] = {}
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        first.setdefault((*key(x), *key(y)), i)
    return sorted(first.values())


PARTS = {"self_attn": "attention", "mlp": "mlp"}  # the submodules whose outputs are compared on their own
PART_HINTS = {"self_attn": "check q/k/v/o of {}.self_attn and the rope fields", "mlp": "check gate/up/down of {}.mlp"}


@contextmanager
def _parts(layer: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The outputs of a layer's attention and MLP while it runs inside the ``with`` (where it has them)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            seen[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [getattr(layer, n).register_forward_hook(keep(n)) for n in PARTS if hasattr(layer, n)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _final_norm(model: Any) -> tuple[Any, str]:
    if hasattr(model.model, "norm"):
        return model.model.norm, "model.norm."
    return model.model.final_layernorm, "model.final_layernorm."


def _head(model: Any) -> str:
    return "model.embed_tokens." if getattr(model.config, "tie_word_embeddings", False) else "lm_head."


def verify_own_class(
    source: Path,
    out: Path,
    tol: float,
    adapters: tuple[Path, Path] | None = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
    max_length: int | None = None,
) -> Report:
    """Compare the source folder, run by transformers' class for its own architecture, with the output;
    ``adapters``: the original adapter folder and its conversion, merged into each side's weights by its names.
    ``progress``: given the number of layer runs, returns what to call after each; ``max_length``: no probe
    longer (the output was made with a refusal accepted, exact up to that length)."""
    import torch

    if not (source / "config.json").is_file():
        raise PhiRulesError(f"{source}: no config.json: verify runs the source through its own transformers class")
    arch = json.loads((source / "config.json").read_text()).get("architectures", ["?"])[0]
    with torch.no_grad(), ExitStack() as stack:
        original, converted = (Adapter(a, stack) for a in adapters) if adapters else (None, None)
        src, conv = Converted(source, stack, original), Converted(out, stack, converted)
        return compare(src, conv, arch, Bounds.of(tol, src.files, conv.files), progress, max_length)


def compare(
    src: Converted,
    conv: Converted,
    arch: str,
    bounds: Bounds,
    progress: Callable[[int], Callable[[int], None]] | None = None,
    max_length: int | None = None,
) -> Report:
    """The source's model (run by ``arch``, as the report names it) against the output's, layer by layer at the
    everyday length and on the first layer of each kind past every switch point, then end to end."""
    import torch

    rows: list[Row] = []
    with torch.no_grad():

        def add(part: str, ref: torch.Tensor, got: torch.Tensor, hint: str, bound: float) -> None:
            rows.append(Row(part, delta(ref, got), bound, hint))

        a, b = src.model.model, conv.model.model
        layers = min(len(a.layers), len(b.layers))
        vocab = min(a.embed_tokens.num_embeddings, b.embed_tokens.num_embeddings)
        plan = probes(src.model.config, conv.model.config, max_length)
        everyday = everyday_length(max_length)
        contexts = {p.tokens: (src.context(p.tokens), conv.context(p.tokens)) for p in plan}
        runs = {p.tokens: list(range(layers)) if p.tokens == everyday else _kinds(*contexts[p.tokens]) for p in plan}
        tick = (progress or (lambda _n: lambda _k: None))(sum(len(r) for r in runs.values()))
        for probe in plan:
            t, (ks, ko) = probe.tokens, contexts[probe.tokens]
            at = f" at {t} tokens" if t != TOKENS else ""
            ids = torch.tensor([(7919 * i + 13) % vocab for i in range(t)])[None]
            with (
                src.loaded(a.embed_tokens, "model.embed_tokens.") as e1,
                conv.loaded(b.embed_tokens, "model.embed_tokens.") as e2,
            ):
                x, y = e1(ids), e2(ids)
            if t == everyday:
                add(f"embeddings{at}", x, y, "check model.embed_tokens.weight", bounds.part(x))
            for i in runs[t]:
                where = f"model.layers.{i}"
                with src.loaded(a.layers[i], f"{where}.") as l1, conv.loaded(b.layers[i], f"{where}.") as l2:
                    with _parts(l1) as inside1, _parts(l2) as inside2:
                        ref = l1(x, **ks[i])
                        got = l2(x, **ko[i])
                    if t == everyday:
                        y = l2(y, **ko[i])  # the output on its own
                hint = f"check {where} (q/k/v and gate/up rows, rope_parameters, sliding_window)"
                add(f"layer {i}{at}", ref - x, got - x, hint, bounds.part(ref - x, x))
                for name, part in inside1.items():  # a small part is judged by its own scale too
                    add(
                        f"layer {i} {PARTS[name]}{at}",
                        part,
                        inside2[name],
                        PART_HINTS[name].format(where),
                        bounds.part(part),
                    )
                if t == everyday:
                    x = ref
                tick(1)
            if t != everyday:
                continue
            if len(a.layers) != len(b.layers):
                hint = f"the source has {len(a.layers)} layers, the output {len(b.layers)}"
                rows.append(Row("layers", float("inf"), 0.0, hint))
            (n1, p1), (n2, p2) = _final_norm(src.model), _final_norm(conv.model)
            with src.loaded(n1, p1) as f1, conv.loaded(n2, p2) as f2:
                x, normed, y = f1(x), f2(x), f2(y)
            add(f"final norm{at}", x, normed, f"check {p2}weight", bounds.part(x))
            with (
                src.loaded(src.model.lm_head, _head(src.model)) as h1,
                conv.loaded(conv.model.lm_head, _head(conv.model)) as h2,
            ):
                ref, got, alone = h1(x), h2(x), h2(y)
            add(f"logits{at}", ref, got, f"check lm_head (the reference is {arch})", bounds.part(ref))
            hint = f"the output run on its own drifts from {arch}: check every layer's config"
            add(f"logits end to end{at}", ref, alone, hint, bounds.end_to_end(ref, len(a.layers)))
    return Report(rows, plan, bounds, reference=arch)
