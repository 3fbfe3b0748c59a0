"""Load a rule file into a typed, fully checked :class:`Rules` value, or report every problem in it.

Checking happens in one pass: YAML syntax, the JSON Schema, then semantics (regexes compile,
backreferences exist, expressions parse and name only declared things, ops agree with outputs,
step names are unique). Parts that failed the schema are not checked again semantically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from phi_rules.errors import Diagnostic, PhiRulesError, did_you_mean
from phi_rules.language import expr, ops, regex, reverse, shortform, template
from phi_rules.language.document import SCHEMA_PATH, LoadError, load_document, rule_path, shipped_reverse_names
from phi_rules.language.located_yaml import Located
from phi_rules.language.ops import Op

YPath = tuple[str | int, ...]


@cache
def schema() -> dict[str, object]:
    """The rule-file JSON Schema shipped in ``schemas/``."""
    loaded: dict[str, object] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


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
    parts: Mapping[str, str] = field(default_factory=dict)  # adapter sub-folder -> the field its config is


@dataclass(frozen=True)
class AdapterSpec:
    """``target.adapter``: the output is a PEFT adapter folder; how its adapter_config.json is rewritten."""

    modules: Mapping[str, tuple[str, ...]]
    paths: Mapping[str, str]  # literal pieces of regex target_modules, e.g. 'transformer\.h' -> 'model\.layers'
    layers_pattern: str | None
    settable: tuple[str, ...]
    fused: Mapping[str, int] = field(default_factory=dict)  # fused target module -> how many parts it joins


@dataclass(frozen=True)
class Part:
    """``target.parts``: a sub-folder written beside the model, a PEFT adapter of the target. It takes the
    tensors whose output names the steps begin with ``name/``; its adapter_config.json is computed."""

    name: str
    adapter_config: Mapping[str, expr.Node]
    absent: str | None  # why a source may lack it (then a note says so); None: its tensors are required
    where: Where


@dataclass(frozen=True)
class Target:
    architecture: str
    check: bool
    dtype: str
    format: str
    config: Mapping[str, expr.Node]
    config_where: Mapping[str, Where]  # where each config value was written, for later diagnostics
    copy: tuple[str, ...]
    require_tokenizer: bool
    adapter: AdapterSpec | None = None
    layout: str = ""  # the layout written; --to picks rules by it or by the architecture's model type
    uses: Mapping[str, expr.Node] = field(default_factory=dict)  # model attributes -> what the source means
    uses_where: Mapping[str, Where] = field(default_factory=dict)
    remote_code: bool = False  # config.json written as the values say: no transformers class has the layout
    parts: tuple[Part, ...] = ()  # sub-folders beside the model, each with its own tensors

    @property
    def names(self) -> tuple[str, ...]:
        """What ``--to`` may call this target: its layout and its model type (``LlamaForCausalLM``: llama)."""
        model_type = self.architecture.removesuffix("ForCausalLM").lower()
        return tuple(dict.fromkeys(n for n in (self.layout, model_type) if n))


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


@dataclass(frozen=True)
class Refusal:
    """``refuse``: when ``when`` holds, the target would compute something else; ``reason`` says what to do."""

    when: expr.Node
    reason: str
    where: Where


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
    lets: Mapping[str, expr.Node]  # named expressions over config values, evaluated in order
    let_where: Mapping[str, Where]
    steps: tuple[Step, ...]
    where_target: Where = field(compare=False)
    layout: str = ""
    detect: bool = False  # a candidate for detection: the generic rule of its layout
    converted: bool = False  # its layout is the target's own: nothing to convert
    refusals: tuple[Refusal, ...] = ()
    backward: bool = False  # derived from a rule's ``reverse`` section
    reversible: str = ""  # the name of the backward rule this one derives, if any

    @property
    def config_only(self) -> bool:
        """Every step keeps names as they are: the rule converts the config alone."""
        return all(isinstance(s, Rename) and s.keeps for s in self.steps)


def _pointer(path: Iterable[str | int]) -> str:
    return "/".join(str(p) for p in path)


# A short-form name is a module: this group takes what lies under it (``.weight``, ``.lora_A.weight``, nothing).
UNDER_PATTERN = f"(?P<{shortform.UNDER}>(?:\\.[^.]+)*)"

_ONE_OF_HINTS = {
    "step": "a step needs exactly one of 'rename', 'keep', 'drop' or 'transform'",
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
        data = located.data if isinstance(located.data, dict) else {}
        declared = data.get("placeholders")
        # Placeholder types the rule declares (``{i: int}``): short-form names read them.
        self.placeholders: dict[str, str] = dict(declared) if isinstance(declared, dict) else {}

    def where(self, path: YPath, *, key: bool = False) -> Where:
        file, line, col = self.located.position(path, key=key)
        return Where(file, line, col, _pointer(path))

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
        if err.validator == "additionalProperties" and isinstance(err.instance, dict) and isinstance(err.schema, dict):
            allowed = set(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - allowed):
                more = did_you_mean(extra, allowed) or f" (allowed: {', '.join(sorted(allowed))})"
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
        if err.validator == "required" and isinstance(err.instance, dict) and isinstance(err.validator_value, list):
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
                self.error(
                    path,
                    f"unknown name {name.name!r} in expression{did_you_mean(name.name, known)} (names come "
                    "from source.fields and config_defaults, target.config, let and the pattern's named groups)",
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
        self._tensor_queries(path, node)
        return node

    def _tensor_queries(self, path: YPath, node: expr.Node) -> None:
        """``dim()``/``max_index()`` take a quoted regular expression first (and a literal axis)."""
        calls = [n for n in expr.walk(node) if isinstance(n, expr.Call) and n.func in expr.TENSOR_FUNCTIONS]
        for call in calls:
            first = call.args[0]
            if not (isinstance(first, expr.Const) and isinstance(first.value, str)):
                self.error(path, f"{call.func}() needs a quoted regular expression first, e.g. '\\.fc1\\.weight'")
            elif self.compile(path, first.value) is None:
                continue
            if call.func == "dim" and not isinstance(call.args[1], expr.Const):
                self.error(path, "dim() needs a number as its axis")

    def compile(self, path: YPath, text: str) -> regex.Pattern | None:
        try:
            return regex.compile(text)
        except regex.RegexError as exc:
            self.error(path, f"bad regular expression {text!r}: {exc}")
            return None

    def parse_template(
        self, path: YPath, text: str, pattern: regex.Pattern | None, known: Mapping[str, str]
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
                self.error(path, f"unknown name {name.name!r} in template{did_you_mean(name.name, known)}")
        return tpl


def _file_specs(items: list[str | dict[str, str]]) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(i) if isinstance(i, str) else FileSpec(i["name"], i.get("sha256")) for i in items)


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
        config_defaults={
            **dict.fromkeys(raw.get("fields", [])),
            **dict.fromkeys(raw.get("parts", {}).values()),
            **raw.get("config_defaults", {}),
        },
        parts=dict(raw.get("parts", {})),
    )


def _source_names(c: _Checker, raw: object) -> dict[str, str]:
    """The source fields the expressions may read: ``fields`` (null where absent) and ``config_defaults``. Taken
    from the raw data, so that a schema error in ``source`` does not make every expression report unknown
    names as well."""
    given: dict[str, Any] = raw if isinstance(raw, dict) else {}
    defaults = given.get("config_defaults")
    defaults = defaults if isinstance(defaults, dict) else {}
    fields = given.get("fields")
    fields = fields if isinstance(fields, list) else []
    parts = given.get("parts")
    fields = fields + [str(v) for v in (parts.values() if isinstance(parts, dict) else [])]
    for i, name in enumerate(fields):
        if name in defaults:
            c.error(("source", "fields", i), f"{name!r} is declared in fields and in config_defaults: keep one")
    return {str(k): "source config" for k in [*fields, *defaults]}


def _build_target(c: _Checker, data: dict[str, object], source_names: Mapping[str, str]) -> Target:
    raw = data["target"]
    assert isinstance(raw, dict)
    config: dict[str, expr.Node] = {}
    known = dict(source_names)
    for key, value in raw["config"].items():  # each value may read the target values above it
        node = c.parse_expr(("target", "config", key), value, known)
        known.setdefault(key, "target config")
        if node is not None:
            config[key] = node
    copy = tuple(raw.get("copy", ()))
    for i, key in enumerate(copy):
        if key in raw["config"]:
            c.error(("target", "copy", i), f"{key!r} is both copied and computed in target.config: keep one")
    remote = bool(raw.get("remote_code", False))
    return Target(
        raw["architecture"],
        raw.get("check", True) and not remote,  # no class to check against
        raw.get("dtype", "keep"),
        raw.get("format", "safetensors"),
        config,
        {k: c.where(("target", "config", k)) for k in raw["config"]},
        copy,
        raw.get("require_tokenizer", False),
        _adapter_spec(raw.get("adapter")),
        raw.get("layout", ""),
        {k: n for k, v in raw.get("uses", {}).items() if (n := c.parse_expr(("target", "uses", k), v, source_names))},
        {k: c.where(("target", "uses", k)) for k in raw.get("uses", {})},
        remote,
    )


def _build_parts(c: _Checker, data: dict[str, Any], known: Mapping[str, str]) -> tuple[Part, ...]:
    """``target.parts``: each part's adapter_config fields, expressions over every value a step may read."""
    raw = data.get("target")
    parts = raw.get("parts") if isinstance(raw, dict) and c.ok(("target", "parts")) else None
    if not isinstance(parts, dict):
        return ()
    built = []
    for name, body in parts.items():
        path: YPath = ("target", "parts", name, "adapter_config")
        fields = {k: c.parse_expr((*path, k), v, known) for k, v in body["adapter_config"].items()}
        absent = body.get("absent")
        built.append(
            Part(
                str(name),
                {k: n for k, n in fields.items() if n is not None},
                " ".join(str(absent).split()) if absent is not None else None,
                c.where(("target", "parts", name)),
            )
        )
    return tuple(built)


