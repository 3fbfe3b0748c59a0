"""config.json as the target class writes it, plus what older readers of it need; then checked against
what the rule asked for. The plan's target check built the config object; this writes and reads it back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from phi_rules.errors import PhiRulesError
from phi_rules.planning.planner import Plan
from phi_rules.planning.target import saved_value, where


def older_readers(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level fields that transformers 4.x, llama.cpp and MLX-LM read, from ``rope_parameters``.

    transformers 5 keeps rotary settings only inside ``rope_parameters``; the older readers silently fall
    back to defaults without them (a partial_rotary_factor of 0.5 for phi-2's 0.4, a rope_theta of 10000
    for Phi-4's 250000, no longrope at all). What they need depends on the rope, not on the rule."""
    rope = saved.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    fields = {
        k: rope[k] for k in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings") if k in rope
    }
    kind = rope.get("rope_type", "default")
    if kind != "default":  # 4.x reads the scaling from rope_scaling, named by rope_type (and "type" before 4.45)
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        fields["rope_scaling"] = {**scaling, "type": kind}
    return fields


def write_config(plan: Plan, config: Any, folder: Path) -> None:
    """config.json as transformers writes it, plus what older readers look for at the top level."""
    config.save_pretrained(folder)
    path = folder / "config.json"
    saved = json.loads(path.read_text())
    saved.update(older_readers(saved))
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    check_saved_config(plan, saved)


def _holds(saved: Any, requested: Any) -> bool:
    """A requested value is saved; a requested object may gain fields the class fills in (``rope_parameters``)."""
    if isinstance(saved, dict) and isinstance(requested, dict):
        return all(k in saved and _holds(saved[k], v) for k, v in requested.items())
    return bool(saved == requested)


def check_saved_config(plan: Plan, saved: Mapping[str, Any]) -> None:
    """Require every requested value in config.json where transformers looks."""
    wrong = [
        where(plan, k).error(f"requested {v!r} but the saved config.json holds {saved_value(saved, k)!r}", "target")
        for k, v in plan.config.items()
        if v is not None and not _holds(saved_value(saved, k), v)
    ]
    wrong += [
        plan.rules.where_target.error(
            f"config.json holds {saved.get(k)!r} at the top level but {v!r} for transformers 5"
        )
        for k, v in older_readers(saved).items()
        if saved.get(k) != v
    ]
    if wrong:
        raise PhiRulesError(wrong)
