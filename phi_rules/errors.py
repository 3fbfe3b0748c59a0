"""One error type for everything a user can get wrong, carrying located diagnostics.

Stages never print: they raise :class:`PhiRulesError` with one or more :class:`Diagnostic`
values and the CLI alone decides how to show them (text lines or JSON).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Diagnostic:
    """One problem, located like ruff's ``file:line:col: message``; every part but the message is optional."""

    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    pointer: str | None = None
    code: str | None = None  # which check found it: yaml, schema, semantic, plan, target, source

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}:{self.column or 1}"
            where += ": "
        key = f"{self.pointer}: " if self.pointer else ""
        return f"{where}{key}{self.message}"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class PhiRulesError(Exception):
    """Raised by every stage for bad input; holds all the diagnostics found, not only the first."""

    def __init__(self, diagnostics: Iterable[Diagnostic] | str) -> None:
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics)]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, or nothing: the one hint every message uses."""
    hint = difflib.get_close_matches(name, sorted(known), n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""