def _adapter_spec(raw: dict[str, Any] | None) -> AdapterSpec | None:
    if raw is None:
        return None
    return AdapterSpec(
        {k: tuple(v) for k, v in raw.get("modules", {}).items()},
        dict(raw.get("paths", {})),
        raw.get("layers_pattern"),
        tuple(raw.get("settable", ())),
        {str(k): int(v) for k, v in raw.get("fused", {}).items()},
    )


def _build_op(
    c: _Checker, path: YPath, raw: dict[str, object], known: Mapping[str, str], count: int
) -> tuple[Op | None, int]:
    """Build one op and return it with the number of tensors it leaves."""
    kind, arg = next(iter(raw.items()))
    ctx = ops.BuildContext(path, count, lambda p, v: c.parse_expr(p, v, known), lambda p, m: c.error(p, m))
    op = ops.OPS[kind].build(arg, ctx)
    return op, (op.leaves(count) if op is not None else count)


def _group_names(patterns: Iterable[regex.Pattern | None]) -> dict[str, str]:
    return {g: "group" for p in patterns if p is not None for g in p.groupindex}


def _build_step(c: _Checker, i: int, raw: dict[str, object], config_names: Mapping[str, str]) -> Step | None:
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
    absent = _absent(c, (*path, kind), body, len(texts), built)
    return Transform(name, where, optional, tuple(patterns), tuple(built), tuple(tos), when, absent)  # type: ignore[arg-type]


