"""The short rename form: dotted names with ``{placeholders}`` instead of regular expressions.

``transformer.h.{i}.mlp.{fc:fc1|fc2}.{p}: model.layers.{i}.mlp.{fc}.{p}``, in a rule that declares
``placeholders: {i: int}``, is exactly the regex form

    match: 'transformer\\.h\\.(?P<i>\\d+)\\.mlp\\.(?P<fc>fc1|fc2)\\.(?P<p>[^.]+)'
    to: 'model.layers.\\g<i>.mlp.\\g<fc>.\\g<p>'

In the pattern, literal text matches itself; ``{name}`` matches one dotted segment (``[^.]+``), or
digits (``\\d+``) where the rule declares it an integer (``placeholders``, usually in the base it extends);
``{name:int}`` matches digits in that place alone; ``{name:a|b}`` matches one of the listed words. In the
target, ``{name}`` of a placeholder inserts its text; any other ``{expression}`` is computed, over config
values and the digit placeholders (which are integers there): ``{i - 1}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from phi_rules.language import expr

UNDER = "_under"  # in renames and keeps: the dotted rest of a name under the module it names (``.weight``)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class ShortFormError(Exception):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message, self.offset = message, offset


@dataclass(frozen=True)
class Slot:
    """One ``{…}`` of a short-form name, as written: in a pattern a placeholder with its restriction (``int``,
    ``a|b`` or none), in a target a placeholder or an expression."""

    start: int
    end: int
    raw: str  # as written, braces included
    inner: str  # between the braces, stripped
    name: str  # the placeholder's name (before any ``:``)
    restrict: str  # after the ``:``, or ""

    def shift(self) -> tuple[str, int] | None:
        """``{i - 1}``: the placeholder an expression moves by a constant, and by how much; None otherwise."""
        try:
            node = expr.parse(self.inner)
        except expr.ExprError:
            return None
        if not (isinstance(node, expr.Binary) and node.op in "+-" and isinstance(node.left, expr.Name)):
            return None
        amount = node.right.value if isinstance(node.right, expr.Const) else None
        if not isinstance(amount, int) or isinstance(amount, bool):
            return None
        return node.left.name, amount if node.op == "+" else -amount


def slots(text: str) -> list[Slot]:
    """The ``{…}`` of a short-form name, in order."""
    found = []
    for m in _PLACEHOLDER.finditer(text):
        inner = m.group(1).strip()
        name, colon, restrict = (part.strip() for part in inner.partition(":"))
        found.append(Slot(m.start(), m.end(), m.group(0), inner, name, restrict if colon else ""))
    return found


def rewrite(text: str, each: Callable[[Slot], str]) -> str:
    """``text`` with each ``{…}`` replaced by what ``each`` makes of it."""
    out, pos = [], 0
    for slot in slots(text):
        out += [text[pos : slot.start], each(slot)]
        pos = slot.end
    return "".join([*out, text[pos:]])


def _literal(text: str, offset: int) -> str:
    bad = next((i for i, ch in enumerate(text) if ch in "{}\\"), None)
    if bad is not None:
        raise ShortFormError(f"stray {text[bad]!r}: placeholders are written {{name}}", offset + bad)
    return text


def pattern(text: str, declared: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The regular expression for a short-form pattern, and each placeholder's kind: ``int`` or ``text``, as
    written there (``{i:int}``) or else as the rule declares it (``placeholders``), else text."""
    out: list[str] = []
    kinds: dict[str, str] = {}
    pos = 0
    for slot in slots(text):
        out.append(re.escape(_literal(text[pos : slot.start], pos)))
        pos = slot.end
        name, restrict, colon = slot.name, slot.restrict, ":" in slot.inner
        if not name.isidentifier():
            raise ShortFormError(
                f"bad placeholder {slot.raw}: expected {{name}}, {{name:int}} or {{name:a|b}}",
                slot.start,
            )
        if name in kinds:
            raise ShortFormError(f"placeholder {name!r} appears twice", slot.start)
        if name.startswith("_"):
            raise ShortFormError(f"placeholder {name!r}: names starting with _ are reserved", slot.start)
        words = restrict.split("|")
        if restrict == "int" or (not colon and declared.get(name) == "int"):
            kinds[name], regex = "int", r"\d+"
        elif colon and all(w and "." not in w for w in words):
            kinds[name], regex = "text", "|".join(map(re.escape, words))
        elif colon:
            raise ShortFormError(f"bad restriction in {slot.raw}: use :int or words separated by |", slot.start)
        else:
            kinds[name], regex = "text", r"[^.]+"
        out.append(f"(?P<{name}>{regex})")
    out.append(re.escape(_literal(text[pos:], pos)))
    return "".join(out), kinds


def target(text: str, kinds: dict[str, str], known: Collection[str]) -> str:
    """The regex-form template for a short-form target; checks every name it reads."""
    out: list[str] = []
    pos = 0
    for slot in slots(text):
        out.append(_literal(text[pos : slot.start], pos))
        pos = slot.end
        inner = slot.inner
        if inner in kinds:
            out.append(f"\\g<{inner}>")
            continue
        try:
            node = expr.parse(inner)
        except expr.ExprError as exc:
            raise ShortFormError(f"bad expression {slot.raw}: {exc.message}", slot.start + 1 + exc.offset) from None
        for name in expr.names(node):
            if kinds.get(name.name) == "text":
                raise ShortFormError(
                    f"placeholder type mismatch: {slot.raw} computes with {name.name!r}, which matches text, "
                    f"not digits (declare it, placeholders: {{{name.name}: int}}, or write {{{name.name}:int}})",
                    slot.start,
                )
            if name.name not in kinds and name.name not in known:
                captured = ", ".join(kinds) or "none"
                raise ShortFormError(
                    f"placeholder {{{name.name}}} is not captured by the pattern (its placeholders: {captured}) "
                    "and is no config value",
                    slot.start,
                )
        out.append(slot.raw)
    out.append(_literal(text[pos:], pos))
    return "".join(out)
