"""The checker one rule document goes through: schema errors worded for people, located diagnostics, and the
parsing of expressions, templates and regexes that every section of a rule shares."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from phi_rules.errors import Diagnostic, did_you_mean
from phi_rules.language import expr, regex, template
from phi_rules.language.document import SCHEMA_PATH
from phi_rules.language.located_yaml import Located
from phi_rules.source.digest import cache_folder, write_atomically

if TYPE_CHECKING:
    import jsonschema

YPath = tuple[str | int, ...]


@cache
def schema() -> dict[str, object]:
    """The rule-file JSON Schema shipped in ``schemas/``."""
    loaded: dict[str, object] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


def _schema_passed(data: object) -> Path | None:
    """Where a document that passes the schema is remembered (``PHI_RULES_CACHE``), by its data and the schema;
    None when nothing is remembered."""
    folder = cache_folder()
    if folder is None:
        return None
    identity = SCHEMA_PATH.read_bytes() + json.dumps(data, sort_keys=True, default=repr).encode()
    return folder / "schema-passed" / hashlib.sha256(identity).hexdigest()


@dataclass(frozen=True)
class Where:
    """Where a part of a rule file is, for diagnostics raised by later stages."""

    file: str
    line: int
    column: int
    pointer: str

    def error(self, message: str, code: str | None = None) -> Diagnostic:
        return Diagnostic(message, self.file, self.line, self.column, self.pointer, code)


def _pointer(path: Iterable[str | int]) -> str:
    return "/".join(str(p) for p in path)


_ONE_OF_HINTS = {
    "step": "a step needs exactly one of 'rename', 'keep', 'drop' or 'transform'",
    "source": "a source needs either 'repo' with 'revision' and 'files', or 'path' (not both)",
    "split": "split needs exactly one of 'parts' or 'sizes'",
}


class Checker:
    """Collects diagnostics for one file while building its :class:`Rule`."""

    def __init__(self, display: str, located: Located) -> None:
        self.display = display
        self.located = located
        self.diagnostics: list[Diagnostic] = []
        self.bad_paths: list[YPath] = []
        data = located.data if isinstance(located.data, dict) else {}
        declared = data.get("placeholders")
        # Placeholder types the rule declares (``{i: int}``): short-form names read them.
        self.placeholders: dict[str, str] = dict(declared) if isinstance(declared, dict) else {}
        self.queries: list[str] = []  # the regexes of every dim()/max_index(): the source names values read

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
        """The JSON Schema's errors. A document that passed before (the same data, the same schema) is not
        checked again: importing and running jsonschema was a third of ``detect``'s time."""
        passed = _schema_passed(self.located.data)
        if passed is not None and passed.is_file():
            return
        import jsonschema

        errors = list(jsonschema.Draft202012Validator(schema()).iter_errors(self.located.data))
        for err in errors:
            path = tuple(err.absolute_path)
            self.bad_paths.append(path)
            self._schema_error(path, err)
        if not errors and passed is not None:
            write_atomically(passed, "")

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
            from jsonschema.exceptions import best_match

            best = best_match(typed or err.context or [])
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
            why = expr.unfit(value)
            if why is not None:
                self.error(path, f"bad number: {why}")
                return None
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
            else:
                self.queries.append(first.value)
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
