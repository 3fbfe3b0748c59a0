"""Load a rule file into a typed, fully checked :class:`Rules` value, or report every problem in it.

Checking happens in one pass: YAML syntax, the JSON Schema, then semantics (regexes compile,
backreferences exist, expressions parse and name only declared things, ops agree with outputs,
step names are unique). Parts that failed the schema are not checked again semantically.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import jsonschema

from phi_rules.errors import Diagnostic, PhiRulesError
from phi_rules.language import expr, ops, template
from phi_rules.language.located_yaml import Located, YamlSyntaxError, load_located
from phi_rules.language.ops import Op

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "phi-rules.schema.json"
RULES_DIR = Path(__file__).resolve().parents[2] / "rules"

YPath = tuple[str | int, ...]


@cache
def schema() -> dict[str, object]:
    """The rule-file JSON Schema shipped in ``schemas/``."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Where:
    """Where a part of a rule file is, for diagnostics raised by later stages."""

    file: str
    line: int
    column: int
    pointer: str

    def error(self, message: str, code: str | None = None) -> Diagnostic:
        return Diagnostic(message, self.file, self.line, self.column, self.pointer, code)


@dataclass(frozen=True)
class FileSpec:
    name: str
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    repo: str | None
    revision: str | None
    path: Path | None
    files: tuple[FileSpec, ...]
    config_file: str
    extra_files: tuple[FileSpec, ...]
    config_defaults: Mapping[str, expr.Value]


@dataclass(frozen=True)
class Target:
    architecture: str
    check: bool
    dtype: str
    format: str
    config: Mapping[str, expr.Node]
    mirror: tuple[str, ...] = ()
    require_tokenizer: bool = False


@dataclass(frozen=True)
class Rename:
    name: str
    where: Where
    optional: bool
    pattern: re.Pattern[str]
    to: template.Template
    anywhere: bool
    when: expr.Node | None


@dataclass(frozen=True)
class Drop:
    name: str
    where: Where
    optional: bool
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Transform:
    name: str
    where: Where
    optional: bool
    patterns: tuple[re.Pattern[str], ...]
    ops: tuple[Op, ...]
    to: tuple[template.Template, ...]
    when: expr.Node | None


Step = Rename | Drop | Transform


@dataclass(frozen=True)
class Rules:
    """A validated rule file."""

    path: Path
    display: str
    sha256: str
    name: str
    description: str
    source: Source
    target: Target
    steps: tuple[Step, ...]
    where_target: Where = field(compare=False)


def _pointer(path: Iterable[str | int]) -> str:
    return "/".join(str(p) for p in path)


_ONE_OF_HINTS = {
    "step": "a step needs exactly one of 'rename', 'drop' or 'transform'",
    "source": "a source needs either 'repo' with 'revision' and 'files', or 'path' (not both)",
    "split": "split needs exactly one of 'parts' or 'sizes'",
}


