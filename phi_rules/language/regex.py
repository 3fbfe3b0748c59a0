"""Regular expressions from rule files and adapter configs, matched by RE2 in time linear in the name.

Rule files come from other people's repositories; with a backtracking engine a pattern such as
``'(a|aa)+'`` makes planning hang on one long tensor name, and no list of known-bad shapes catches every
such pattern. RE2 guarantees linear time by leaving out what needs backtracking: lookarounds (``(?=``,
``(?!``) and backreferences (``\\1`` inside a pattern). Its syntax is otherwise Python's for everything
the rules use, named groups ``(?P<name>…)`` included; ``validate`` reports a pattern RE2 refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Protocol

import re2  # type: ignore[import-untyped]


class Match(Protocol):
    def group(self, group: int | str = 0, /) -> str | None: ...

    def groupdict(self) -> dict[str, str | None]: ...


class Pattern(Protocol):
    @property
    def pattern(self) -> str: ...

    @property
    def groups(self) -> int: ...

    @property
    def groupindex(self) -> dict[str, int]: ...

    def fullmatch(self, text: str) -> Match | None: ...

    def search(self, text: str) -> Match | None: ...

    def sub(self, repl: Callable[[Match], str], text: str) -> str: ...


class RegexError(Exception):
    """A pattern RE2 does not accept; the message says why."""


_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the reason comes back in the exception; nothing is printed to stderr


def compile(text: str) -> Pattern:
    """The compiled pattern; raises :class:`RegexError` for one that RE2 refuses (a lookaround, a backreference,
    bad syntax)."""
    try:
        compiled: Pattern = re2.compile(text, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        unsupported = "perl operator" in reason or "escape" in reason
        hint = " (RE2 syntax: no lookarounds or backreferences)" if unsupported else ""
        raise RegexError(f"{reason}{hint}") from None
    prefix = literal_prefix(text)
    return _Guarded(compiled, prefix) if prefix else compiled


class _Guarded:
    """A pattern behind the text every match of it starts with: a name without that text is answered by
    ``str.startswith``, a hundred times faster than a call into RE2 (planning asks every pattern of a rule
    about every tensor name, and detection plans every rule)."""

    def __init__(self, compiled: Pattern, prefix: str) -> None:
        self._compiled, self.prefix = compiled, prefix

    @property
    def pattern(self) -> str:
        return self._compiled.pattern

    @property
    def groups(self) -> int:
        return self._compiled.groups

    @property
    def groupindex(self) -> dict[str, int]:
        return self._compiled.groupindex

    def fullmatch(self, text: str) -> Match | None:
        return self._compiled.fullmatch(text) if text.startswith(self.prefix) else None

    def search(self, text: str) -> Match | None:
        return self._compiled.search(text) if self.prefix in text else None

    def sub(self, repl: Callable[[Match], str], text: str) -> str:
        return self._compiled.sub(repl, text)


def literal_prefix(pattern: str) -> str:
    """The text every match of ``pattern`` starts with (empty when it cannot tell): the plain characters before
    the first that is not, less one that a quantifier makes optional; nothing for ``a|b`` at the top level."""
    if _alternatives(pattern):
        return ""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            char, i = pattern[i + 1], i + 2
        elif c == "\\" or c in ".^$*+?{}[]()|":
            break
        else:
            char, i = c, i + 1
        after = pattern[i : i + 1]
        if after and after in "*?{":
            break
        out.append(char)
        if after == "+":
            break
    return "".join(out)


def _alternatives(pattern: str) -> bool:
    """Whether the pattern is several at its top level (``a|b``: no prefix is common to all)."""
    depth, i, in_class = 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return True
        i += 1
    return False


@cache
def _peft_key(key: str) -> Pattern | None:
    try:
        return compile(rf"(.*\.)?({key})")
    except RegexError:
        return None


def peft_key_matches(key: str, module: str) -> bool:
    """Whether a ``rank_pattern``/``alpha_pattern`` key applies to a module, as PEFT decides it
    (``re.match(rf"(.*\\.)?({key})$", module)``); a key RE2 refuses matches nothing. Each key is compiled once."""
    pattern = _peft_key(key)
    return pattern is not None and pattern.fullmatch(module) is not None
