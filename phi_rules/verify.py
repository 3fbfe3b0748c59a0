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

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.errors import PhiRulesError
from phi_rules.source.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

TOKENS = 16


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


class Adapter:
    """A PEFT LoRA/DoRA adapter folder applied to the weights it names, as PEFT merges it:
    W' = W + s·B·A with s = lora_alpha / r (or / sqrt(r) with rsLoRA); DoRA then rescales each output
    row to its magnitude: W'' = m / ||W'||_row · W'. Used on both sides, each by its own names."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
            r, alpha = int(config["r"]), float(config["lora_alpha"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PhiRulesError(f"{folder}: not a PEFT adapter folder (adapter_config.json: {exc})") from None
        self.scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        files = [f for f in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if f.is_file()]
        if not files:
            raise PhiRulesError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
        self.ckpt = stack.enter_context(Checkpoint(files[:1]))

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        module = "base_model.model." + name.removesuffix(".weight")
        a = self.ckpt.tensors.get(module + ".lora_A.weight")
        if not name.endswith(".weight") or a is None:
            return weight
        b = self.ckpt.tensors.get(module + ".lora_B.weight")
        if b is None:
            raise PhiRulesError(f"the adapter has {module}.lora_A.weight but no lora_B")
        merged = weight + self.scale * (self.ckpt.load(b).float() @ self.ckpt.load(a).float())
        magnitude = self.ckpt.tensors.get(module + ".lora_magnitude_vector")
        if magnitude is not None:
            merged = merged * (self.ckpt.load(magnitude).float() / merged.norm(dim=1))[:, None]
        return merged


def _weight(ckpt: Checkpoint, name: str, adapter: Adapter | None, missing: str) -> torch.Tensor:
    """One tensor in float32, with the adapter (if any) applied to it by the same name."""
    info = ckpt.tensors.get(name)
    if info is None:
        raise PhiRulesError(missing)
    tensor = ckpt.load(info).float()
    return adapter.apply(name, tensor) if adapter else tensor


class Reference:
    """The original architecture over the source checkpoint, one tensor read at a time."""

    def __init__(self, ckpt: Checkpoint, layout_name: str, s: Sizes, adapter: Adapter | None = None) -> None:
        self.ckpt, self.layout_name, self.layout, self.s = ckpt, layout_name, LAYOUTS[layout_name], s
        self.adapter = adapter

    def name(self, template: str) -> str:
        return template.format(last=self.s.layers + self.layout.first_block)

    def get(self, name: str) -> torch.Tensor:
        missing = f"the source has no tensor {name!r}: not a {self.layout_name} checkpoint?"
        return _weight(self.ckpt, name, self.adapter, missing)

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


class Converted:
    """The output folder through transformers' own modules, one block materialised at a time."""

    def __init__(self, folder: Path, stack: ExitStack, adapter: Adapter | None = None) -> None:
        import torch

        from phi_rules.plan.target import model_class

        self.adapter = adapter

        try:
            raw = json.loads((folder / "config.json").read_text())
            cls = model_class(raw["architectures"][0])
            config = cls.config_class.from_pretrained(folder)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise PhiRulesError(f"{folder}: cannot read its config.json: {exc}") from None
        config._attn_implementation = "eager"
        with torch.device("meta"):
            self.model: Any = cls(config)
        self.model.eval()
        self.rotary = type(self.model.model.rotary_emb)(config=config)  # real buffers, not meta
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise PhiRulesError(f"{folder}: no safetensors files to verify")
        # Read with pread, one tensor at a time, like the source: a memory map would keep every page it
        # touched in the resident set, the whole model by the end.
        self.files = stack.enter_context(Checkpoint(files))
        self.folder = folder

    def get(self, name: str) -> torch.Tensor:
        return _weight(self.files, name, self.adapter, f"{self.folder}: the output has no tensor {name!r}")

    @contextmanager
    def loaded(self, module: Any, prefix: str) -> Iterator[Any]:
        """``module`` filled from the files inside the ``with``, and back on ``meta`` (memory freed) after it."""
        state = {k: self.get(prefix + k) for k in module.state_dict()}
        module.load_state_dict(state, assign=True)
        try:
            yield module
        finally:
            module.to("meta")

    def positions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        return self.rotary(x, torch.arange(x.shape[1])[None])  # type: ignore[no-any-return]


