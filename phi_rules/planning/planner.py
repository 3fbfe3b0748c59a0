"""Plan a conversion on metadata alone: run every step symbolically over names, shapes and dtypes.

The working set maps current names to :class:`Entry` values. Steps run in rule order over the whole
set; each sees the names the steps before it left. Shapes come from each op's own inference in
plain Python (no torch: planning phi-2 from its headers takes milliseconds). Problems are
collected, never raised, so that one run reports them all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from phi_rules.dtypes import FLOAT_DTYPES, itemsize
from phi_rules.errors import Diagnostic, did_you_mean
from phi_rules.language import expr, ops, regex, template
from phi_rules.language.rules import Rule
from phi_rules.language.steps import Drop, Rename, Step, Transform
from phi_rules.planning.parts import PartPlan, split
from phi_rules.source.header import TensorInfo

SHOW = 20  # at most this many keys named per problem class; the rest are counted


@dataclass(frozen=True, eq=False)
class Computation:
    """One transform application: its inputs run through ``ops`` and yield ``outputs`` tensors."""

    step: str
    inputs: tuple[Value, ...]
    ops: tuple[ops.Op, ...]
    outputs: int


@dataclass(frozen=True, eq=False)
class Pick:
    """Output ``index`` of a computation."""

    comp: Computation
    index: int


Value = TensorInfo | Pick


@dataclass(frozen=True)
class Entry:
    value: Value
    shape: tuple[int, ...]
    dtype: str
    steps: tuple[str, ...]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where it comes from, what is done to it, and what is written."""

    name: str
    value: Value
    shape: tuple[int, ...]
    dtype: str
    steps: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n

    def sources(self) -> list[str]:
        return [info.name for info in source_infos(self.value)]

    def ops(self) -> list[str]:
        return [str(op) for op in _ops_of(self.value)]

    def moves(self) -> str:
        """How its bytes are written: ``copy`` (source byte ranges as they are), ``cast`` (the same elements
        in another dtype, streamed) or ``compute`` (an op moves elements: torch runs it)."""
        from phi_rules.planning.segments import source_segments

        found = source_segments(self.value)
        if found is None:
            return "compute"
        return "copy" if found[1] == self.dtype else "cast"


def source_infos(value: Value) -> Iterator[TensorInfo]:
    if isinstance(value, TensorInfo):
        yield value
    else:
        for inp in value.comp.inputs:
            yield from source_infos(inp)


def _ops_of(value: Value) -> list[ops.Op]:
    if isinstance(value, TensorInfo):
        return []
    inner = [op for inp in value.comp.inputs for op in _ops_of(inp)]
    return inner + list(value.comp.ops)


@dataclass(frozen=True)
class Accepted:
    """A refusal that held and was accepted by name (``--accept``): the output computes the source's function
    for inputs up to ``exact_up_to`` tokens, and ``differs`` past them."""

    name: str
    exact_up_to: int
    differs: str

    def said(self) -> str:
        return (
            f"--accept {self.name}: the output computes the source's function for inputs up to {self.exact_up_to} "
            f"tokens; past {self.exact_up_to} tokens {self.differs}"
        )


