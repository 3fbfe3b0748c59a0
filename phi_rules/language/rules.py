"""Load a rule file into a typed, fully checked :class:`Rule` value, or report every problem in it.

Checking happens in one pass: YAML syntax, the JSON Schema, then semantics (regexes compile,
backreferences exist, expressions parse and name only declared things, ops agree with outputs,
step names are unique). Parts that failed the schema are not checked again semantically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from phi_rules.errors import Diagnostic, PhiRulesError, did_you_mean
from phi_rules.language import expr, reverse
from phi_rules.language.checker import Checker, Where, YPath
from phi_rules.language.config_fields import config_fields
from phi_rules.language.document import LoadError, load_document, rule_path, shipped_reverse_names
from phi_rules.language.steps import Rename, Step, build_step, check_unique_names


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
    layers_pattern: Mapping[str, str]  # PEFT's layers_pattern, source name -> target name ('h' -> 'layers')
    settable: tuple[str, ...]
    fused: Mapping[str, int] = field(default_factory=dict)  # fused target module -> how many parts it joins
    layer_shift: int = 0  # added to each layers_to_transform index (MixFormer's blocks are layers.1..N: -1)


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
class Refusal:
    """``refuse``: when ``when`` holds, the target would compute something else; ``reason`` says what to do."""

    when: expr.Node
    reason: str
    where: Where
    name: str = ""  # what ``--accept NAME`` says to convert anyway
    exact_up_to: expr.Node | None = None  # ``accept``: up to how many tokens the output still computes the source's
    differs: str = ""  # and what it computes otherwise past them; a refusal without ``accept`` cannot be accepted


@dataclass(frozen=True)
class Rule:
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
    backward_name: str = ""  # the name of the backward rule this one derives, if any
    queries: tuple[str, ...] = ()  # the regexes of its dim()/max_index() calls: source names its values read

    @property
    def config_only(self) -> bool:
        """Every step keeps names as they are: the rule converts the config alone."""
        return all(isinstance(s, Rename) and s.keeps for s in self.steps)


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


def _source_names(c: Checker, raw: object) -> dict[str, str]:
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
    for name, value in defaults.items():
        if (why := expr.unfit(value)) is not None:
            c.error(("source", "config_defaults", name), f"bad number: {why}")
    return {str(k): "source config" for k in [*fields, *defaults]}


def _build_target(c: Checker, data: dict[str, object], source_names: Mapping[str, str]) -> Target:
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
    if not remote:
        _check_config_fields(c, str(raw["architecture"]), [*raw["config"]], copy)
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


def _build_parts(c: Checker, data: dict[str, Any], known: Mapping[str, str]) -> tuple[Part, ...]:
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
        {str(k): str(v) for k, v in raw.get("layers_pattern", {}).items()},
        tuple(raw.get("settable", ())),
        {str(k): int(v) for k, v in raw.get("fused", {}).items()},
        int(raw.get("layer_shift", 0)),
    )


def _build_lets(c: Checker, data: dict[str, object], known: dict[str, str]) -> dict[str, expr.Node]:
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


def _check_merged_target(c: Checker, data: dict[str, Any]) -> None:
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


def _check_config_fields(c: Checker, architecture: str, config: list[str], copy: tuple[str, ...]) -> None:
    """Every ``target.config`` and ``copy`` key is a field of the target's config class (from the committed table:
    no torch), as ``plan`` finds with the class itself."""
    found = config_fields(architecture)
    if found is None:
        return
    cls, known = found
    keys: list[tuple[YPath, str]] = [(("target", "config", k), k) for k in config]
    keys += [(("target", "copy", i), k) for i, k in enumerate(copy)]
    for path, key in keys:
        if key not in known:
            c.error(path, f"{cls} has no field {key!r}{did_you_mean(key, known)}")


def _build_refusals(c: Checker, data: dict[str, object], known: Mapping[str, str]) -> tuple[Refusal, ...]:
    raw = data.get("refuse")
    if not isinstance(raw, dict) or not c.ok(("refuse",)):
        return ()
    found = []
    for name, item in raw.items():
        node = c.parse_expr(("refuse", name, "when"), item["when"], known)
        if "reason" not in item:
            c.error(("refuse", name), "missing required key 'reason' (in this file or the base it extends)")
        elif node is not None:
            accept = item.get("accept") or {}
            up_to = (
                c.parse_expr(("refuse", name, "accept", "exact_up_to"), accept["exact_up_to"], known)
                if accept
                else None
            )
            differs = " ".join(str(accept.get("differs", "")).split())
            reason = " ".join(str(item["reason"]).split())
            found.append(Refusal(node, reason, c.where(("refuse", name)), str(name), up_to, differs))
    return tuple(found)


def _check(
    display: str, path: Path, text: str | None = None, backward: bool = False
) -> tuple[list[Diagnostic], Rule | None]:
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
    c = Checker(display, located)
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
    check_unique_names(c, raw_steps)
    for i, raw in enumerate(raw_steps):
        if c.ok(("steps", i)):
            steps.append(build_step(c, i, raw, known))
    if c.diagnostics or source is None or target is None:
        return c.diagnostics, None
    rules = Rule(
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
        tuple(dict.fromkeys(c.queries)),
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
    if rules is not None and rules.backward_name:
        problems += [d for d in _check(str(path), Path(path), backward=True)[0] if d not in problems]
    return _sorted(problems)


def load_rules(path: Path | str, backward: bool = False) -> Rule:
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


def load_ref(ref: str, to: str | None = None) -> Rule:
    """A rule argument: a file, a shipped rule's name, or the name of the backward rule a shipped one derives.
    With ``to`` (``--to``), the backward rule the named one derives where that, not the rule, writes ``to``:
    a user's own rule runs backward as the shipped ones do."""
    forward = shipped_reverse_names().get(ref)
    if forward is not None and not Path(ref).exists():
        return load_rules(forward, backward=True)
    rules = load_rules(rule_path(ref))
    if to is None or to in rules.target.names or not rules.backward_name:
        return rules
    backward = load_rules(rules.path, backward=True)
    return backward if to in backward.target.names else rules