def _absent(c: _Checker, path: YPath, body: dict[str, Any], inputs: int, built: list[Op]) -> bool:
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
    c: _Checker, path: YPath, name: str, optional: bool, body: dict[str, Any], known: Mapping[str, str]
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
    count = len(froms)
    built: list[Op] = []
    for j, raw_op in enumerate(body["ops"]):
        op, count = _build_op(c, (*path, "transform", "ops", j), raw_op, known, count)
        if op is not None:
            built.append(op)
    outs = body["to"] if isinstance(body["to"], list) else [body["to"]]
    if len(outs) != count:
        c.error((*path, "transform", "to"), f"the ops leave {count} tensor(s) but {len(outs)} output name(s) are given")
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
    c: _Checker, path: YPath, raw: dict[str, object], body: dict[str, Any], known: Mapping[str, str]
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
    c: _Checker, path: YPath, body: dict[str, object], known: Mapping[str, str]
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


def _build_lets(c: _Checker, data: dict[str, object], known: dict[str, str]) -> dict[str, expr.Node]:
    """``let`` expressions, each over config values and the lets before it; a name may not be reused."""
    raw = data.get("let")
    lets: dict[str, expr.Node] = {}
    if not isinstance(raw, dict) or not c.ok(("let",)):
        return lets
    for name, value in raw.items():
        if name in known:
            c.error(("let", name), f"let name {name!r} clashes with the {known[name]} value of the same name", key=True)
            continue
        node = c.parse_expr(("let", name), value, known)
        known[name] = "let"
        if node is not None:
            lets[name] = node
    return lets