class _Checker:
    """Collects diagnostics for one file while building its :class:`Rules`."""

    def __init__(self, display: str, located: Located) -> None:
        self.display = display
        self.located = located
        self.diagnostics: list[Diagnostic] = []
        self.bad_paths: list[YPath] = []

    def where(self, path: YPath, *, key: bool = False) -> Where:
        line, col = self.located.position(path, key=key)
        return Where(self.display, line, col, _pointer(path))

    def error(self, path: YPath, message: str, *, key: bool = False, code: str = "semantic") -> None:
        self.diagnostics.append(self.where(path, key=key).error(message, code))

    def ok(self, path: YPath) -> bool:
        """True if the schema found nothing wrong at or below ``path``."""
        return not any(bad[: len(path)] == path or path[: len(bad)] == bad for bad in self.bad_paths)

    # --- schema ----------------------------------------------------------------------------------
    def check_schema(self) -> None:
        validator = jsonschema.Draft202012Validator(schema())
        for err in validator.iter_errors(self.located.data):
            path = tuple(err.absolute_path)
            self.bad_paths.append(path)
            self._schema_error(path, err)

    def _schema_error(self, path: YPath, err: jsonschema.ValidationError) -> None:
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - allowed):
                hint = difflib.get_close_matches(extra, sorted(allowed), n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else f" (allowed: {', '.join(sorted(allowed))})"
                self.error((*path, extra), f"unknown key {extra!r}{more}", key=True, code="schema")
            return
        if err.validator == "oneOf":
            kind = self._one_of_kind(path)
            if kind:
                self.error(path, _ONE_OF_HINTS[kind], code="schema")
                return
            typed = [e for e in err.context or [] if e.validator != "type"]  # skip alternatives of another type
            best = jsonschema.exceptions.best_match(typed or err.context or [])
            if best is not None:  # the alternative that came closest says what is wrong
                self._schema_error(tuple(best.absolute_path), best)
                return
        if err.validator == "required" and isinstance(err.instance, dict):
            missing = [k for k in err.validator_value if k not in err.instance]
            self.error(path, f"missing required key {missing[0]!r}" if missing else err.message, code="schema")
            return
        self.error(path, err.message, code="schema")

    @staticmethod
    def _one_of_kind(path: YPath) -> str | None:
        if len(path) == 2 and path[0] == "steps":
            return "step"
        if path == ("source",):
            return "source"
        if path and path[-1] == "split":
            return "split"
        return None

    # --- semantics -------------------------------------------------------------------------------
    def names_known(self, path: YPath, node: expr.Node, known: Mapping[str, str]) -> None:
        """Report each name of ``node`` absent from ``known`` (name → what declares such names)."""
        for name in expr.names(node):
            if name.name not in known:
                hint = difflib.get_close_matches(name.name, sorted(known), n=1)
                tail = f"; did you mean {hint[0]!r}?" if hint else ""
                self.error(
                    path,
                    f"unknown name {name.name!r} in expression{tail} (names come from "
                    "source.config_defaults, target.config and the pattern's named groups)",
                )

    def parse_expr(self, path: YPath, value: object, known: Mapping[str, str]) -> expr.Node | None:
        if not isinstance(value, str):
            return expr.Const(value)  # type: ignore[arg-type]
        try:
            node = expr.parse(value)
        except expr.ExprError as exc:
            self.error(path, f"bad expression {value!r}: {exc.message} at character {exc.offset + 1}")
            return None
        self.names_known(path, node, known)
        return node

    def compile(self, path: YPath, text: str) -> re.Pattern[str] | None:
        try:
            return re.compile(text)
        except re.error as exc:
            self.error(path, f"bad regular expression {text!r}: {exc}")
            return None

    def parse_template(
        self, path: YPath, text: str, pattern: re.Pattern[str] | None, known: Mapping[str, str]
    ) -> template.Template | None:
        try:
            tpl = template.parse(text)
        except expr.ExprError as exc:
            self.error(path, f"bad name template {text!r}: {exc.message} at character {exc.offset + 1}")
            return None
        if pattern is None:
            return tpl
        for ref in tpl.groups():
            if isinstance(ref.group, int) and ref.group > pattern.groups:
                self.error(path, f"unknown group \\{ref.group}: the pattern has {pattern.groups} group(s)")
            elif isinstance(ref.group, str) and ref.group not in pattern.groupindex:
                self.error(
                    path,
                    f"unknown group \\g<{ref.group}>: the pattern names {', '.join(pattern.groupindex) or 'no groups'}",
                )
        for name, _ in tpl.names():
            if name.name not in known:
                hint = difflib.get_close_matches(name.name, sorted(known), n=1)
                tail = f"; did you mean {hint[0]!r}?" if hint else ""
                self.error(path, f"unknown name {name.name!r} in template{tail}")
        return tpl


def _file_specs(items: list[object]) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(i) if isinstance(i, str) else FileSpec(i["name"], i.get("sha256")) for i in items)  # type: ignore[index]


def _build_source(data: dict[str, object], base: Path) -> Source:
    raw = data["source"]
    assert isinstance(raw, dict)
    path = raw.get("path")
    return Source(
        repo=raw.get("repo"),
        revision=raw.get("revision"),
        path=(base / path) if isinstance(path, str) else None,
        files=_file_specs(raw.get("files", [])),
        config_file=raw.get("config_file", "config.json"),
        extra_files=_file_specs(raw.get("extra_files", [])),
        config_defaults=dict(raw.get("config_defaults", {})),
    )


def _build_target(c: _Checker, data: dict[str, object], source_names: Mapping[str, str]) -> Target:
    raw = data["target"]
    assert isinstance(raw, dict)
    config: dict[str, expr.Node] = {}
    for key, value in raw["config"].items():
        node = c.parse_expr(("target", "config", key), value, source_names)
        if node is not None:
            config[key] = node
    return Target(
        raw["architecture"],
        raw.get("check", True),
        raw.get("dtype", "keep"),
        raw.get("format", "safetensors"),
        config,
        tuple(raw.get("mirror", ())),
        raw.get("require_tokenizer", False),
    )


def _build_op(
    c: _Checker, path: YPath, raw: dict[str, object], known: Mapping[str, str], count: int
) -> tuple[Op | None, int]:
    """Build one op and return it with the number of tensors it leaves."""
    kind, arg = next(iter(raw.items()))
    ctx = ops.BuildContext(path, count, lambda p, v: c.parse_expr(p, v, known), lambda p, m: c.error(p, m))
    op = ops.OPS[kind].build(arg, ctx)
    return op, (op.leaves(count) if op is not None else count)


def _group_names(patterns: Iterable[re.Pattern[str] | None]) -> dict[str, str]:
    return {g: "group" for p in patterns if p is not None for g in p.groupindex}


