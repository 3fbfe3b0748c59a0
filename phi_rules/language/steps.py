"""The ``steps`` of a rule: renames, keeps, drops and transforms, built from their rule-file form (regex or
short form) into typed steps, each op checked against the tensors it leaves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from phi_rules.language import expr, ops, regex, reverse, shortform, template
from phi_rules.language.checker import Checker, Where, YPath
from phi_rules.language.ops import Op


@dataclass(frozen=True)
class Rename:
    name: str
    where: Where
    optional: bool
    pairs: tuple[tuple[regex.Pattern, template.Template], ...]  # the first pair that matches renames
    anywhere: bool
    when: expr.Node | None
    keeps: bool = False  # a ``keep`` step: names that stay as they are


@dataclass(frozen=True)
class Drop:
    name: str
    where: Where
    optional: bool
    pattern: regex.Pattern


@dataclass(frozen=True)
class Transform:
    name: str
    where: Where
    optional: bool
    patterns: tuple[regex.Pattern, ...]
    ops: tuple[Op, ...]
    to: tuple[template.Template, ...]
    when: expr.Node | None
    absent: bool = False  # ``absent: zeros``: an input may be missing; the first op stands zeros in for it


Step = Rename | Drop | Transform


# A short-form name is a module: this group takes what lies under it (``.weight``, ``.lora_A.weight``, nothing).
UNDER_PATTERN = f"(?P<{shortform.UNDER}>(?:\\.[^.]+)*)"


def _build_ops(
    c: Checker, path: YPath, body: dict[str, Any], known: Mapping[str, str], count: int
) -> tuple[list[Op], list[object]]:
    """A transform's ops, from ``count`` inputs, and its output names, whose count must be what the ops leave."""
    built: list[Op] = []
    for j, (kind, arg) in enumerate(next(iter(raw.items())) for raw in body["ops"]):
        ctx = ops.BuildContext(
            (*path, "ops", j), count, lambda p, v: c.parse_expr(p, v, known), lambda p, m: c.error(p, m)
        )
        op = ops.OPS[kind].build(arg, ctx)
        if op is not None:
            count = op.leaves(count)
            built.append(op)
    outs = body["to"] if isinstance(body["to"], list) else [body["to"]]
    if len(outs) != count:
        c.error((*path, "to"), f"the ops leave {count} tensor(s) but {len(outs)} output name(s) are given")
    return built, outs


def _group_names(patterns: Iterable[regex.Pattern | None]) -> dict[str, str]:
    return {g: "group" for p in patterns if p is not None for g in p.groupindex}


def build_step(c: Checker, i: int, raw: dict[str, object], config_names: Mapping[str, str]) -> Step | None:
    path: YPath = ("steps", i)
    kind = next(k for k in ("rename", "keep", "drop", "transform") if k in raw)
    name = str(raw.get("name", f"{kind}[{i}]"))
    where = c.where(path)
    optional = bool(raw.get("optional", False))
    body = raw[kind]
    if raw.get("recomputed") and kind != "drop":
        c.error((*path, "recomputed"), f"recomputed belongs to a drop step, not to a {kind} step")
    short_rename = kind == "rename" and isinstance(body, dict) and "match" not in body
    if "when" in raw and not short_rename:
        c.error((*path, "when"), "a step-level when belongs to a short-form rename (a regex form has its own)")
    if kind == "drop":
        assert isinstance(body, str)
        pattern = c.compile((*path, "drop"), body)
        return Drop(name, where, optional, pattern) if pattern else None
    if kind == "keep":  # names that stay: the short form's identity renames, written once
        assert isinstance(body, list)
        pairs = _short_pairs(c, (*path, kind), {str(t): reverse.plain(str(t)) for t in body}, config_names)
        return Rename(name, where, optional, pairs, False, None, keeps=True) if pairs else None
    assert isinstance(body, dict)
    if kind == "transform" and "from" in body:
        return _short_transform(c, path, name, optional, body, config_names)
    if short_rename:
        pairs = _short_pairs(c, (*path, kind), body, config_names)
        when = _short_when(c, path, raw, body, config_names)
        return Rename(name, where, optional, pairs, False, when) if pairs else None
    texts = body["match"] if isinstance(body["match"], list) else [body["match"]]
    match_path: YPath = (*path, kind, "match")
    patterns = [
        c.compile((*match_path, j) if isinstance(body["match"], list) else match_path, t) for j, t in enumerate(texts)
    ]
    groups = _group_names(patterns)
    for g in groups:
        if g in config_names:
            c.error(
                match_path, f"group name {g!r} shadows the {config_names[g]} value of the same name; rename the group"
            )
    known = {**config_names, **groups}
    when = c.parse_expr((*path, kind, "when"), body["when"], known) if "when" in body else None
    first = patterns[0]
    if kind == "rename":
        to = c.parse_template((*path, kind, "to"), str(body["to"]), first, known)
        if first is None or to is None:
            return None
        return Rename(name, where, optional, ((first, to),), bool(body.get("anywhere", False)), when)
    built, outs = _build_ops(c, (*path, kind), body, known, len(texts))
    tos = [c.parse_template((*path, kind, "to"), str(t), first, known) for t in outs]
    if any(p is None for p in patterns) or any(t is None for t in tos):
        return None
    absent = _absent(c, (*path, kind), body, len(texts), built)
    return Transform(name, where, optional, tuple(patterns), tuple(built), tuple(tos), when, absent)  # type: ignore[arg-type]


