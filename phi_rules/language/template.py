"""Output-name templates: literal text with regex backreferences and computed ``{expressions}``.

``model.layers.{i - 1}.mlp.\\g<kind>`` renders group ``kind`` and the layer index minus one.
``\\N`` and ``\\g<name>`` insert a group's text; ``{expr}`` evaluates an expression in which the
match's named groups are names (digit-only captures become integers); ``{{`` and ``}}`` are braces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from phi_rules.language import expr, regex

_PART = re.compile(r"\\(?P<num>\d+)|\\g<(?P<group>\w+)>|\{\{|\}\}|\{(?P<expr>[^{}]*)\}|(?P<bad>[\\{}])")


@dataclass(frozen=True)
class GroupRef:
    group: int | str
    offset: int


@dataclass(frozen=True)
class Computed:
    node: expr.Node
    offset: int


Part = str | GroupRef | Computed


@dataclass(frozen=True)
class Template:
    """A parsed template; ``parts`` keep offsets so errors can point inside the string."""

    text: str
    parts: tuple[Part, ...]

    def groups(self) -> list[GroupRef]:
        return [p for p in self.parts if isinstance(p, GroupRef)]

    def names(self) -> list[tuple[expr.Name, int]]:
        """Names read by computed parts, each with the offset of its ``{``."""
        return [(n, p.offset) for p in self.parts if isinstance(p, Computed) for n in expr.names(p.node)]

    def render(self, match: regex.Match, env: Mapping[str, expr.Value]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, GroupRef):
                out.append(match.group(part.group) or "")
            else:
                value = expr.evaluate(part.node, env)
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                out.append(str(value).lower() if isinstance(value, bool) else str(value))
        return "".join(out)


def parse(text: str) -> Template:
    """Parse a template; raises :class:`expr.ExprError` with the offset of the first problem."""
    parts: list[Part] = []
    pos = 0
    for m in _PART.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        pos = m.end()
        if m.group("bad") is not None:
            what = "backslash" if m.group("bad") == "\\" else f"{m.group('bad')!r}"
            raise expr.ExprError(f"stray {what}: use \\N, \\g<name>, {{expr}}, {{{{ or }}}}", m.start())
        if m.group("num") is not None:
            parts.append(GroupRef(int(m.group("num")), m.start()))
        elif m.group("group") is not None:
            g = m.group("group")
            parts.append(GroupRef(int(g) if g.isdigit() else g, m.start()))
        elif m.group("expr") is not None:
            try:
                parts.append(Computed(expr.parse(m.group("expr")), m.start()))
            except expr.ExprError as exc:
                raise expr.ExprError(exc.message, m.start() + 1 + exc.offset) from None
        else:
            parts.append(m.group(0)[0])
    if pos < len(text):
        parts.append(text[pos:])
    return Template(text, tuple(parts))


def group_env(match: regex.Match) -> dict[str, expr.Value]:
    """Named groups as expression values: digit-only text becomes an int, an unmatched group null."""
    return {k: (int(v) if v is not None and v.isdigit() else v) for k, v in match.groupdict().items()}