def _build_step(c: _Checker, i: int, raw: dict[str, object], config_names: Mapping[str, str]) -> Step | None:
    path: YPath = ("steps", i)
    kind = next(k for k in ("rename", "drop", "transform") if k in raw)
    name = str(raw.get("name", f"{kind}[{i}]"))
    where = c.where(path)
    optional = bool(raw.get("optional", False))
    body = raw[kind]
    if kind == "drop":
        assert isinstance(body, str)
        pattern = c.compile((*path, "drop"), body)
        return Drop(name, where, optional, pattern) if pattern else None
    assert isinstance(body, dict)
    texts = body["match"] if isinstance(body["match"], list) else [body["match"]]
    match_path: YPath = (*path, kind, "match")
    patterns = [
        c.compile((*match_path, j) if isinstance(body["match"], list) else match_path, t) for j, t in enumerate(texts)
    ]
    groups = _group_names(patterns)
    for g in groups:
        if g in config_names:
            c.error(match_path, f"group name {g!r} shadows the config field of the same name; rename the group")
    known = {**config_names, **groups}
    when = c.parse_expr((*path, kind, "when"), body["when"], known) if "when" in body else None
    first = patterns[0]
    if kind == "rename":
        to = c.parse_template((*path, kind, "to"), str(body["to"]), first, known)
        if first is None or to is None:
            return None
        return Rename(name, where, optional, first, to, bool(body.get("anywhere", False)), when)
    count = len(texts)
    built: list[Op] = []
    for j, raw_op in enumerate(body["ops"]):
        op, count = _build_op(c, (*path, kind, "ops", j), raw_op, known, count)
        if op is not None:
            built.append(op)
    outs = body["to"] if isinstance(body["to"], list) else [body["to"]]
    if len(outs) != count:
        c.error((*path, kind, "to"), f"the ops leave {count} tensor(s) but {len(outs)} output name(s) are given")
    tos = [c.parse_template((*path, kind, "to"), str(t), first, known) for t in outs]
    if any(p is None for p in patterns) or any(t is None for t in tos):
        return None
    return Transform(name, where, optional, tuple(patterns), tuple(built), tuple(tos), when)  # type: ignore[arg-type]


def _check_unique_names(c: _Checker, steps: list[object]) -> None:
    seen: dict[str, int] = {}
    for i, raw in enumerate(steps):
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            name = raw["name"]
            if name in seen:
                c.error(("steps", i, "name"), f"duplicate step name {name!r} (first used by steps/{seen[name]})")
            seen.setdefault(name, i)


def _check(display: str, path: Path, text: str) -> tuple[list[Diagnostic], Rules | None]:
    try:
        located = load_located(text)
    except YamlSyntaxError as exc:
        return [Diagnostic(f"YAML syntax error: {exc.message}", display, exc.line, exc.column, code="yaml")], None
    c = _Checker(display, located)
    c.check_schema()
    data = located.data
    if not isinstance(data, dict):
        return c.diagnostics, None
    source = _build_source(data, path.parent) if c.ok(("source",)) and "source" in data else None
    # Names are taken from the raw data so that a schema error in `source` does not make every
    # expression report unknown names as well.
    raw_source = data.get("source")
    defaults = raw_source.get("config_defaults") if isinstance(raw_source, dict) else None
    source_names = {str(k): "source" for k in (defaults if isinstance(defaults, dict) else {})}
    target = None
    if c.ok(("target",)) and "target" in data:
        target = _build_target(c, data, source_names)
    raw_target = data.get("target")
    raw_config = raw_target.get("config") if isinstance(raw_target, dict) else None
    config_names = {**source_names, **{str(k): "target" for k in (raw_config if isinstance(raw_config, dict) else {})}}
    steps: list[Step | None] = []
    raw_steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    assert isinstance(raw_steps, list)
    _check_unique_names(c, raw_steps)
    for i, raw in enumerate(raw_steps):
        if c.ok(("steps", i)):
            steps.append(_build_step(c, i, raw, config_names))
    if c.diagnostics or source is None or target is None:
        return c.diagnostics, None
    rules = Rules(
        path,
        display,
        hashlib.sha256(text.encode()).hexdigest(),
        data["name"],
        data.get("description", ""),
        source,
        target,
        tuple(s for s in steps if s is not None),
        c.where(("target",)),
    )
    return [], rules


def _read(path: Path, display: str) -> tuple[str | None, list[Diagnostic]]:
    try:
        return path.read_text(encoding="utf-8"), []
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return None, [Diagnostic(f"cannot read rule file: {reason}", display)]


def check_text(text: str, display: str = "<string>", path: Path | None = None) -> list[Diagnostic]:
    """All problems of a rule document, sorted by position; empty if it is valid."""
    problems, _ = _check(display, path or Path(display), text)
    return sorted(problems, key=lambda d: (d.line or 0, d.column or 0))


def check_file(path: Path | str) -> list[Diagnostic]:
    """All problems of one rule file, sorted by position; empty if it is valid."""
    path = Path(path)
    text, problems = _read(path, str(path))
    return problems if text is None else check_text(text, str(path), path)


def load_rules(path: Path | str) -> Rules:
    """Load and check a rule file; raises :class:`PhiRulesError` listing every problem."""
    path = Path(path)
    text, problems = _read(path, str(path))
    if text is not None:
        problems, rules = _check(str(path), path, text)
        if rules is not None:
            return rules
    raise PhiRulesError(sorted(problems, key=lambda d: (d.line or 0, d.column or 0)))


def rule_files(paths: Iterable[Path | str]) -> list[Path]:
    """Expand folders into the ``*.yaml``/``*.yml`` files below them, sorted; files pass through."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file()))
        else:
            found.append(p)
    return found
