"""Derive a rule's backward twin from its forward form, so that no conversion is written twice.

The backward rule is built as a rule *document* (then checked like any other file, its errors located
at the forward lines they come from): steps run in the opposite order, each inverted —

- ``keep`` stays as it is; a short-form ``rename`` swaps its two sides (placeholder restrictions such as
  ``{p:weight|bias}`` move to the side that now matches; an index moved by a constant, ``{i - 1}``, moves
  back, and a ``when`` that pins an index, ``i == num_hidden_layers + 1``, writes that expression);
- a short-form ``transform`` swaps ``from`` and ``to`` and inverts its ops in reverse order: a split
  becomes a concat along the same dim (the sizes are the inputs' own);
- ``target.config`` values that are plain field names invert to the same names; ``copy`` stays;
- each op says what undoes it (:meth:`Op.undo`), given the shapes on both sides of it as the rule writes
  them, every part of a split its own (:mod:`symbolic`): view and reshape a reshape back to the shape before
  (refused where the rule's names cannot spell that shape), transpose and permute their inverse
  permutation, a repeat a take_one of its equal copies (and back), so a transform from several inputs to
  one inverts;
- a ``drop`` marked ``recomputed`` (buffers the model computes itself) writes nothing backward;
- an adapter rule's ``target.adapter`` maps each module name back to the one it came from;
- other drops, regex-form steps, ``when``, ``absent: zeros``, ops without an inverse (cast, concat and
  block_diagonal, whose parts' sizes the rule does not state) and a fused adapter target make the rule
  irreversible, and each is reported at its line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from phi_rules.errors import Diagnostic
from phi_rules.language import expr, shortform
from phi_rules.language.expr import CONSTANTS
from phi_rules.language.located_yaml import Located
from phi_rules.language.ops import OPS, Shapes
from phi_rules.language.symbolic import Opaque, Sym


def _restrictions(text: str) -> dict[str, str]:
    return {slot.name: slot.raw for slot in shortform.slots(text) if slot.restrict}


def _restrict(text: str, specs: dict[str, str]) -> str:
    """``{p}`` becomes ``{p:weight|bias}`` where the forward pattern restricted ``p``."""
    return shortform.rewrite(text, lambda slot: slot.raw if slot.restrict else specs.get(slot.name, slot.raw))


def plain(text: str) -> str:
    """A short-form name without placeholder restrictions: ``{p:weight|bias}`` becomes ``{p}``."""
    return shortform.rewrite(text, lambda slot: "{" + slot.name + "}")


def _pinned(when: str) -> tuple[str, str] | None:
    """``i == num_hidden_layers + 1``: the placeholder a condition pins, and the expression it is pinned to."""
    try:
        node = expr.parse(when)
    except expr.ExprError:
        return None
    if not (isinstance(node, expr.Binary) and node.op == "==" and isinstance(node.left, expr.Name)):
        return None
    return node.left.name, when.split("==", 1)[1].strip()


def _backward(frm: str, to: str, pinned: tuple[str, str] | None = None) -> tuple[str, str]:
    """The backward (pattern, target) of a forward short-form pair. ``{i - 1}`` in the target becomes ``{i}``
    in the backward pattern and the source's ``{i}`` becomes ``{i + 1}``; a placeholder that ``when`` pins to an
    expression is written as that expression; restrictions (``{p:weight|bias}``) move to the new pattern."""
    shifts = {slot.raw: moved for slot in shortform.slots(to) if (moved := slot.shift()) is not None}
    pattern = shortform.rewrite(to, lambda slot: "{" + shifts[slot.raw][0] + "}" if slot.raw in shifts else slot.raw)
    target = plain(frm)
    for name, amount in shifts.values():
        target = target.replace("{" + name + "}", "{" + f"{name} {'-' if amount > 0 else '+'} {abs(amount)}" + "}")
    if pinned is not None:
        target = target.replace("{" + pinned[0] + "}", "{" + pinned[1] + "}")
    return _restrict(pattern, _restrictions(frm)), target


def _as_list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def inverse_ops(ops: list[dict[str, Any]], inputs: int) -> list[dict[str, Any]] | str:
    """The ops that undo ``ops`` (rule-file form, from ``inputs`` tensors), or why there are none. The ops are
    followed forward on the shapes the rule writes (:mod:`symbolic`), every part of a split its own; then each,
    last first, says what undoes it given the shapes on both sides of it (:meth:`Op.undo`)."""
    given: list[Sym] = [Opaque("the transform's input" if inputs == 1 else f"input {k}") for k in range(inputs)]
    at = Shapes(given, given[0])
    seen: list[Shapes] = []
    for i, op in enumerate(ops):
        kind, arg = next(iter(op.items()))
        after = OPS[kind].follow(arg, at)
        if after is None:
            return f"uses {kind!r} (ops/{i}), which has no inverse in the rule language yet"
        seen.append(at)
        at = Shapes(after, after[0] if len(after) != len(at.current) else at.start)
    back = Shapes(at.current, at.current[0])  # backward, ``input`` first names the backward's own input
    inverse: list[dict[str, Any]] = []
    for i in reversed(range(len(ops))):
        kind, arg = next(iter(ops[i].items()))
        undone = OPS[kind].undo(arg, seen[i], back)
        if isinstance(undone, str):
            return f"has {kind} (ops/{i}) that {undone}"
        inverse.append(undone)
        made = seen[i].current
        back = Shapes(made, made[0] if len(made) != len(back.current) else back.start)
    return inverse


def _step(raw: dict[str, Any], problem: Callable[[str], None]) -> dict[str, Any] | None:
    kind = next(k for k in ("rename", "keep", "drop", "transform") if k in raw)
    head: dict[str, Any] = {k: raw[k] for k in ("name", "optional") if k in raw}
    body = raw[kind]
    if kind == "keep":
        return {**head, "keep": body}
    if kind == "drop":
        if not raw.get("recomputed"):
            problem("drops tensors, which the backward direction cannot bring back (unless `recomputed: true`)")
        return None  # buffers the model computes itself: the backward rule writes none
    if "match" in body:
        problem("is written in regex form; only the short form (dotted names with {placeholders}) inverts")
        return None
    if kind == "rename":
        pinned = None
        if "when" in raw:
            pinned = _pinned(str(raw["when"]))
            if pinned is None or any("{" + pinned[0] not in str(frm) for frm in body):
                problem("applies only `when` a condition holds that pins no placeholder (write `i == EXPR`)")
                return None
        return {**head, "rename": dict(_backward(str(frm), str(to), pinned) for frm, to in body.items())}
    if "when" in body:
        problem("applies only `when` a condition holds, which the backward direction cannot tell")
        return None
    froms, tos = _as_list(body["from"]), _as_list(body["to"])
    if len(froms) != 1 and len(tos) != 1:
        problem("joins several inputs into several outputs; a transform inverts from one input or to one output")
        return None
    if body.get("absent"):
        problem("stands zeros in for absent inputs, which the backward direction would write as tensors")
        return None
    ops = inverse_ops(body["ops"], len(froms))
    if isinstance(ops, str):
        problem(ops)
        return None
    if len(froms) == 1:  # one input to its outputs: backward, the outputs are the inputs
        pairs = [_backward(froms[0], t) for t in tos]
        return {**head, "transform": {"from": [p for p, _ in pairs], "ops": ops, "to": pairs[0][1]}}
    pairs = [_backward(f, tos[0]) for f in froms]
    return {**head, "transform": {"from": pairs[0][0], "ops": ops, "to": [t for _, t in pairs]}}


def _renames(config: dict[str, Any]) -> dict[str, str]:
    """Target config entries that are plain field names: ``target key -> source field``."""
    return {
        k: v
        for k, v in config.items()
        if isinstance(v, str) and v.isidentifier() and v not in CONSTANTS and "(" not in v
    }


FUSED_ONE_WAY = "fuses modules (target.adapter.fused), whose rank and alpha the backward cannot split"


def _fused(data: dict[str, Any]) -> bool:
    target = data.get("target")
    return isinstance(target, dict) and isinstance(target.get("adapter"), dict) and bool(target["adapter"].get("fused"))


def _adapter(target: dict[str, Any]) -> dict[str, Any] | None:
    """The backward ``target.adapter``: each module name maps back to the one it came from (q_proj, k_proj and
    v_proj to Wqkv), path pieces and ``layers_pattern`` names swap, the layer shift is undone; what the backward
    may be asked to set stays."""
    spec = target.get("adapter")
    if not isinstance(spec, dict):
        return None
    modules: dict[str, list[str]] = {}
    for old, new in (spec.get("modules") or {}).items():
        for name in new:
            back = modules.setdefault(name, [])
            if old not in back:
                back.append(old)
    paths = {new: old for old, new in (spec.get("paths") or {}).items()}
    layers = {new: old for old, new in (spec.get("layers_pattern") or {}).items()}
    shift = {"layer_shift": -spec["layer_shift"]} if isinstance(spec.get("layer_shift"), int) else {}
    kept = {"settable": spec["settable"]} if "settable" in spec else {}
    return {"modules": modules, "paths": paths, "layers_pattern": layers, **shift, **kept}


def one_way(data: dict[str, Any]) -> str | None:
    """Why a rule cannot run backward (a fused adapter target, or its first step that does not invert), or
    None when every step does."""
    if _fused(data):
        return FUSED_ONE_WAY
    for i, raw in enumerate(data.get("steps") or []):
        why: list[str] = []
        _step(raw, why.append)
        if why:
            return f"step {raw.get('name', f'steps/{i}')!r} {why[0]}"
    return None


def derive(located: Located) -> tuple[Located | None, list[Diagnostic]]:
    """The backward rule document of a forward one that has a ``reverse`` section."""
    data = located.data
    assert isinstance(data, dict) and isinstance(data.get("reverse"), dict)
    rev: dict[str, Any] = data["reverse"]
    problems: list[Diagnostic] = []
    if _fused(data):
        file, line, col = located.position(("reverse",))
        problems.append(Diagnostic(f"it {FUSED_ONE_WAY}", file, line, col, "reverse", "reverse"))
    if "architecture" not in rev:
        file, line, col = located.position(("reverse",))
        message = "missing required key 'architecture' (in this file or the base it extends)"
        problems.append(Diagnostic(message, file, line, col, "reverse", "schema"))
    marks = Located(None)
    marks.values[()] = located.position(("reverse",))
    steps: list[dict[str, Any]] = []
    raw_steps = data.get("steps") or []
    for i in reversed(range(len(raw_steps))):
        raw = raw_steps[i]
        name = raw.get("name", f"steps/{i}")

        def problem(why: str, i: int = i, name: str = name) -> None:
            file, line, col = located.position(("steps", i))
            problems.append(Diagnostic(f"step {name!r} cannot run backward: it {why}", file, line, col, f"steps/{i}"))

        inverted = _step(raw, problem)
        if inverted is not None:
            marks.take(located.subtree(("steps", i), ("steps", len(steps))))
            steps.append(inverted)
    source, target = data.get("source") or {}, data.get("target") or {}
    renames = _renames(target.get("config") or {})
    for old, new in (
        (("reverse", "config"), ("target", "config")),
        (("reverse", "config_defaults"), ("source", "config_defaults")),
        (("reverse", "refuse"), ("refuse",)),
        (("let",), ("let",)),
        (("placeholders",), ("placeholders",)),
    ):
        marks.take(located.subtree(old, new))
    for key in ("target", "source"):
        marks.values.setdefault((key,), located.position(("reverse",)))
    adapter = _adapter(target)
    document: dict[str, Any] = {
        "version": data.get("version", 1),
        "name": rev["name"],
        "description": rev.get("description", f"{data.get('name')}, backward."),
        **({"layout": target["layout"]} if target.get("layout") else {}),
        "detect": data.get("detect", False),
        "source": {
            **({"files": source["files"]} if adapter and "files" in source else {}),  # adapter file names
            "config_file": source.get("config_file", "config.json"),
            "extra_files": source.get("extra_files", []),
            "config_defaults": {
                **dict.fromkeys([*renames, *(target.get("copy") or []), *(rev.get("fields") or [])]),
                **(rev.get("config_defaults") or {}),
            },
        },
        "target": {
            "architecture": rev.get("architecture", ""),
            "config": {**{v: k for k, v in renames.items()}, **(rev.get("config") or {})},
            **{k: target[k] for k in ("check", "dtype", "format", "copy") if k in target},
            **{k: rev[k] for k in ("check", "remote_code") if k in rev},
            **({"layout": data["layout"]} if data.get("layout") else {}),
            **({"adapter": adapter} if adapter else {}),
        },
        "steps": steps,
    }
    for key in ("let", "placeholders"):
        if key in data:
            document[key] = data[key]
    if rev.get("refuse"):
        document["refuse"] = rev["refuse"]
    marks.data = document
    return (None if problems else marks), problems
