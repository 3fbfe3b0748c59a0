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


def quoted(arg: object) -> str:
    """An argument as a shell reads it back (a path with a space, say), for commands a message suggests."""
    import shlex

    return shlex.quote(str(arg))


def _out_name(source: object, target: str) -> str:
    """A folder name for a suggested command's --out: the source's last part and the target."""
    import re

    last = re.sub(r"[^\w.-]", "-", str(source).rstrip("/").rsplit("/", 1)[-1])
    return f"{last or 'converted'}-{target}"


def _apply(source: object, target: str, to: bool, rule: str | None = None) -> str:
    """The command that converts ``source`` to ``target``, as it runs when pasted."""
    named = f" {quoted(rule)}" if rule else ""
    picked = f" --to {target}" if to else ""
    return f"phi-rules apply{named} --source {quoted(source)}{picked} --out {quoted(_out_name(source, target))}"


def detected(detection: Any, to: str | None = None) -> tuple[int, list[str]]:
    """``detect``'s answer, first and short: the layout found, each target it can go to (a refused one with its
    reason), and the command to run; or the one line that says why nothing reads the source. Returns the exit
    status (0: there is a command to run, or nothing to do) and the lines."""
    from phi_rules.detect import chosen, missing_config, nothing_reads, what_it_is

    source = detection.source
    for line in (missing_config(detection), nothing_reads(detection)):
        if line is not None:
            return 1, [line]
    fits = [f for f in detection.fits if to is None or to in f.rules.target.names]
    if not fits:  # --to names no target: the error apply gives (with a did-you-mean)
        chosen(detection, to)
    good = [f for f in fits if f.fits]
    yours = [f for f in good if f.given]
    if len(yours) == 1 and len(good) > 1:  # a rule the user named wins over shipped ones that fit as well
        others = ", ".join(f.rules.name for f in good if not f.given)
        mine = yours[0].rules
        return 0, [
            f"{source}: your rule {mine.name} fits and wins over the shipped {others}",
            f"run: {_apply(source, mine.target.names[0], False, mine.display)}",
        ]
    done = [f for f in good if f.rules.converted]
    if done:
        back = [f.rules.target.names[0] for f in good if not f.rules.converted]
        lines = [f"{source}: already in today's layout: load it with from_pretrained, no conversion needed"]
        lines += [f"  converts back with: {_apply(source, t, True)}" for t in back[:6]]
        return 0, lines
    reading = [f for f in fits if f.reads]
    layout = (good or reading or fits)[0].rules.layout or "an unnamed"
    lines = [f"{source}: {layout} layout ({what_it_is(detection)})"]
    for f in reading[:6]:
        said = "fits" if f.fits else (f.refusal if f.refusal else f"does not fit: {f.reason}")
        target = f.rules.target
        lines.append(f"  to {target.names[0]} ({target.architecture}): rule {f.rules.name} {short(said)}")
    targets = [f.rules.target.names[0] for f in good]
    if len(good) == 1:
        rival = len(reading) > 1  # other rules read this layout (refused ones, say): --to says which
        lines.append(f"run: {_apply(source, targets[0], rival, good[0].rules.display if good[0].given else None)}")
        return 0, lines
    if len(set(targets)) == len(good) > 1:
        lines.append(f"run: {_apply(source, targets[0], True)}  (or --to {', '.join(targets[1:])})")
        return 0, lines
    if good:
        named = _apply(source, targets[0], False, good[0].rules.display)
        lines.append(f"{source}: {len(good)} rules fit one target ({', '.join(f.rules.name for f in good)}): {named}")
    else:
        lines.append(f"{source}: no rule fits; phi-rules detect {quoted(source)} --all shows why each does not")
    return 1, lines
