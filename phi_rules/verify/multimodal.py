"""The reference for Phi-4-multimodal's original remote-code layout (``Phi4MMForCausalLM``, which transformers has
no class for), never through the rule being verified: its text decoder run by transformers' own
``Phi4MultimodalForCausalLM`` on text input only.

That class is built on ``meta`` from a config made of the remote config.json's own fields (keyword arguments,
read by transformers' own handling of the 4.x rope fields; the sections only the remote code's encoders and
LoRAs read left out), and filled from the checkpoint by this module's one mapping: every decoder linear is
wrapped by PEFT, so its weight is ``X.base_layer.weight`` (the ``lora_A/B.vision|speech`` tensors beside it
are not the text model's). The text model is then compared with the output's as :mod:`.own_class` compares
any two (per layer, on both sides of ``original_max_position_embeddings``, end to end); the remote layout may
be on either side (``--to phi3`` or ``--to phi4-multimodal``, or the native folder back to ``phi4mm``).

Each LoRA is then checked weight for weight, as each side runs it: in the remote layout, the base weight with
``lora_B.<name> @ lora_A.<name>`` added at the checkpoint's own scale (``lora_alpha / r`` of config.json's
``<name>_lora`` section); in a ``<name>-lora/`` folder, PEFT's own ``PeftModel.from_pretrained`` on the
folder's model, merged by ``merge_and_unload`` (which loads that model whole, as PEFT needs it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.errors import PhiRulesError
from phi_rules.verify.common import Adapter, Bounds, Converted, Report, Row, delta
from phi_rules.verify.own_class import compare

if TYPE_CHECKING:
    import torch

REMOTE = "Phi4MMForCausalLM"
NATIVE = "Phi4MultimodalForCausalLM"
LORAS = ("vision", "speech")
# Fields of the remote config.json that name the remote code or configure its encoders and LoRAs.
REMOTE_ONLY = ("architectures", "auto_map", "model_type", "embd_layer", "img_processor", "audio_processor")
WRAPPED = re.compile(r"(model\.layers\.\d+\.(?:self_attn\.(?:qkv|o)_proj|mlp\.(?:gate_up|down)_proj))\.weight")


def architecture(folder: Path) -> str | None:
    """The first architecture a folder's config.json names, if it names one."""
    try:
        return str(json.loads((folder / "config.json").read_text())["architectures"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _raw(folder: Path) -> dict[str, Any]:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PhiRulesError(f"{folder}: cannot read its config.json: {exc}") from None
    if not isinstance(raw, dict):
        raise PhiRulesError(f"{folder}/config.json: not a JSON object")
    return raw


def remote(folder: Path, stack: ExitStack, adapter: Adapter | None = None) -> Converted:
    """A remote-layout folder's text decoder as transformers' own Phi4MultimodalForCausalLM runs it."""
    import warnings

    from transformers.models.phi4_multimodal.configuration_phi4_multimodal import Phi4MultimodalConfig

    fields = {k: v for k, v in _raw(folder).items() if k not in REMOTE_ONLY and not k.endswith("_lora")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = Phi4MultimodalConfig(**fields, architectures=[NATIVE])
    except (ValueError, TypeError, KeyError) as exc:
        raise PhiRulesError(f"{folder}/config.json: not a Phi-4-multimodal text config: {exc}") from None
    return Converted(folder, stack, adapter, config, lambda name: WRAPPED.sub(r"\1.base_layer.weight", name))


def _side(folder: Path, stack: ExitStack, adapter: Adapter | None) -> Converted:
    return remote(folder, stack, adapter) if architecture(folder) == REMOTE else Converted(folder, stack, adapter)


def verify_multimodal(
    source: Path,
    out: Path,
    tol: float,
    adapters: tuple[Path, Path] | None = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
    max_length: int | None = None,
) -> Report:
    """The text model of each side, then each LoRA, the source against the output (one of them in the remote
    layout); ``adapters`` (verify --base): the original adapter folder and its conversion, merged into each
    side's text weights instead, with the multimodal LoRAs then left out."""
    import torch

    with torch.no_grad(), ExitStack() as stack:
        original, converted = (Adapter(a, stack) for a in adapters) if adapters else (None, None)
        src, conv = _side(source, stack, original), _side(out, stack, converted)
        bounds = Bounds.of(tol, src.files, conv.files)
        report = compare(src, conv, f"{NATIVE}'s text model", bounds, progress, max_length)
        if adapters is None:
            for lora in LORAS:
                _check_lora(lora, src, conv, bounds, report)
    return report


def _has(side: Converted, lora: str) -> bool:
    if architecture(side.folder) == REMOTE:
        return any(n.endswith(f".lora_A.{lora}.weight") for n in side.files.tensors)
    return (side.folder / f"{lora}-lora").is_dir()


def _check_lora(lora: str, src: Converted, conv: Converted, bounds: Bounds, report: Report) -> None:
    """One row for the LoRA (its worst decoder linear), or one note where neither side has it."""
    part, where = f"{lora}-lora", f"{conv.folder}/{lora}-lora/"
    has = _has(src, lora), _has(conv, lora)
    if not any(has):
        report.notes.append(f"{part}: the source has no {lora} LoRA, and the output none either: nothing to check")
        return
    if not all(has):
        hint = f"the source has the {lora} LoRA and the output lacks it ({where})"
        if not has[0]:
            hint = f"the output has a {lora} LoRA ({where}) the source lacks"
        report.rows.append(Row(part, float("inf"), 0.0, hint))
        return
    try:
        ref, got = _merged(src, lora), _merged(conv, lora)
    except PhiRulesError as exc:
        report.rows.append(Row(part, float("inf"), 0.0, str(exc)))
        return
    hint = "check {} of " + where + ": merged, it is not the source's"
    rows = [Row(part, delta(w, got.get(n, w.new_empty(0))), bounds.part(w), hint.format(n)) for n, w in ref.items()]
    if rows:  # the worst decoder linear, relative to its tolerance
        report.rows.append(max(rows, key=lambda r: r.delta / max(r.tolerance, 1e-30)))


def _merged(side: Converted, lora: str) -> dict[str, torch.Tensor]:
    """Every decoder linear of a side's text model with the LoRA merged, as that side runs it."""
    if architecture(side.folder) == REMOTE:
        return _merged_remote(side, lora)
    return _merged_peft(side, lora)


def _merged_remote(side: Converted, lora: str) -> dict[str, torch.Tensor]:
    """The base weights plus ``lora_B @ lora_A`` at the checkpoint's own ``lora_alpha / r``."""
    section: Any = _raw(side.folder).get(f"{lora}_lora")
    try:
        scale = float(section["lora_alpha"]) / float(section["r"])
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        raise PhiRulesError(
            f"{side.folder}/config.json: no {lora}_lora section with r and lora_alpha: the LoRA's scale is unknown"
        ) from None
    merged: dict[str, torch.Tensor] = {}
    for name in side.model.state_dict():
        if WRAPPED.fullmatch(name):
            module, weight = name.removesuffix(".weight"), side.get(name)
            a, b = (side.files.tensors.get(f"{module}.lora_{ab}.{lora}.weight") for ab in "AB")
            if a is not None and b is not None:
                weight = weight + scale * (side.files.load(b).float() @ side.files.load(a).float())
            merged[name] = weight
    return merged


def _merged_peft(side: Converted, lora: str) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the folder's ``<lora>-lora/`` into the folder's model, loaded whole in float32."""
    import warnings

    import torch
    from peft import PeftModel

    from phi_rules.planning.target import model_class

    folder = side.folder / f"{lora}-lora"
    try:
        with warnings.catch_warnings():  # PEFT's deprecation chatter
            warnings.simplefilter("ignore")
            model = model_class(type(side.model).__name__).from_pretrained(side.folder, dtype=torch.float32)
            weights = PeftModel.from_pretrained(model, folder).merge_and_unload().state_dict()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise PhiRulesError(f"PEFT cannot load {folder}/ on {side.folder}: {exc}") from None
    return {name: weights[name].float() for name in side.model.state_dict() if WRAPPED.fullmatch(name)}