@dataclass
class Plan:
    """The result of planning: outputs, the configs they were computed with, and every problem found."""

    rules: Rule
    source_config: dict[str, expr.Value]
    config: dict[str, expr.Value]
    tensors: list[PlannedTensor]
    source_names: list[str]
    problems: list[Diagnostic] = field(default_factory=list)
    unconsumed: list[str] = field(default_factory=list)  # source tensors no step touched
    adapter_config: dict[str, object] | None = None  # for adapter rules: the adapter_config.json to write
    overridden: tuple[str, ...] = ()  # the target config keys that --set gave
    uses: dict[str, expr.Value] = field(default_factory=dict)  # model attribute -> the value the source means
    accepted: list[Accepted] = field(default_factory=list)  # refusals that held and --accept named
    parts: list[PartPlan] = field(default_factory=list)  # sub-folders beside the model (target.parts)
    notes: list[str] = field(default_factory=list)  # what the user should know: a part the source lacks

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def all_tensors(self) -> list[PlannedTensor]:
        """The model's tensors, then each part's under its folder name (``vision-lora/…``)."""
        return self.tensors + [replace(t, name=f"{p.name}/{t.name}") for p in self.parts for t in p.tensors]

    def to_json(self) -> dict[str, object]:
        return {
            "rule": self.rules.name,
            "rule_file": self.rules.display,
            "architecture": self.rules.target.architecture,
            "config": self.config,
            "source_config": self.source_config,
            "tensors": [
                {
                    "name": t.name,
                    "sources": t.sources(),
                    "ops": t.ops(),
                    "bytes": t.moves(),
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "steps": list(t.steps),
                }
                for t in self.all_tensors()
            ],
            "parts": {p.name: p.adapter_config for p in self.parts},
            "total_bytes": self.total_bytes,
        }


def source_config(
    rules: Rule,
    found: Mapping[str, object] | None,
    overrides: Mapping[str, expr.Value],
    base: Mapping[str, object] | None = None,
) -> dict[str, expr.Value]:
    """Declared source fields: the source's config.json where it has them, else an adapter's base model's
    (``--base``), else the rule's defaults."""
    values = dict(rules.source.config_defaults)
    for key in values:
        for config in (found, base):
            if config is not None and key in config:
                values[key] = config[key]  # type: ignore[assignment]
                break
    values.update({k: v for k, v in overrides.items() if k in rules.source.config_defaults})
    return values


def target_config(
    rules: Rule,
    src: Mapping[str, expr.Value],
    found: Mapping[str, object] | None,
    overrides: Mapping[str, expr.Value],
    problems: list[Diagnostic],
    shapes: expr.Shapes | None = None,
) -> dict[str, expr.Value]:
    """Target config values: ``copy`` fields the source has, then the expressions; ``--set`` wins for target keys."""
    given = {**(found or {}), **{k: v for k, v in overrides.items() if k in rules.source.config_defaults}}
    values: dict[str, expr.Value] = {k: given[k] for k in rules.target.copy if k in given}  # type: ignore[misc]
    computed: dict[str, expr.Value] = {}
    for key, node in rules.target.config.items():  # a name reads the target value above it, else the source's
        try:
            values[key] = computed[key] = expr.evaluate(node, {**src, **computed}, shapes)
        except expr.ExprError as exc:
            problems.append(rules.target.config_where[key].error(f"cannot compute {key}: {exc.message}", "plan"))
    settable = rules.target.adapter.settable if rules.target.adapter else ()
    for key, value in overrides.items():
        if key not in rules.source.config_defaults and key not in settable:
            values[key] = value
    return values


def let_values(
    rules: Rule, env: Mapping[str, expr.Value], problems: list[Diagnostic], shapes: expr.Shapes | None = None
) -> dict[str, expr.Value]:
    """The ``let`` expressions evaluated in order, each seeing the ones before it."""
    values = dict(env)
    for name, node in rules.lets.items():
        try:
            values[name] = expr.evaluate(node, values, shapes)
        except expr.ExprError as exc:
            problems.append(rules.let_where[name].error(f"cannot compute let {name}: {exc.message}", "plan"))
    return values


