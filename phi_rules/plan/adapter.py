"""The declarative rewrite of a PEFT ``adapter_config.json`` for a converted adapter, without torch.

A rule's ``target.adapter`` says how module names map (``Wqkv`` → ``q_proj``, ``k_proj``,
``v_proj``; ``out_proj`` → ``dense``; …), what replaces the layout's path pieces in regex
``target_modules`` (``transformer\\.h`` → ``model\\.layers``), and which fields a user may set with
``--set`` (``base_model_name_or_path``). Everything else — ``r``, ``lora_alpha``, ``use_rslora``,
``use_dora``, dropout — is kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from phi_rules.errors import Diagnostic
from phi_rules.language.rules import AdapterSpec


def _names(value: list[str], spec: AdapterSpec, key: str, problems: list[str]) -> list[str]:
    out: list[str] = []
    for name in value:
        if name not in spec.modules:
            problems.append(f"{key}: module {name!r} has no mapping in the rule (it maps {', '.join(spec.modules)})")
            continue
        out += [n for n in spec.modules[name] if n not in out]
    return out


def _regex(value: str, spec: AdapterSpec) -> str:
    """A regex over module names: path pieces replaced, each mapped name replaced by the alternation of its targets."""
    for old, new in spec.paths.items():
        value = value.replace(old, new)
    for old, new_names in spec.modules.items():
        value = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(old)}(?![A-Za-z0-9_])", "(?:" + "|".join(new_names) + ")", value)
    return value


def converted(
    raw: Mapping[str, Any] | None, spec: AdapterSpec, overrides: Mapping[str, object], where: Diagnostic
) -> tuple[dict[str, Any], list[Diagnostic]]:
    """The adapter_config.json for the converted adapter, and the problems found (located at ``where``)."""
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
    if config.get("layers_pattern") is not None and spec.layers_pattern is not None:
        config["layers_pattern"] = spec.layers_pattern
    config["auto_mapping"] = None  # it named the original remote-code class; the base is now a transformers class
    config.update({k: v for k, v in overrides.items() if k in spec.settable})
    located = [Diagnostic(p, where.file, where.line, where.column, "target/adapter", "adapter") for p in problems]
    return config, located
