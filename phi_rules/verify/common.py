"""What every reference shares: the output read through transformers' own modules one block at a time,
adapters applied as PEFT merges them, and the report of per-part differences."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
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


def tolerance(tol: float, source: Checkpoint, out: Checkpoint) -> float:
    """``tol``, or a few roundings of the output's dtype where it is narrower than the source's (a ``--dtype
    bfloat16`` output of a float16 source): what rounding every weight can move a part by, and still 100x
    smaller than any real mistake (k and v swapped, a lost rotary setting) moves it."""

    def widest(ckpt: Checkpoint) -> float:
        return min((ROUNDING[t.dtype] for t in ckpt.tensors.values() if t.dtype in ROUNDING), default=0.0)

    narrower = widest(out) > widest(source)
    return max(tol, 16 * widest(out)) if narrower else tol


class Converted:
    """The output folder through transformers' own modules, one block materialised at a time."""

    def __init__(self, folder: Path, stack: ExitStack, adapter: Adapter | None = None) -> None:
        import torch

        from phi_rules.planning.target import model_class

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
        files = weight_files(folder)
        # Read with pread, one tensor at a time, like the source: a memory map would keep every page it
        # touched in the resident set, the whole model by the end.
        self.files = stack.enter_context(Checkpoint(files))
        self.folder = folder

    def get(self, name: str) -> torch.Tensor:
        return weight_of(self.files, name, self.adapter, f"{self.folder}: the output has no tensor {name!r}")

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


def delta(a: torch.Tensor, b: torch.Tensor) -> float:
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