@dataclass
class Row:
    part: str
    delta: float
    tolerance: float
    hint: str

    @property
    def ok(self) -> bool:
        return self.delta <= self.tolerance


@dataclass
class Report:
    rows: list[Row]

    @property
    def first_bad(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    def to_json(self) -> dict[str, object]:
        bad = self.first_bad
        return {
            "ok": bad is None,
            "first_divergence": None if bad is None else f"{bad.part}: {bad.hint}",
            "parts": [
                {"part": r.part, "max_abs_delta": r.delta, "tolerance": r.tolerance, "ok": r.ok} for r in self.rows
            ],
        }


def _delta(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    d = (a - b).abs().max().item()
    return math.inf if math.isnan(d) else d


def failure(out: Path, report: Report) -> PhiRulesError | None:
    """The one-line error for the first part that diverges, or None when everything is within tolerance."""
    bad = report.first_bad
    if bad is None:
        return None
    return PhiRulesError(
        f"{out}: {bad.part} diverges (max|Δ| {bad.delta:.2e} > {bad.tolerance:.2e}) from the original: {bad.hint}"
    )


def layer_rows(report: Report) -> list[tuple[str, float, float]]:
    """One row per layer (its worst part, relative to its tolerance), plus embeddings, final norm, logits."""
    grouped: dict[str, Row] = {}
    for r in report.rows:
        key = " ".join(r.part.split()[:2]) if r.part.startswith("layer ") else r.part
        worst = grouped.get(key)
        if worst is None or r.delta / max(r.tolerance, 1e-30) > worst.delta / max(worst.tolerance, 1e-30):
            grouped[key] = r
    return [(k, r.delta, r.tolerance) for k, r in grouped.items()]


def verify(
    source: tuple[Path, ...],
    layout_name: str,
    config: dict[str, Any] | None,
    out: Path,
    tol: float,
    adapters: tuple[Path, Path] | None = None,
) -> Report:
    """Compare the original architecture on the source with the converted folder; tolerances are
    ``tol`` times the scale (max |value|, at least 1) of each reference part. ``adapters``: the
    original adapter folder and its conversion, applied to each side's base by its own names."""
    import torch

    layout = LAYOUTS.get(layout_name)
    if layout is None:
        raise PhiRulesError(f"no reference forward for layout {layout_name!r}: verify knows {', '.join(LAYOUTS)}")
    weights = source
    rows: list[Row] = []

    def add(part: str, ref: torch.Tensor, got: torch.Tensor, hint: str) -> None:
        rows.append(Row(part, _delta(ref, got), tol * max(1.0, ref.abs().max().item()), hint))

    with torch.no_grad(), Checkpoint(weights) as ckpt, ExitStack() as stack:
        s = sizes(layout, config, str(weights[0].parent))
        original, converted = (Adapter(a, stack) for a in adapters) if adapters else (None, None)
        ref = Reference(ckpt, layout_name, s, original)
        conv = Converted(out, stack, converted)
        model = conv.model.model
        vocab = min(model.embed_tokens.num_embeddings, ckpt.tensors[layout.embed].shape[0])
        ids = torch.tensor([(7919 * i + 13) % vocab for i in range(TOKENS)])
        x_ref = ref.embed(ids)
        with conv.loaded(model.embed_tokens, "model.embed_tokens.") as emb:
            x_conv = emb(ids[None])
        add("embeddings", x_ref, x_conv[0], "check model.embed_tokens.weight")
        t = ids.shape[0]
        mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
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
        if s.layers != len(model.layers):
            rows.append(
                Row("layers", math.inf, 0.0, f"the source has {s.layers} layers, the output {len(model.layers)}")
            )
        final = ref.head(x_ref)
        with conv.loaded(model.final_layernorm, "model.final_layernorm.") as norm:
            add("final norm", final["final norm"], norm(x_ref[None])[0], "check model.final_layernorm")
            x_conv = norm(x_conv)
        with conv.loaded(conv.model.lm_head, "lm_head.") as head:
            add("logits", final["logits"], head(x_conv)[0], "check lm_head (and every layer above)")
    return Report(rows)
