"""How the CLI shows things: tables, one-line errors, notes and progress on stderr."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from phi_rules.errors import Diagnostic


def table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, two spaces apart; the last one is left as it is."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip())


def diagnostics(diags: Sequence[Diagnostic]) -> None:
    for d in diags:
        print(f"error: {d}" if d.file is None else str(d), file=sys.stderr)


def note(quiet: bool) -> Callable[[str], None]:
    return (lambda _m: None) if quiet else (lambda m: print(f"note: {m}", file=sys.stderr))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def quiet_libraries() -> None:
    """Library warnings (toy token ids, the hub client's retry chatter) would bury our one-line errors.

    Set through the environment, which both libraries read when they are imported (later, lazily).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")


def short(reason: str) -> str:
    return reason if len(reason) <= 160 else reason[:157] + "..."


def shown(path: Path) -> str:
    """A shipped file as the user can open it: relative to here inside a clone, else its installed path."""
    real = path.resolve()
    return str(real.relative_to(Path.cwd())) if real.is_relative_to(Path.cwd()) else str(real)


def backward(row: dict[str, str | None]) -> str:
    """The list's backward column: the derived rule's name, or why the rule runs one way only."""
    if row.get("one_way"):
        return f"no: {row['one_way']}"
    return "derived" if row.get("derived_from") else ("-" if row["name"] is None else "yes")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def bar(quiet: bool, total: int, unit: str, desc: str) -> Callable[[int], None]:
    """A progress bar with an estimate on stderr, on a terminal only, that closes itself at ``total``; what
    to call with each step done."""
    if quiet or not sys.stderr.isatty():
        return lambda _n: None
    from tqdm import tqdm

    shown = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, file=sys.stderr)

    def update(n: int) -> None:
        shown.update(n)
        if shown.total is not None and shown.n >= shown.total:
            shown.close()

    return update


def progress_factory(quiet: bool) -> Callable[[Any], Callable[[int], None]]:
    """A byte-counting progress bar per rule, on a terminal only."""
    return lambda plan: bar(quiet, plan.total_bytes, "B", plan.rules.name)