def _check_merged_target(c: _Checker, data: dict[str, Any]) -> None:
    """Keys a file that extends another may leave out, but the merged rule must have."""
    raw = data.get("target")
    if not isinstance(raw, dict) or not c.ok(("target",)):
        return
    needed: list[YPath] = [("target", k) for k in ("architecture", "config") if k not in raw]
    adapter = raw.get("adapter")
    if isinstance(adapter, dict) and "modules" not in adapter:
        needed.append(("target", "adapter", "modules"))
    for path in needed:
        c.error(path[:-1], f"missing required key {path[-1]!r} (in this file or the base it extends)")
        c.bad_paths.append(path[:-1])


def _check_unique_names(c: _Checker, steps: list[object]) -> None:
    seen: dict[str, int] = {}
    for i, raw in enumerate(steps):
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            name = raw["name"]
            if name in seen:
                c.error(("steps", i, "name"), f"duplicate step name {name!r} (first used by steps/{seen[name]})")
            seen.setdefault(name, i)


def _build_refusals(c: _Checker, data: dict[str, object], known: Mapping[str, str]) -> tuple[Refusal, ...]:
    raw = data.get("refuse")
    if not isinstance(raw, dict) or not c.ok(("refuse",)):
        return ()
    found = []
    for name, item in raw.items():
        node = c.parse_expr(("refuse", name, "when"), item["when"], known)
        if "reason" not in item:
            c.error(("refuse", name), "missing required key 'reason' (in this file or the base it extends)")
        elif node is not None:
            found.append(Refusal(node, " ".join(str(item["reason"]).split()), c.where(("refuse", name))))
    return tuple(found)


