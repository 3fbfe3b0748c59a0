"""The declarative rewrite of a PEFT ``adapter_config.json`` for a converted adapter, without torch.

A rule's ``target.adapter`` says how module names map (``Wqkv`` → ``q_proj``, ``k_proj``,
``v_proj``; ``out_proj`` → ``dense``; …), what replaces the layout's path pieces in regex
``target_modules`` (``transformer\\.h`` → ``model\\.layers``), and which fields a user may set with
``--set`` (``base_model_name_or_path``). The keys of ``rank_pattern`` and ``alpha_pattern`` are rewritten
like regex target modules; ``layers_pattern`` is mapped by the rule and ``layers_to_transform`` shifted where the
layouts number blocks differently. A module that fuses parts (``fused``: q, k and v into ``qkv_proj``) has the
parts' A matrices stacked and B block-diagonal, so its rank is parts * r; its alpha keeps the scale
(parts * alpha, or sqrt(parts) * alpha with rsLoRA, whose scale is alpha / sqrt(r)); both go to the patterns.
The fields that name the base model are written empty unless ``--set`` names the converted base.
Everything else — ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``, dropout — is kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from phi_rules.errors import Diagnostic
from phi_rules.language import regex
from phi_rules.language.rules import AdapterSpec

# The adapter_config.json fields that name the base model or its class (PEFT: the model, its revision, and
# for a remote-code base the class and module). The source's name the model before conversion, which the
# converted adapter does not fit (AutoPeftModelForCausalLM would load it and attach what matches): written
# empty unless ``--set`` names the converted base (``settable``).
NAMES_THE_BASE = ("base_model_name_or_path", "revision", "auto_mapping")


def _names(value: list[str], spec: AdapterSpec, key: str, problems: list[str]) -> list[str]:
    out: list[str] = []
    for name in value:
        if name not in spec.modules:
            problems.append(f"{key}: module {name!r} has no mapping in the rule (it maps {', '.join(spec.modules)})")
            continue
        out += [n for n in spec.modules[name] if n not in out]
    return out


def _regex(value: str, spec: AdapterSpec) -> str:
    """A regex over module names: path pieces replaced, each mapped name replaced by its target (or the
    alternation of its targets)."""
    for old, new in spec.paths.items():
        value = value.replace(old, new)
    for old, new_names in spec.modules.items():
        new = new_names[0] if len(new_names) == 1 else "(?:" + "|".join(new_names) + ")"
        value = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(old)}(?![A-Za-z0-9_])", new.replace("\\", "\\\\"), value)
    return value


def _patterns(config: dict[str, Any], spec: AdapterSpec, modules: list[str], problems: list[str]) -> None:
    """Rewrite the pattern keys; give each fused module the rank and alpha that keep its parts' scale."""
    parts = {name for name, targets in spec.modules.items() if set(targets) & set(spec.fused)}
    part_of = {m: leaf for m in modules if (leaf := m.rsplit(".", 1)[-1]) in parts}  # module -> its part's name
    for field in ("rank_pattern", "alpha_pattern"):
        value = config.get(field) or {}
        if not isinstance(value, dict):
            problems.append(f"{field}: expected a mapping of module patterns to numbers, not {value!r}")
            continue
        for key in value:
            hit = next((m for m in part_of if regex.peft_key_matches(key, m)), None)
            if hit is not None:
                problems.append(
                    f"{field}: {key!r} sets {hit} apart from the other parts of its fused module; fusing needs "
                    "one rank and alpha for all of them"
                )
        config[field] = {_regex(str(k), spec): v for k, v in value.items()}
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not spec.fused or not isinstance(r, int) or not isinstance(alpha, int | float):
        return
    present = {spec.modules[leaf][0] for leaf in part_of.values()}
    for module, n in spec.fused.items():
        if module not in present:  # PEFT warns about a pattern key that matches no module
            continue
        config["rank_pattern"][module] = n * r
        config["alpha_pattern"][module] = alpha * (math.sqrt(n) if config.get("use_rslora") else n)


def _layers(config: dict[str, Any], spec: AdapterSpec, problems: list[str]) -> None:
    """``layers_pattern`` (the name of the module list that ``layers_to_transform`` counts in) mapped by the rule,
    and each index of ``layers_to_transform`` moved by the rule's ``layer_shift``: PEFT adapts only the layers
    they select, and names that the output's model lacks make it refuse the adapter."""
    pattern = config.get("layers_pattern")
    names = [pattern] if isinstance(pattern, str) else [] if pattern is None else pattern
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append(f"layers_pattern: expected a name or a list of names, not {pattern!r}")
    elif names:  # None or empty: PEFT counts the first numbered piece of each module's path
        missing = [n for n in names if n not in spec.layers_pattern]
        if missing:
            maps = ", ".join(spec.layers_pattern) or "none"
            problems.append(f"layers_pattern: {missing[0]!r} has no mapping in the rule (it maps {maps})")
        else:
            config["layers_pattern"] = (
                spec.layers_pattern[pattern] if isinstance(pattern, str) else [spec.layers_pattern[n] for n in names]
            )
    indices = config.get("layers_to_transform")
    if indices is None or not spec.layer_shift:
        return
    listed = [indices] if isinstance(indices, int) else indices
    if not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        problems.append(f"layers_to_transform: expected a layer index or a list of them, not {indices!r}")
        return
    shifted = [i + spec.layer_shift for i in listed]
    if any(i < 0 for i in shifted):
        problems.append(f"layers_to_transform: {indices!r} names a layer that is no block of the output's model")
        return
    config["layers_to_transform"] = shifted[0] if isinstance(indices, int) else shifted


def converted(
    raw: Mapping[str, Any] | None,
    spec: AdapterSpec,
    overrides: Mapping[str, object],
    where: Diagnostic,
    tensors: list[str],
) -> tuple[dict[str, Any], list[Diagnostic]]:
    """The adapter_config.json for the converted adapter, and the problems found (located at ``where``);
    ``tensors`` are the source adapter's tensor names, whose modules the pattern keys are matched on."""
    if raw is None:
        return {}, [Diagnostic("the adapter has no adapter_config.json", where.file, where.line, where.column)]
    problems: list[str] = []
    config = dict(raw)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: only LoRA and DoRA adapters convert")
    for key in ("target_modules", "modules_to_save"):
        value = config.get(key)
        if isinstance(value, str):  # one module name, or a regex over module paths
            config[key] = list(spec.modules[value]) if value in spec.modules else _regex(value, spec)
        elif isinstance(value, list):
            config[key] = _names(value, spec, key, problems)
        elif value is not None:
            problems.append(f"{key}: expected a list or a regular expression, not {value!r}")
    modules = sorted({n.removeprefix("base_model.model.").split(".lora_")[0] for n in tensors})
    _patterns(config, spec, modules, problems)
    _layers(config, spec, problems)
    config.update(dict.fromkeys(NAMES_THE_BASE))  # each named the model the adapter no longer fits
    config.update({k: v for k, v in overrides.items() if k in spec.settable})
    located = [Diagnostic(p, where.file, where.line, where.column, "target/adapter", "adapter") for p in problems]
    return config, located