def _absent(c: Checker, path: YPath, body: dict[str, Any], inputs: int, built: list[Op]) -> bool:
    """``absent: zeros`` is checked here: it needs several inputs and a first op that can stand zeros in."""
    if "absent" not in body:
        return False
    if inputs < 2:
        c.error((*path, "absent"), "absent: zeros needs several inputs (one may then be missing)")
    elif built and type(built[0]).fill is Op.fill:
        c.error(
            (*path, "absent"),
            f"absent: zeros needs a first op that can stand zeros in (concat, block_diagonal), not {built[0].name}",
        )
    return True


def _short_transform(
    c: Checker, path: YPath, name: str, optional: bool, body: dict[str, Any], known: Mapping[str, str]
) -> Transform | None:
    """A transform written in the short form: ``from`` names with ``{placeholders}``, ``to`` likewise. Each name
    is a module, as in renames: the ops run on every tensor under it (a weight and its bias) alike."""
    froms = body["from"] if isinstance(body["from"], list) else [body["from"]]
    patterns: list[regex.Pattern | None] = []
    kinds: dict[str, str] = {}
    for j, text in enumerate(froms):
        where = (*path, "transform", "from", *((j,) if isinstance(body["from"], list) else ()))
        try:
            regex, found = shortform.pattern(str(text), c.placeholders)
        except shortform.ShortFormError as exc:
            c.error(where, f"bad short-form pattern {text!r}: {exc.message} at character {exc.offset + 1}")
            patterns.append(None)
            continue
        kinds |= found
        patterns.append(c.compile(where, regex + UNDER_PATTERN))
    built, outs = _build_ops(c, (*path, "transform"), body, known, len(froms))
    tos: list[template.Template | None] = []
    for text in outs:
        try:
            to = shortform.target(str(text), kinds, known) + f"\\g<{shortform.UNDER}>"
        except shortform.ShortFormError as exc:
            c.error((*path, "transform", "to"), f"{exc.message} (in {text!r} at character {exc.offset + 1})")
            tos.append(None)
            continue
        placeholders = {**known, **dict.fromkeys(kinds, "placeholder")}
        tos.append(c.parse_template((*path, "transform", "to"), to, patterns[0], placeholders))
    if any(p is None for p in patterns) or any(t is None for t in tos):
        return None
    absent = _absent(c, (*path, "transform"), body, len(froms), built)
    return Transform(name, c.where(path), optional, tuple(patterns), tuple(built), tuple(tos), None, absent)  # type: ignore[arg-type]


def _short_when(
    c: Checker, path: YPath, raw: dict[str, object], body: dict[str, Any], known: Mapping[str, str]
) -> expr.Node | None:
    """A short-form rename's step-level ``when``, over its placeholders (digits are numbers) and config values."""
    if "when" not in raw:
        return None
    names = dict(known)
    for text in body:
        try:
            names |= dict.fromkeys(shortform.pattern(str(text), c.placeholders)[1], "placeholder")
        except shortform.ShortFormError:
            continue  # reported with the pair
    return c.parse_expr((*path, "when"), raw["when"], names)


def _short_pairs(
    c: Checker, path: YPath, body: dict[str, object], known: Mapping[str, str]
) -> tuple[tuple[regex.Pattern, template.Template], ...] | None:
    """The short rename form's ``pattern: target`` pairs, as regex-form pairs (see :mod:`shortform`). A name is
    a module: what lies under it (``.weight``, ``.bias``, ``.lora_A.weight``) moves with it."""
    pairs = []
    for source_text, target_text in body.items():
        where = (*path, source_text)
        try:
            text, kinds = shortform.pattern(source_text, c.placeholders)
        except shortform.ShortFormError as exc:
            c.error(
                where, f"bad short-form pattern {source_text!r}: {exc.message} at character {exc.offset + 1}", key=True
            )
            continue
        for name in kinds:
            if name in known:
                c.error(where, f"placeholder {{{name}}} shadows the {known[name]} value of the same name", key=True)
        try:
            to = shortform.target(str(target_text), kinds, known) + f"\\g<{shortform.UNDER}>"
        except shortform.ShortFormError as exc:
            c.error(where, f"{exc.message} (in {target_text!r} at character {exc.offset + 1})")
            continue
        compiled = c.compile(where, text + UNDER_PATTERN)
        tpl = c.parse_template(where, to, compiled, {**known, **dict.fromkeys(kinds, "placeholder")})
        if compiled is not None and tpl is not None:
            pairs.append((compiled, tpl))
    return tuple(pairs) if len(pairs) == len(body) else None


def check_unique_names(c: Checker, steps: list[object]) -> None:
    seen: dict[str, int] = {}
    for i, raw in enumerate(steps):
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            name = raw["name"]
            if name in seen:
                c.error(("steps", i, "name"), f"duplicate step name {name!r} (first used by steps/{seen[name]})")
            seen.setdefault(name, i)
