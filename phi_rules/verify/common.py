"""What every reference shares: the output read through transformers' own modules one block at a time,
adapters applied as PEFT merges them, and the report of per-part differences."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.errors import PhiRulesError
from phi_rules.language import regex
from phi_rules.source.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

TOKENS = 16


class Adapter:
    """A PEFT LoRA/DoRA adapter folder applied to the weights it names, as PEFT merges it:
    W' = W + s·B·A with s = alpha / r (or / sqrt(r) with rsLoRA), r and alpha of each module from
    ``rank_pattern`` and ``alpha_pattern`` where a key matches it (the first that does, as PEFT picks it);
    DoRA then rescales each output row to its magnitude: W'' = m / ||W'||_row · W'. Used on both sides,
    each by its own names."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
            self.r, self.alpha = int(config["r"]), float(config["lora_alpha"])
            self.ranks = {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
            self.alphas = {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PhiRulesError(f"{folder}: not a PEFT adapter folder (adapter_config.json: {exc})") from None
        self.rslora = bool(config.get("use_rslora"))
        files = [f for f in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if f.is_file()]
        if not files:
            raise PhiRulesError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
        self.ckpt = stack.enter_context(Checkpoint(files[:1]))

    def scale(self, module: str) -> float:
        """s for one module (``model.layers.0.self_attn.qkv_proj``), by PEFT's rule for pattern keys."""

        def pick(patterns: dict[str, Any], default: Any) -> Any:
            key = next((k for k in patterns if regex.peft_key_matches(k, module)), None)
            return default if key is None else patterns[key]

        r, alpha = pick(self.ranks, self.r), pick(self.alphas, self.alpha)
        return float(alpha / (math.sqrt(r) if self.rslora else r))

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        module = "base_model.model." + name.removesuffix(".weight")
        a = self.ckpt.tensors.get(module + ".lora_A.weight")
        if not name.endswith(".weight") or a is None:
            return weight
        b = self.ckpt.tensors.get(module + ".lora_B.weight")
        if b is None:
            raise PhiRulesError(f"the adapter has {module}.lora_A.weight but no lora_B")
        scale = self.scale(name.removesuffix(".weight"))
        merged = weight + scale * (self.ckpt.load(b).float() @ self.ckpt.load(a).float())
        magnitude = self.ckpt.tensors.get(module + ".lora_magnitude_vector")
        if magnitude is not None:
            merged = merged * (self.ckpt.load(magnitude).float() / merged.norm(dim=1))[:, None]
        return merged


def weight_of(ckpt: Checkpoint, name: str, adapter: Adapter | None, missing: str) -> torch.Tensor:
    """One tensor in float32, with the adapter (if any) applied to it by the same name."""
    info = ckpt.tensors.get(name)
    if info is None:
        raise PhiRulesError(missing)
    tensor = ckpt.load(info).float()
    return adapter.apply(name, tensor) if adapter else tensor


def weight_files(folder: Path) -> list[Path]:
    """The model weights a folder holds: its safetensors shards, else the one ``pytorch_model.bin``."""
    files = sorted(folder.glob("*.safetensors")) or [f for f in [folder / "pytorch_model.bin"] if f.is_file()]
    if not files:
        raise PhiRulesError(f"{folder}: no model weights (*.safetensors or pytorch_model.bin) to verify")
    return files


# Relative rounding of each floating dtype (half its epsilon): weights rounded to a narrower dtype than the
# source's move every part by a few of these, which is not a divergence.
ROUNDING = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Roundings of the output's dtype a comparison may differ by (tiny models measured: a layer's contribution
# moves by at most 5, a k/v swap by 240 and more; the logits end to end by at most 42 over 32 layers).
ROUNDINGS = 16


def dtype_of(ckpt: Checkpoint) -> str:
    """The floating dtypes a checkpoint holds (``float32``, or ``bfloat16+float32`` where mixed)."""
    return "+".join(sorted({t.dtype for t in ckpt.tensors.values() if t.dtype in ROUNDING})) or "none"


@dataclass(frozen=True)
class Bounds:
    """How far each comparison may be from the reference: ``tol`` relative to the scale of what is compared
    (its largest magnitude, no floor), or, where the output's dtype is narrower than the source's, a few of
    the output's roundings instead (what rounding every weight can move it by); still far below what a real
    mistake (k and v swapped, a lost window) moves it by, because each layer is judged by its own
    contribution, not by the residual stream it adds to."""

    tol: float
    source: str  # the dtypes on each side, as the report shows them
    output: str
    rounding: float  # of the output's dtype where it is narrower than the source's, else 0

    @classmethod
    def of(cls, tol: float, source: Checkpoint, out: Checkpoint) -> Bounds:
        def widest(ckpt: Checkpoint) -> float:
            return min((ROUNDING[t.dtype] for t in ckpt.tensors.values() if t.dtype in ROUNDING), default=0.0)

        narrower = widest(out) > widest(source)
        return cls(tol, dtype_of(source), dtype_of(out), widest(out) if narrower else 0.0)

    @property
    def relative(self) -> float:
        return max(self.tol, ROUNDINGS * self.rounding)

    def part(self, ref: torch.Tensor, residual: torch.Tensor | None = None) -> float:
        """For one part (a layer's contribution: its output minus its input), by the part's own scale; the
        float32 rounding of the residual it was taken from is allowed on top (``x + c - x`` is not ``c``)."""
        floor = 0.0 if residual is None else 8 * ROUNDING["float32"] * _scale(residual)
        return self.relative * _scale(ref) + floor

    def end_to_end(self, ref: torch.Tensor, layers: int) -> float:
        """For the logits of the whole model run on its own (not fed the reference's states): rounding
        accumulates over the layers, about as the square root of their number."""
        return max(self.tol, ROUNDINGS * self.rounding * math.sqrt(max(layers, 1))) * _scale(ref)

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "output": self.output, "relative_tolerance": self.relative}

    def describe(self) -> str:
        widened = f": tolerances {ROUNDINGS}x {self.output}'s rounding" if self.rounding else ""
        return f"source {self.source}, output {self.output}{widened}"


def _scale(t: torch.Tensor) -> float:
    value = t.abs().max().item() if t.numel() else 0.0
    return value if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class Probe:
    """One length the function was probed at, and why (a switch point of a config, or the everyday probe)."""

    tokens: int
    why: str


NORMS = ("norm", "final_layernorm")  # the final norm's name in each family


class Converted:
    """A folder (the output, or a source of today's architectures) through transformers' own modules, one
    block materialised at a time. ``config``: the config to build instead of the folder's own (a source
    whose config.json names a class transformers lacks, run by the class of the architecture it names), and
    ``stored``: where the folder holds each of that class's tensors."""

    def __init__(
        self,
        folder: Path,
        stack: ExitStack,
        adapter: Adapter | None = None,
        config: Any = None,
        stored: Callable[[str], str] = str,
    ) -> None:
        import torch

        from phi_rules.planning.target import model_class

        self.adapter, self.stored = adapter, stored

        try:
            if config is None:
                raw = json.loads((folder / "config.json").read_text())
                config = model_class(raw["architectures"][0]).config_class.from_pretrained(folder)
            cls = model_class(config.architectures[0])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise PhiRulesError(f"{folder}: cannot read its config.json: {exc}") from None
        config._attn_implementation = "eager"
        with torch.device("meta"):
            self.model: Any = cls(config)
        self.model.eval()
        self.rotary = type(self.model.model.rotary_emb)(config=config)  # real buffers, not meta
        files = weight_files(folder)
        # Read with pread, one tensor at a time, like the source: a memory map would keep every page it
        # touched in the resident set, the whole model by the end.
        self.files = stack.enter_context(Checkpoint(files))
        self.folder = folder

    def get(self, name: str) -> torch.Tensor:
        missing = f"{self.folder}: no tensor {self.stored(name)!r}, which {type(self.model).__name__} needs"
        tensor = weight_of(self.files, self.stored(name), None, missing)
        return self.adapter.apply(name, tensor) if self.adapter else tensor

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

    def context(self, tokens: int) -> list[dict[str, Any]]:
        """What the model's own forward hands each decoder layer at ``tokens`` tokens: its attention mask (the
        sliding window or chunks the class applies for this config, per layer type) and position embeddings
        (longrope's factors for this length). Read by running that forward with each layer replaced by one
        that records its arguments, so the mask is the class's, not this tool's reading of the config."""
        import torch

        calls: list[dict[str, Any]] = []

        class Record(torch.nn.Module):
            def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                calls.append(kwargs)
                return hidden_states

        body = self.model.model
        kept = {name: getattr(body, name) for name in ("layers", "rotary_emb", *NORMS) if hasattr(body, name)}
        try:
            body.layers = torch.nn.ModuleList(Record() for _ in kept["layers"])
            body.rotary_emb = self.rotary
            for name in NORMS:
                if name in kept:
                    setattr(body, name, torch.nn.Identity())
            body(inputs_embeds=torch.zeros(1, tokens, self.model.config.hidden_size), use_cache=False)
        finally:
            for name, module in kept.items():
                setattr(body, name, module)
        return calls


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
    probes: list[Probe]
    bounds: Bounds | None  # None: no function check was possible (see ``checked``)
    checked: str = ""  # what was checked instead of the function, where nothing could run it
    reference: str = ""  # what ran the source: a legacy layout's name or transformers' class
    notes: list[str] = field(default_factory=list)  # what was not there to check, one line each

    @property
    def first_bad(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    def to_json(self) -> dict[str, object]:
        bad = self.first_bad
        return {
            "ok": bad is None,
            "first_divergence": None if bad is None else f"{bad.part}: {bad.hint}",
            "function_checked": self.bounds is not None,
            "checked_instead": self.checked or None,
            "notes": self.notes,
            "lengths": [p.tokens for p in self.probes],
            "probes": [{"tokens": p.tokens, "why": p.why} for p in self.probes],
            "dtypes": None if self.bounds is None else self.bounds.to_json(),
            "parts": [
                {"part": r.part, "max_abs_delta": r.delta, "tolerance": r.tolerance, "ok": r.ok} for r in self.rows
            ],
        }


def delta(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b|; infinite where the shapes differ or either side is not finite (NaN is never close)."""
    if a.shape != b.shape:
        return math.inf
    d = (a - b).abs().max().item() if a.numel() else 0.0
    return d if math.isfinite(d) else math.inf


def failure(out: Path, report: Report) -> PhiRulesError | None:
    """The one-line error for the first part that diverges, or None when everything is within tolerance."""
    bad = report.first_bad
    if bad is None:
        return None
    return PhiRulesError(
        f"{out}: {bad.part} diverges (max|Δ| {bad.delta:.2e} > {bad.tolerance:.2e}) from the original: {bad.hint}"
    )


LEGACY_PARTS = ("norm", "attention", "mlp")  # the parts of a block compared one by one, shown in its row


def layer_rows(report: Report) -> list[tuple[str, float, float]]:
    """One row per layer and probe length (its worst part, relative to its tolerance), plus embeddings,
    final norm and logits."""
    grouped: dict[str, Row] = {}
    for r in report.rows:
        key = " ".join(w for w in r.part.split() if w not in LEGACY_PARTS) if r.part.startswith("layer ") else r.part
        worst = grouped.get(key)
        if worst is None or r.delta / max(r.tolerance, 1e-30) > worst.delta / max(worst.tolerance, 1e-30):
            grouped[key] = r
    return [(k, r.delta, r.tolerance) for k, r in grouped.items()]
