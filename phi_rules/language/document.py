"""A rule document: one YAML file, or a file merged over the base it ``extends``, with every value's origin.

Merging: mappings merge deeply (the file wins over its base); any other value, lists included,
replaces the base's. ``steps`` can instead be edited by name with ``edit_steps``: an entry whose
name is a base step's replaces it in place (or removes it with ``remove: true``); a new name is
appended, or placed with ``before:``/``after:`` a named step. ``abstract`` is never inherited.
Every value keeps the file, line and column it was written at, so diagnostics point there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from phi_rules.errors import Diagnostic, PhiRulesError, did_you_mean
from phi_rules.language.located_yaml import Located, YamlSyntaxError, load_located
from phi_rules.language.located_yaml import Path as YPath

# Package data: in a clone these are links to the repo's rules/ and schemas/ (one copy); a wheel carries them.
DATA = Path(str(resources.files("phi_rules").joinpath("data")))
RULES_DIR = DATA / "rules"
SCHEMA_PATH = (DATA / "schemas" / "phi-rules.schema.json").resolve()
_PLACE = ("before", "after", "remove")  # edit_steps keys that say where, not what


class LoadError(Exception):
    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("\n".join(map(str, diagnostics)))
        self.diagnostics = diagnostics


@dataclass
class Document:
    """The merged document, the texts it was made from (the file first, then its bases), and whether
    the file itself is ``abstract`` (a base for others, not converted on its own)."""

    located: Located
    texts: list[str]
    abstract: bool
    notes: tuple[Diagnostic, ...] = ()  # said, not wrong: a base found among the shipped rules


def _error(located: Located, path: YPath, message: str, *, key: bool = False) -> LoadError:
    file, line, col = located.position(path, key=key)
    return LoadError([Diagnostic(message, file, line, col, "/".join(map(str, path)), "extends")])


@cache
def _shipped() -> tuple[tuple[Path, dict[str, object]], ...]:
    """Every shipped rule file with its top-level data, read once per run (the parse is the one loading the
    file later reuses)."""
    found = []
    for f in sorted(RULES_DIR.rglob("*.yaml")):
        try:
            data = load_located(f.read_text(encoding="utf-8"), str(f)).data
        except (OSError, UnicodeDecodeError, YamlSyntaxError):
            continue
        if isinstance(data, dict):
            found.append((f, data))
    return tuple(found)


def shipped_names() -> dict[str, Path]:
    """Shipped rule files by their ``name``, for ``extends: NAME``."""
    found: dict[str, Path] = {}
    for f, data in _shipped():
        if isinstance(data.get("name"), str):
            found.setdefault(str(data["name"]), f)
    return found


def shipped_reverse_names() -> dict[str, Path]:
    """The files of shipped rules by the name of the backward rule their ``reverse`` section derives."""
    found: dict[str, Path] = {}
    for f, data in _shipped():
        rev = data.get("reverse")
        if isinstance(rev, dict) and isinstance(rev.get("name"), str):
            found.setdefault(rev["name"], f)
    return found


def shipped_stems() -> dict[str, Path]:
    """Shipped rule files by file stem (``phi-1_5-mixformer``), for those who name a rule by its file."""
    found: dict[str, Path] = {}
    for f in sorted(RULES_DIR.rglob("*.yaml")):
        found.setdefault(f.stem, f)
    return found


def rule_path(ref: str) -> Path:
    """A rule argument: a file path, or the ``name`` (or file stem) of a shipped rule (``phi-rules apply phi-2``)."""
    path = Path(ref)
    if path.exists() or "/" in ref or ref.endswith((".yaml", ".yml")):
        return path
    hit = shipped_names().get(ref) or shipped_stems().get(ref) or shipped_reverse_names().get(ref)
    if hit is None:
        known = {**shipped_names(), **shipped_reverse_names()}
        raise PhiRulesError(
            f"{ref}: no such rule file, and no shipped rule has that name{did_you_mean(ref, known)} "
            "(phi-rules list shows them)"
        )
    return hit


def _base(path: Path, display: str, ref: str) -> tuple[Path, str, bool] | None:
    """The base file and how to show it, and whether it was found among the shipped rules in place of a file
    that is not beside this one (a shipped rule copied out of the repo names its base relatively)."""
    if "/" not in ref and not ref.endswith((".yaml", ".yml")):
        hit = shipped_names().get(ref)
        return (hit, str(hit), False) if hit else None
    base = path.parent / ref
    try:
        if base.is_file():
            return base, os.path.normpath(os.path.join(os.path.dirname(display), ref)), False
    except OSError:  # a name the file system refuses (too long, say): no such base
        return None
    tail = "/" + "/".join(part for part in Path(ref).parts if part not in (".", ".."))
    shipped = [f for f in sorted(RULES_DIR.rglob("*.yaml")) if f.as_posix().endswith(tail)]
    return (shipped[0], str(shipped[0]), True) if len(shipped) == 1 else None


def load_document(path: Path, display: str, text: str | None = None, chain: tuple[Path, ...] = ()) -> Document:
    """Read, parse and merge ``path`` over its bases; raises :class:`LoadError` with located diagnostics."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise LoadError([Diagnostic(f"cannot read rule file: {reason}", display)]) from None
    try:
        located = load_located(text, display)
    except YamlSyntaxError as exc:
        error = Diagnostic(f"YAML syntax error: {exc.message}", display, exc.line, exc.column, code="yaml")
        raise LoadError([error]) from None
    data = located.data
    abstract = isinstance(data, dict) and data.get("abstract") is True
    if not isinstance(data, dict) or "extends" not in data:
        return Document(located, [text], abstract)
    ref = data["extends"]
    if not isinstance(ref, str) or not ref:
        raise _error(located, ("extends",), "extends needs a rule file path or a shipped rule's name")
    found = _base(path, display, ref)
    if found is None:
        hint = did_you_mean(ref, shipped_names()) if "/" not in ref else ""
        raise _error(located, ("extends",), f"base rule {ref!r} not found{hint}")
    me = path.resolve()
    if found[0].resolve() in (*chain, me):
        loop = " -> ".join(p.name for p in (*chain, me, found[0].resolve()))
        raise _error(located, ("extends",), f"extends cycle: {loop}")
    base = load_document(found[0], found[1], chain=(*chain, me))
    merged = _merge(base.located, located)
    _edit_steps(merged)
    notes = base.notes
    if found[2]:
        file, line, col = located.position(("extends",))
        said = f"{ref} is not beside this file: using the shipped {found[0].relative_to(RULES_DIR).as_posix()}"
        notes = (*notes, Diagnostic(said, file, line, col, "extends", "note"))
    return Document(merged, [text, *base.texts], abstract, notes)


