"""``phi-rules verify``: prove a conversion by its function, layer by layer, in bounded memory.

One side is the original Phi-1/1.5/2 architecture, written here from its description and reading
the source tensors by their original names through one name table per legacy layout (like gguf-py's
tensor table); it never looks at the rule being verified, so a wrong rule cannot verify itself.
Its sizes come from the source's own config.json. The other side is transformers' own modules for
the output's config, built on ``meta`` and filled one block at a time from the output's files.

Block (parallel): ``x + attn(ln(x)) + mlp(ln(x))``; attention from a fused Wqkv whose rows are
[all q; all k; all v], rotate-half rotary on the first ``rotary_dim`` dims of each head; gelu_new
MLP; head ``ln`` then ``linear`` with bias. Each layer's attention and MLP are also run on the
reference's own input (teacher forcing), so that a divergence is pinned to the part that causes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.errors import PhiRulesError
from phi_rules.source.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

from phi_rules.verify.common import TOKENS, Adapter, Bounds, Converted, Probe, Report, Row, delta, weight_of


@dataclass(frozen=True)
class Layout:
    """Where a legacy layout keeps each part; ``{i}`` is the block index, ``{last}`` one past the last."""

    embed: str
    block: str
    ln: str
    qkv: str
    out: str
    fc1: str
    fc2: str
    final_ln: str
    head: str
    first_block: int = 0
    interleaved: bool = False  # the seed's per-head order of query_key_value rows
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # config names, first found wins


MSFT_FIELDS: dict[str, tuple[str, ...]] = {
    "hidden": ("n_embd",),
    "heads": ("n_head",),
    "kv_heads": ("n_head_kv",),
    "layers": ("n_layer",),
    "rotary_dim": ("rotary_dim",),
    "eps": ("layer_norm_epsilon",),
    "act": ("activation_function",),
}
LAYOUTS = {
    "phi-msft": Layout(
        "transformer.embd.wte.weight",
        "transformer.h.{i}.",
        "ln",
        "mixer.Wqkv",
        "mixer.out_proj",
        "mlp.fc1",
        "mlp.fc2",
        "lm_head.ln",
        "lm_head.linear",
        fields=MSFT_FIELDS,
    ),
    "mixformer-sequential": Layout(
        "layers.0.wte.weight",
        "layers.{i}.",
        "ln",
        "mixer.Wqkv",
        "mixer.out_proj",
        "mlp.fc1",
        "mlp.fc2",
        "layers.{last}.ln",
        "layers.{last}.linear",
        first_block=1,
        fields=MSFT_FIELDS,
    ),
    "transformers-4.36": Layout(
        "model.embed_tokens.weight",
        "model.layers.{i}.",
        "input_layernorm",
        "self_attn.query_key_value",
        "self_attn.dense",
        "mlp.fc1",
        "mlp.fc2",
        "model.final_layernorm",
        "lm_head",
        interleaved=True,
        fields={
            "hidden": ("hidden_size",),
            "heads": ("num_attention_heads",),
            "kv_heads": ("num_key_value_heads",),
            "layers": ("num_hidden_layers",),
            "rotary_factor": ("partial_rotary_factor",),
            "theta": ("rope_theta",),
            "eps": ("layer_norm_eps",),
            "act": ("hidden_act",),
        },
    ),
}


@dataclass(frozen=True)
class Sizes:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    rotary_dim: int
    eps: float
    theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def sizes(layout: Layout, config: dict[str, Any] | None, where: str) -> Sizes:
    """The reference's sizes, from the source's own config.json (never from the rule)."""
    if config is None:
        raise PhiRulesError(f"{where}: verify needs the source's config.json: the reference reads its sizes there")
    found: dict[str, Any] = {
        k: next((config[n] for n in names if config.get(n) is not None), None) for k, names in layout.fields.items()
    }
    need = [k for k in ("hidden", "heads", "layers") if not isinstance(found.get(k), int)]
    if need:
        raise PhiRulesError(f"{where}: config.json lacks {', '.join(layout.fields[k][0] for k in need)}")
    if found.get("act") not in (None, "gelu_new"):
        raise PhiRulesError(f"{where}: the reference implements gelu_new, not {found['act']!r}")
    head_dim = found["hidden"] // found["heads"]
    rotary = found.get("rotary_dim")
    if rotary is None:
        rotary = int((found.get("rotary_factor") or 0.5) * head_dim)
    return Sizes(
        found["hidden"],
        found["heads"],
        found.get("kv_heads") or found["heads"],
        found["layers"],
        int(rotary),
        float(found.get("eps") or 1e-5),
        float(found.get("theta") or 10000.0),
    )


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * w + b


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    import torch

    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class Reference:
    """The original architecture over the source checkpoint, one tensor read at a time."""

    def __init__(self, ckpt: Checkpoint, layout_name: str, s: Sizes, adapter: Adapter | None = None) -> None:
        self.ckpt, self.layout_name, self.layout, self.s = ckpt, layout_name, LAYOUTS[layout_name], s
        self.adapter = adapter

    def name(self, template: str) -> str:
        return template.format(last=self.s.layers + self.layout.first_block)

    def get(self, name: str) -> torch.Tensor:
        missing = f"the source has no tensor {name!r}: not a {self.layout_name} checkpoint?"
        return weight_of(self.ckpt, name, self.adapter, missing)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.get(self.layout.embed)[ids]

    def _rotary(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        r = self.s.rotary_dim
        inv_freq = 1.0 / self.s.theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
        freqs = torch.outer(torch.arange(x.shape[0], dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
        x1, x2 = x[..., :r].chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., r:]], dim=-1)

    def block(self, i: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of block ``i`` on input ``x`` [T, H]: norm, attention, mlp and the block's output."""
        import torch

        p = self.layout.block.format(i=i + self.layout.first_block)
        s, t = self.s, x.shape[0]
        h = _layer_norm(x, self.get(p + self.layout.ln + ".weight"), self.get(p + self.layout.ln + ".bias"), s.eps)
        w, b = self.get(p + self.layout.qkv + ".weight"), self.get(p + self.layout.qkv + ".bias")
        if self.layout.interleaved:  # rows head by head, q/k/v inside each: back to [all q; all k; all v]
            w = w.view(s.heads, 3, -1, s.hidden).transpose(0, 1).reshape(w.shape)
            b = b.view(s.heads, 3, -1).transpose(0, 1).reshape(b.shape)
        kv = s.kv_heads * s.head_dim
        q, k, v = torch.split(h @ w.T + b, [s.hidden, kv, kv], dim=-1)
        q = self._rotary(q.view(t, s.heads, s.head_dim))
        k = self._rotary(k.view(t, s.kv_heads, s.head_dim)).repeat_interleave(s.heads // s.kv_heads, dim=1)
        v = v.view(t, s.kv_heads, s.head_dim).repeat_interleave(s.heads // s.kv_heads, dim=1)
        mask = torch.full((t, t), float("-inf")).triu(1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(s.head_dim) + mask
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, s.hidden)
        attn = attn @ self.get(p + self.layout.out + ".weight").T + self.get(p + self.layout.out + ".bias")
        up = h @ self.get(p + self.layout.fc1 + ".weight").T + self.get(p + self.layout.fc1 + ".bias")
        mlp = _gelu_new(up) @ self.get(p + self.layout.fc2 + ".weight").T + self.get(p + self.layout.fc2 + ".bias")
        return {"norm": h, "attention": attn, "mlp": mlp, "out": x + attn + mlp}

    def head(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        ln, head = self.name(self.layout.final_ln), self.name(self.layout.head)
        normed = _layer_norm(x, self.get(ln + ".weight"), self.get(ln + ".bias"), self.s.eps)
        return {"final norm": normed, "logits": normed @ self.get(head + ".weight").T + self.get(head + ".bias")}


def verify_legacy(
    source: tuple[Path, ...],
    layout_name: str,
    config: dict[str, Any] | None,
    out: Path,
    tol: float,
    adapters: tuple[Path, Path] | None = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> Report:
    """Compare the original architecture on the source with the converted folder; tolerances are set by
    each reference part's own scale and both sides' dtypes (:class:`Bounds`); the logits are the output's
    own, run end to end. ``adapters``: the original adapter folder and its conversion, applied to each
    side's base by its own names. ``progress``: given the number of layers, returns what to call after each."""
    import torch

    layout = LAYOUTS.get(layout_name)
    if layout is None:
        raise PhiRulesError(f"no reference forward for layout {layout_name!r}: verify knows {', '.join(LAYOUTS)}")
    weights = source
    rows: list[Row] = []

    def add(part: str, ref: torch.Tensor, got: torch.Tensor, hint: str, bound: float | None = None) -> None:
        rows.append(Row(part, delta(ref, got), bounds.part(ref) if bound is None else bound, hint))

    with torch.no_grad(), Checkpoint(weights) as ckpt, ExitStack() as stack:
        s = sizes(layout, config, str(weights[0].parent))
        original, converted = (Adapter(a, stack) for a in adapters) if adapters else (None, None)
        ref = Reference(ckpt, layout_name, s, original)
        conv = Converted(out, stack, converted)
        bounds = Bounds.of(tol, ckpt, conv.files)
        model = conv.model.model
        vocab = min(model.embed_tokens.num_embeddings, ckpt.tensors[layout.embed].shape[0])
        ids = torch.tensor([(7919 * i + 13) % vocab for i in range(TOKENS)])
        x_ref = ref.embed(ids)
        with conv.loaded(model.embed_tokens, "model.embed_tokens.") as emb:
            x_conv = emb(ids[None])
        add("embeddings", x_ref, x_conv[0], "check model.embed_tokens.weight")
        t = ids.shape[0]
        mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
        tick = (progress or (lambda _n: lambda _k: None))(min(s.layers, len(model.layers)))
        for i in range(min(s.layers, len(model.layers))):
            parts = ref.block(i, x_ref)
            where = f"model.layers.{i}"
            with conv.loaded(model.layers[i], f"{where}.") as layer:
                pe = conv.positions(x_ref[None])
                h = layer.input_layernorm(x_ref[None])
                attn = layer.self_attn(hidden_states=h, position_embeddings=pe, attention_mask=mask)[0]
                add(f"layer {i} norm", parts["norm"], h[0], f"check {where}.input_layernorm")
                add(
                    f"layer {i} attention",
                    parts["attention"],
                    attn[0],
                    f"check q_proj/k_proj/v_proj/dense of {where}.self_attn, and partial_rotary_factor in config.json",
                )
                add(f"layer {i} mlp", parts["mlp"], layer.mlp(h)[0], f"check fc1/fc2 of {where}.mlp")
                x_conv = layer(x_conv, attention_mask=mask, position_embeddings=conv.positions(x_conv))
            x_ref = parts["out"]
            tick(1)
        if s.layers != len(model.layers):
            rows.append(
                Row("layers", math.inf, 0.0, f"the source has {s.layers} layers, the output {len(model.layers)}")
            )
        final = ref.head(x_ref)
        with conv.loaded(model.final_layernorm, "model.final_layernorm.") as norm:
            add("final norm", final["final norm"], norm(x_ref[None])[0], "check model.final_layernorm")
            x_conv = norm(x_conv)
        with conv.loaded(conv.model.lm_head, "lm_head.") as head:
            logits = final["logits"]
            bound = bounds.end_to_end(logits, s.layers)
            add("logits", logits, head(x_conv)[0], "check lm_head (and every layer above)", bound)
    return Report(
        rows, [Probe(TOKENS, "every part, teacher-forced; the logits end to end")], bounds, reference=layout_name
    )