def _check(
    display: str, path: Path, text: str | None = None, backward: bool = False
) -> tuple[list[Diagnostic], Rules | None]:
    try:
        document = load_document(path, display, text)
    except LoadError as exc:
        return exc.diagnostics, None
    located = document.located
    forward = located.data if isinstance(located.data, dict) else {}
    if backward:
        if not isinstance(forward.get("reverse"), dict):
            return [Diagnostic("this rule has no reverse section: it runs forward only", display)], None
        derived, problems = reverse.derive(located)
        if derived is None:
            return problems, None
        located = derived
    c = _Checker(display, located)
    c.check_schema()
    data = located.data
    if not isinstance(data, dict):
        return c.diagnostics, None
    if not document.abstract:  # a base may leave the target to the rules that extend it
        _check_merged_target(c, data)
    raw_source = data.get("source")
    source = None
    if c.ok(("source",)) and "source" in data and not document.abstract:
        source = _build_source(data, Path(located.position(("source",))[0]).parent)
    source_names = _source_names(c, raw_source)
    target = None
    raw_target = data.get("target")
    complete = not document.abstract or (isinstance(raw_target, dict) and {"architecture", "config"} <= set(raw_target))
    if c.ok(("target",)) and "target" in data and complete:
        target = _build_target(c, data, source_names)
    raw_config = raw_target.get("config") if isinstance(raw_target, dict) else None
    known = {**source_names, **{str(k): "target config" for k in (raw_config if isinstance(raw_config, dict) else {})}}
    lets = _build_lets(c, data, known)
    refusals = _build_refusals(c, data, {**known, **dict.fromkeys(lets, "let")})
    parts = _build_parts(c, data, {**known, **dict.fromkeys(lets, "let")})
    steps: list[Step | None] = []
    raw_steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    assert isinstance(raw_steps, list)
    _check_unique_names(c, raw_steps)
    for i, raw in enumerate(raw_steps):
        if c.ok(("steps", i)):
            steps.append(_build_step(c, i, raw, known))
    if c.diagnostics or source is None or target is None:
        return c.diagnostics, None
    rules = Rules(
        path,
        display,
        hashlib.sha256("".join(document.texts).encode()).hexdigest(),
        data["name"],
        data.get("description", ""),
        source,
        replace(target, parts=parts),
        lets,
        {k: c.where(("let", k)) for k in lets},
        tuple(s for s in steps if s is not None),
        c.where(("target",)),
        data.get("layout", ""),
        data.get("detect", False),
        data.get("converted", False),
        refusals,
        backward,
        str(forward["reverse"]["name"]) if isinstance(forward.get("reverse"), dict) and not backward else "",
    )
    return [], rules


def _sorted(problems: list[Diagnostic]) -> list[Diagnostic]:
    return sorted(problems, key=lambda d: (d.file or "", d.line or 0, d.column or 0))


def check_text(text: str, display: str = "<string>", path: Path | None = None) -> list[Diagnostic]:
    """All problems of a rule document, sorted by position; empty if it is valid."""
    return _sorted(_check(display, path or Path(display), text)[0])


def notes(path: Path | str) -> list[Diagnostic]:
    """What loading a rule file says without it being wrong (a base found among the shipped rules)."""
    try:
        return list(load_document(Path(path), str(path)).notes)
    except LoadError:
        return []


def check_file(path: Path | str) -> list[Diagnostic]:
    """All problems of one rule file (and of the bases it extends, and of its derived backward rule), sorted
    by position; empty if valid."""
    problems, rules = _check(str(path), Path(path))
    if rules is not None and rules.reversible:
        problems += [d for d in _check(str(path), Path(path), backward=True)[0] if d not in problems]
    return _sorted(problems)


def load_rules(path: Path | str, backward: bool = False) -> Rules:
    """Load and check a rule file (or the backward rule it derives); raises :class:`PhiRulesError` listing
    every problem."""
    problems, rules = _check(str(path), Path(path), backward=backward)
    if rules is None:
        raise PhiRulesError(
            _sorted(problems) or [Diagnostic("an abstract rule is a base for others, not converted", str(path))]
        )
    return rules


def rule_files(paths: Iterable[Path | str]) -> list[Path]:
    """Expand folders into the ``*.yaml``/``*.yml`` files below them, sorted; files pass through."""
    found: list[Path] = []
    for p in (Path(x) if Path(x).exists() else rule_path(str(x)) for x in paths):  # a shipped rule by name
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file()))
        else:
            found.append(p)
    return found


def load_ref(ref: str) -> Rules:
    """A rule argument: a file, a shipped rule's name, or the name of the backward rule a shipped one derives."""
    forward = shipped_reverse_names().get(ref)
    if forward is not None and not Path(ref).exists():
        return load_rules(forward, backward=True)
    return load_rules(rule_path(ref))