def refusals(
    rules: Rule, env: Mapping[str, expr.Value], shapes: expr.Shapes | None = None, accept: tuple[str, ...] = ()
) -> tuple[list[Diagnostic], list[Accepted]]:
    """The rule's refusals whose condition holds for this source (the target would compute something else), and
    those of them that ``accept`` names, where the rule says up to what length the output is still exact."""
    found: list[Diagnostic] = []
    accepted: list[Accepted] = []
    names = [r.name for r in rules.refusals]
    found += [
        Diagnostic(
            f"--accept {a}: rule {rules.name} has no refusal {a!r}{did_you_mean(a, names)} (its refusals: "
            f"{', '.join(names) or 'none'})",
            code="accept",
        )
        for a in accept
        if a not in names
    ]
    for refusal in rules.refusals:
        try:
            if not expr.evaluate(refusal.when, env, shapes):
                continue
            if refusal.name not in accept:
                found.append(refusal.where.error(f"refused: {refusal.reason}", "refused"))
            elif refusal.exact_up_to is None:
                found.append(
                    Diagnostic(
                        f"--accept {refusal.name}: this refusal cannot be accepted: the output would compute "
                        f"otherwise at every length ({refusal.reason})",
                        code="accept",
                    )
                )
            else:
                up_to = expr.evaluate(refusal.exact_up_to, env, shapes)
                if not isinstance(up_to, int) or isinstance(up_to, bool) or up_to < 1:
                    raise expr.ExprError(f"accept/exact_up_to must be a whole number of tokens, not {up_to!r}")
                accepted.append(Accepted(refusal.name, up_to, refusal.differs))
        except expr.ExprError as exc:
            found.append(refusal.where.error(f"cannot check this refusal: {exc.message}", "plan"))
    return found, accepted


