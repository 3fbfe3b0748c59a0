"""A rule's output parts (``target.parts``): sub-folders beside the model, each a PEFT adapter of the target.

The steps name a part's tensors ``PART/…``; here they are taken out of the model's tensors, and each part's
adapter_config.json is computed from its expressions. A PEFT adapter is checked as PEFT will read it, before
anything is written: each module has both matrices (a LoRA without its B is not an adapter), and their rank
is the config's ``r`` (PEFT builds ``r`` rows and would refuse, or worse, load a slice). No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from phi_rules.errors import Diagnostic
from phi_rules.language import expr
from phi_rules.language.rules import Part, Rule

if TYPE_CHECKING:  # the planner imports this module
    from phi_rules.planning.planner import PlannedTensor

_MATRICES = {"lora_A": 0, "lora_B": 1}  # each matrix and the axis that holds the rank


@dataclass(frozen=True)
class PartPlan:
    """One part to write: its folder name, its tensors (named as in the folder) and its adapter_config.json."""

    name: str
    tensors: list[PlannedTensor]  # named as in the folder
    adapter_config: dict[str, object]


def _config(part: Part, env: Mapping[str, expr.Value], problems: list[Diagnostic]) -> dict[str, object]:
    values: dict[str, object] = {}
    for key, node in part.adapter_config.items():
        try:
            value = expr.evaluate(node, env)
        except expr.ExprError as exc:
            problems.append(part.where.error(f"part {part.name}: cannot compute {key}: {exc.message}", "part"))
            continue
        if value is not None:
            values[key] = value
    return values


def _lora_problems(shapes: Mapping[str, tuple[int, ...]], rank: object) -> list[str]:
    """Modules with one matrix of the pair, and matrices whose rank is not the config's ``r``."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        for matrix in _MATRICES:
            head, sep, _ = name.partition(f".{matrix}.")
            if sep:
                modules.setdefault(head, {})[matrix] = shape
    found, ranks = [], []
    for module, matrices in sorted(modules.items()):
        lacking = [m for m in _MATRICES if m not in matrices]
        if lacking:
            found.append(f"{module} has {', '.join(matrices)} but no {lacking[0]}: a LoRA needs both")
            continue
        ranks += [
            (module, shape[axis])
            for matrix, axis in _MATRICES.items()
            if len(shape := matrices[matrix]) == 2 and isinstance(rank, int) and shape[axis] != rank
        ]
    if ranks:
        found.append(
            f"{ranks[0][0]} (and {len(ranks) - 1} more matrices) has rank {ranks[0][1]} where the config's r is {rank}"
        )
    return found


def split(
    rules: Rule, tensors: list[PlannedTensor], env: Mapping[str, expr.Value], problems: list[Diagnostic]
) -> tuple[list[PlannedTensor], list[PartPlan], list[str]]:
    """The model's own tensors, the parts to write and a note for each part not written (a source without
    it); problems are appended to ``problems``."""
    parts = {p.name: p for p in rules.target.parts}
    own: list[PlannedTensor] = []
    members: dict[str, list[PlannedTensor]] = {p: [] for p in parts}
    for t in tensors:
        folder, sep, rest = t.name.partition("/")
        if not sep:
            own.append(t)
        elif folder in members:
            members[folder].append(replace(t, name=rest))
        else:
            declared = ", ".join(parts) or "none"
            problems.append(
                rules.where_target.error(f"output {t.name!r} lies in no part of target.parts (declared: {declared})")
            )
    planned, notes = [], []
    for name, part in parts.items():
        if not members[name]:
            if part.absent is None:
                problems.append(part.where.error(f"part {name}: the steps give it no tensor", "part"))
            else:
                notes.append(f"{name}/ not written: {part.absent}")
            continue
        config = _config(part, env, problems)
        shapes = {t.name: t.shape for t in members[name]}
        for problem in _lora_problems(shapes, config.get("r")):
            problems.append(part.where.error(f"refused: part {name}: {problem}", "refused"))
        planned.append(PartPlan(name, members[name], config))
    return own, planned, notes