def _merge(base: Located, over: Located) -> Located:
    b = {k: v for k, v in base.data.items() if k != "abstract"} if isinstance(base.data, dict) else {}
    o = {k: v for k, v in over.data.items() if k != "extends"} if isinstance(over.data, dict) else {}
    out = Located(None)
    out.data = _merge_value((), b, o, base, over, out)
    return out


# A source is one of two kinds: a file that gives one kind replaces the base's other kind instead of adding to it.
_SOURCE_KINDS = {"path": ("repo", "revision", "files"), "repo": ("path",)}


def _merge_value(path: YPath, b: object, o: object, base: Located, over: Located, out: Located) -> object:
    if not (isinstance(b, dict) and isinstance(o, dict)):
        out.take(over.subtree(path, path))
        return o
    if path == ("source",):
        other = {k for kind, drops in _SOURCE_KINDS.items() if kind in o for k in drops}
        b = {k: v for k, v in b.items() if k not in other}
    out.values[path] = over.values.get(path) or base.position(path)
    result: dict[str, object] = {}
    for k, v in b.items():
        if k in o:
            result[k] = _merge_value((*path, k), v, o[k], base, over, out)
            out.keys[(*path, k)] = over.position((*path, k), key=True)
        else:
            result[k] = v
            out.take(base.subtree((*path, k), (*path, k)))
    for k, v in o.items():
        if k not in b:
            result[k] = v
            out.take(over.subtree((*path, k), (*path, k)))
    return result


def _edit_steps(doc: Located) -> None:
    """Apply ``edit_steps`` to the inherited ``steps``, moving each step's positions with it."""
    data = doc.data
    if not isinstance(data, dict) or "edit_steps" not in data:
        return
    edits = data.pop("edit_steps")
    steps = data.get("steps")
    if not isinstance(edits, list) or not isinstance(steps, list):
        raise _error(doc, ("edit_steps",), "edit_steps needs a list, and steps inherited from the base")
    items = [(doc.subtree(("steps", i), ("_",)), s) for i, s in enumerate(steps)]

    def index(name: object) -> int | None:
        return next((i for i, (_, s) in enumerate(items) if isinstance(s, dict) and s.get("name") == name), None)

    for j, edit in enumerate(edits):
        where: YPath = ("edit_steps", j)
        if not isinstance(edit, dict) or not isinstance(edit.get("name"), str):
            raise _error(doc, where, "each edit_steps entry needs a name (a base step's, or a new one)")
        at = index(edit["name"])
        if edit.get("remove") is True:
            if at is None:
                raise _error(doc, (*where, "name"), f"no inherited step named {edit['name']!r} to remove")
            del items[at]
            continue
        anchor = next((k for k in ("before", "after") if k in edit), None)
        step = {k: v for k, v in edit.items() if k not in _PLACE}
        marks = doc.subtree(where, ("_",))
        for k in _PLACE:
            marks.values.pop(("_", k), None)
            marks.keys.pop(("_", k), None)
        if at is not None and anchor is None:
            items[at] = (marks, step)
            continue
        if at is not None:
            del items[at]
        if anchor is None:
            items.append((marks, step))
            continue
        target = index(edit[anchor])
        if target is None:
            names = [str(s["name"]) for _, s in items if isinstance(s, dict) and isinstance(s.get("name"), str)]
            hint = did_you_mean(str(edit[anchor]), names)
            raise _error(doc, (*where, anchor), f"no step named {edit[anchor]!r} to insert {anchor}{hint}")
        items.insert(target + (anchor == "after"), (marks, step))
    for table in (doc.values, doc.keys):
        for p in [p for p in table if p[:1] in (("steps",), ("edit_steps",)) and len(p) > 1]:
            del table[p]
    doc.keys.pop(("edit_steps",), None)
    doc.values.pop(("edit_steps",), None)
    data["steps"] = [s for _, s in items]
    for i, (marks, _) in enumerate(items):
        doc.take(marks.subtree(("_",), ("steps", i)))