class _Planner:
    def __init__(self, rules: Rule, env: dict[str, expr.Value], problems: list[Diagnostic]) -> None:
        self.rules, self.env, self.problems = rules, env, problems

    def problem(self, step: Step, message: str) -> None:
        self.problems.append(step.where.error(f"step {step.name!r}: {message}", "step"))

    def run(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        for step in self.rules.steps:
            if isinstance(step, Drop):
                hits = [n for n in entries if step.pattern.fullmatch(n)]
                dropped = set(hits)
                entries = {n: e for n, e in entries.items() if n not in dropped}
            elif isinstance(step, Rename):
                hits, entries = self.rename(step, entries)
            else:
                hits, entries = self.transform(step, entries)
            if not hits and not step.optional:
                sample = ", ".join(list(entries)[:3])
                self.problem(
                    step,
                    "matched no tensor (a dead rule; add `optional: true` if that is expected)"
                    + (f"; current names include {sample}" if sample else ""),
                )
        return entries

    def _when(self, step: Rename | Transform, groups: dict[str, expr.Value]) -> bool:
        if step.when is None:
            return True
        return bool(expr.evaluate(step.when, {**self.env, **groups}))

    def _insert(self, step: Step, out: dict[str, Entry], name: str, entry: Entry, origin: str) -> None:
        if name in out:
            first = ", ".join(i.name for i in source_infos(out[name].value))
            self.problem(step, f"two sources produce one output name {name!r}: {first} and {origin}")
            return
        out[name] = entry

    def rename(self, step: Rename, entries: dict[str, Entry]) -> tuple[list[str], dict[str, Entry]]:
        out: dict[str, Entry] = {}
        hits: list[str] = []
        env = self.env
        for name, entry in entries.items():
            new = name
            try:
                for pattern, to in step.pairs:
                    m = pattern.search(name) if step.anywhere else pattern.fullmatch(name)
                    if m is None or not self._when(step, template.group_env(m)):
                        continue

                    def render(mm: regex.Match, to: template.Template = to) -> str:
                        return to.render(mm, {**env, **template.group_env(mm)})

                    new = pattern.sub(render, name) if step.anywhere else render(m)
                    hits.append(name)
                    entry = Entry(entry.value, entry.shape, entry.dtype, (*entry.steps, step.name))
                    break
            except expr.ExprError as exc:
                self.problem(step, f"for {name!r}: {exc.message}")
                hits.append(name)
                entry = Entry(entry.value, entry.shape, entry.dtype, (*entry.steps, step.name))
            self._insert(step, out, new, entry, name)
        return hits, out

    def _groups(self, step: Transform, entries: Mapping[str, Entry]) -> list[list[tuple[str, regex.Match] | None]]:
        """The inputs of each application, one per pattern, joined on equal named groups; ``None`` for a
        missing input where the step allows it (``absent: zeros``)."""
        per_pattern = [[(n, m) for n in entries if (m := p.fullmatch(n))] for p in step.patterns]
        if len(step.patterns) == 1:
            return [[hit] for hit in per_pattern[0]]
        common = sorted(set.intersection(*(set(p.groupindex) for p in step.patterns)))
        keyed: dict[tuple[str | None, ...], list[list[tuple[str, regex.Match]]]] = {}
        for i, hits in enumerate(per_pattern):
            for name, m in hits:
                slots = keyed.setdefault(tuple(m.group(g) for g in common), [[] for _ in step.patterns])
                slots[i].append((name, m))
        groups: list[list[tuple[str, regex.Match] | None]] = []
        for key, slots in keyed.items():
            label = ", ".join(f"{g}={v}" for g, v in zip(common, key, strict=True)) or "the whole state dict"
            if any(len(s) > 1 or (not s and not step.absent) for s in slots):
                counts = ", ".join(f"match[{i}]: {[n for n, _ in s] or 'nothing'}" for i, s in enumerate(slots))
                self.problem(step, f"needs exactly one tensor per pattern for {label}, found {counts}")
                continue
            groups.append([s[0] if s else None for s in slots])
        return groups

    @staticmethod
    def _zeros(
        step: str, group: list[tuple[str, regex.Match] | None], specs: list[ops.Spec], present: Iterator[Value]
    ) -> list[Value]:
        """The inputs in order, a computation of zeros in the place of each absent one."""
        return [
            next(present) if hit is not None else Pick(Computation(step, (), (ops.Zeros(spec),), 1), 0)
            for hit, spec in zip(group, specs, strict=True)
        ]

    def transform(self, step: Transform, entries: dict[str, Entry]) -> tuple[list[str], dict[str, Entry]]:
        produced: dict[str, list[tuple[str, Entry]]] = {}  # first input name -> outputs
        consumed: set[str] = set()
        hits: list[str] = []
        for group in self._groups(step, entries):
            present = [hit for hit in group if hit is not None]
            names = [n for n, _ in present]
            first_match = present[0][1]
            try:
                env = {**self.env, **template.group_env(first_match)}
                if not self._when(step, template.group_env(first_match)):
                    continue
                inputs = [entries[n] for n in names]
                specs = [ops.Spec(e.shape, e.dtype) for e in inputs]
                each = iter(specs)
                given = [None if hit is None else next(each) for hit in group]  # None: an absent input
                values: list[Value] = [e.value for e in inputs]
                bound: list[ops.Op] = []
                start = inputs[0].shape  # what `input` names: the run's first shape (after a split or concat)
                for op in step.ops:
                    b = op.bind(env, start, specs)
                    if not bound and len(present) < len(group):
                        specs = b.fill(given)
                        values = self._zeros(step.name, group, specs, iter(values))
                    inferred = b.infer(specs)
                    if len(inferred) != len(specs):
                        start = inferred[0].shape
                    specs = inferred
                    bound.append(b)
                outs = [tpl.render(first_match, env) for tpl in step.to]
            except (expr.ExprError, ops.OpError) as exc:
                self.problem(step, f"for {', '.join(names)}: {getattr(exc, 'message', exc)}")
                hits.extend(names)  # it matched: reported here, not again as dead or unconsumed
                for n in names:
                    entries[n] = Entry(entries[n].value, entries[n].shape, entries[n].dtype, (step.name,))
                continue
            hits.extend(names)
            consumed.update(names)
            comp = Computation(step.name, tuple(values), tuple(bound), len(specs))
            history = (*dict.fromkeys(s for e in inputs for s in e.steps), step.name)
            produced[names[0]] = [
                (out, Entry(Pick(comp, i), spec.shape, spec.dtype, history))
                for i, (out, spec) in enumerate(zip(outs, specs, strict=True))
            ]
        result: dict[str, Entry] = {}
        for name, entry in entries.items():
            for out, new in produced.get(name, []):
                self._insert(step, result, out, new, name)
            if name not in consumed:
                self._insert(step, result, name, entry, name)
        return hits, result


def make_plan(
    rules: Rule,
    tensors: Mapping[str, TensorInfo],
    found_config: Mapping[str, object] | None,
    overrides: Mapping[str, expr.Value] | None = None,
    dtype: str | None = None,
    base: Mapping[str, object] | None = None,
    accept: tuple[str, ...] = (),
) -> Plan:
    """Plan ``rules`` over source tensor metadata; problems land in ``Plan.problems``. ``base``: an adapter's
    base model's config, for the fields the adapter's own config lacks; ``accept``: refusals converted anyway."""
    overrides = overrides or {}
    problems: list[Diagnostic] = []
    src = source_config(rules, found_config, overrides, base if rules.target.adapter else None)  # --base: adapters
    shapes = {n: i.shape for n, i in tensors.items()}
    config = target_config(rules, src, found_config, overrides, problems, shapes)
    entries = {n: Entry(i, i.shape, i.dtype, ()) for n, i in tensors.items()}
    env = let_values(rules, {**config, **src}, problems, shapes)  # a field both sides name: the source's value
    refused, accepted = refusals(rules, env, shapes, accept)
    problems[:0] = refused
    final = _Planner(rules, env, problems).run(entries)
    out_dtype = dtype or (None if rules.target.dtype == "keep" else rules.target.dtype)
    untouched = [n for n, e in final.items() if not e.steps]
    if untouched:
        listed = ", ".join(untouched[:SHOW]) + (f" and {len(untouched) - SHOW} more" if len(untouched) > SHOW else "")
        problems.append(
            Diagnostic(
                f"{len(untouched)} source tensor(s) consumed by no step (rename or drop them): {listed}",
                rules.display,
                code="unconsumed",
            )
        )
    planned = [
        PlannedTensor(n, e.value, e.shape, out_dtype if out_dtype and e.dtype in FLOAT_DTYPES else e.dtype, e.steps)
        for n, e in final.items()
    ]
    planned, parts, notes = split(rules, planned, env, problems)
    adapter_config = None
    if rules.target.adapter is not None:
        from phi_rules.planning.adapter import converted

        where = rules.where_target.error("")
        adapter_config, adapter_problems = converted(
            found_config, rules.target.adapter, overrides, where, list(tensors)
        )
        problems += adapter_problems
    target_keys = tuple(k for k in overrides if k not in rules.source.config_defaults)
    problems[:0] = override_types(rules, found_config, overrides)
    uses: dict[str, expr.Value] = {}
    for name, node in rules.target.uses.items():
        try:
            uses[name] = expr.evaluate(node, env, shapes)
        except expr.ExprError as exc:
            problems.append(rules.target.uses_where[name].error(f"cannot compute {name}: {exc.message}", "plan"))
    held = [
        p for p in problems if p.code in ("accept", "refused")
    ]  # what else went wrong is its consequence: the reason alone
    return Plan(
        rules,
        src,
        config,
        planned,
        list(tensors),
        held or problems,
        untouched,
        adapter_config,
        target_keys,
        uses,
        accepted,
        parts,
        notes,
    )


def override_types(
    rules: Rule, found: Mapping[str, object] | None, overrides: Mapping[str, expr.Value]
) -> list[Diagnostic]:
    """A ``--set`` source field must be a number where the source's own value is one (``n_embd=abc``)."""
    wrong = []
    for key, value in overrides.items():
        if key not in rules.source.config_defaults:
            continue
        own = found.get(key) if found and key in found else rules.source.config_defaults[key]
        number = isinstance(value, int | float) or value is None  # null: the field is absent, as in config.json
        if isinstance(own, int | float) and not isinstance(own, bool) and not number:
            wrong.append(Diagnostic(f"--set {key}={value}: {key} is a number (the source has {own!r})", code="set"))
    return wrong
