"""Which rule fits a checkpoint: plan every candidate on the source's names and shapes, torch-free.

Candidates are the shipped rules marked ``detect: true`` (one generic rule per layout, today's
layout included, marked ``converted``) plus any the user names. A rule fits when its plan has no
problem: every source tensor consumed, no dead step, every op fitting its shapes. Tensor bytes are
never read (a ``.bin`` is a pickle, so reading its names loads it; safetensors give headers).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from shlex import quote
from typing import Any

from phi_rules.errors import Diagnostic, PhiRulesError, did_you_mean
from phi_rules.language import expr, regex
from phi_rules.language.document import RULES_DIR, load_document
from phi_rules.language.regex import literal_prefix
from phi_rules.language.rules import Rule, load_rules, rule_files
from phi_rules.language.steps import Drop, Rename
from phi_rules.options import Options
from phi_rules.planning.planner import Plan, make_plan
from phi_rules.source.header import TensorInfo
from phi_rules.source.resolve import ResolvedSource, headers_only, resolve, source_tensors

SAMPLE = 3  # tensor names shown of those no rule consumes


@dataclass(frozen=True)
class Fit:
    """One candidate's verdict: ``reason`` is its first problem, empty when it fits. ``plan`` and ``source``
    are what detection made of it (``source`` where it was resolved in full, as a conversion resolves it), so
    that the conversion it picks reads and plans nothing twice."""

    rules: Rule
    reason: str
    refusal: str = ""  # a refusal of the rule that holds for this source (none that names another model type)
    reads: bool = True  # every source tensor is consumed and no refusal says the source is another model type
    given: bool = False  # named by the user (--rules): it wins over shipped rules that fit as well
    unconsumed: tuple[str, ...] = ()  # the source tensors no step consumes
    plan: Plan | None = field(default=None, compare=False, repr=False)
    source: ResolvedSource | None = field(default=None, compare=False, repr=False)

    @property
    def fits(self) -> bool:
        return not self.reason

    def to_json(self) -> dict[str, object]:
        return {
            "rule": self.rules.name,
            "file": self.rules.display,
            "layout": self.rules.layout,
            "fits": self.fits,
            "converted": self.rules.converted,
            "target": self.rules.target.names[0],
            "refused": bool(self.refusal),
            "given": self.given,
            "reason": self.reason or None,
        }


@dataclass(frozen=True)
class Detection:
    """Every candidate's verdict on one source, and the source's own config (to say what it is)."""

    source: object  # as the user named it
    fits: list[Fit]
    config: Mapping[str, Any] | None = None
    tensors: tuple[str, ...] = ()


def candidates(extra: Sequence[Path] = ()) -> list[Rule]:
    """The shipped detection candidates, then the user's rules (every file checked first)."""
    shipped = []
    for f in rule_files([RULES_DIR]):
        document = load_document(f, str(f))
        data = document.located.data
        if not document.abstract and isinstance(data, dict) and data.get("detect") is True:
            shipped.append(load_rules(f))
            if isinstance(data.get("reverse"), dict):  # a rule that runs backward is a candidate both ways
                shipped.append(load_rules(f, backward=True))
    return shipped + [load_rules(f) for f in extra]


def _patterns(rules: Rule) -> list[tuple[str, bool]]:
    """Each pattern a step matches source names with: its text, and whether it matches anywhere in a name."""
    found: list[tuple[str, bool]] = []
    for step in rules.steps:
        if isinstance(step, Rename):
            found += [(p.pattern, step.anywhere) for p, _ in step.pairs]
        elif isinstance(step, Drop):
            found.append((step.pattern.pattern, False))
        else:
            found += [(p.pattern, False) for p in step.patterns]
    return found


def may_read(rules: Rule, names: Sequence[str]) -> set[str] | None:
    """The (sorted) names some step of the rule can match, by its patterns' literal prefixes, and those its
    dim()/max_index() read; None when a pattern has no literal prefix (then any name). A name outside the set
    is one no step consumes: the rule is planned on the set alone (none of it: not planned at all), and
    its verdict is the one the whole plan gives."""
    found: set[str] = set()
    for pattern, anywhere in _patterns(rules):
        prefix = literal_prefix(pattern)
        if not prefix:
            return None
        if anywhere:
            found.update(n for n in names if prefix in n)
            continue
        at = bisect.bisect_left(names, prefix)
        while at < len(names) and names[at].startswith(prefix):
            found.add(names[at])
            at += 1
    if found:  # the values a step reads are planned too
        for query in map(regex.compile, rules.queries):
            found.update(n for n in names if query.fullmatch(n))
    return found


def _unconsumed(rules: Rule, unconsumed: Sequence[str], refusal: str = "") -> Fit:
    reason = f"{len(unconsumed)} source tensor(s) no step consumes, first: {unconsumed[0]}"
    return Fit(rules, reason, refusal, reads=False, unconsumed=tuple(unconsumed))


def _other_model(rules: Rule, refusal: str) -> bool:
    """A refusal that tests the source's ``model_type`` says the rule is for another model (llama-to-phi3 given
    a Gemma, whose tensors have Llama's names)."""
    return any(
        refusal == f"refused: {r.reason}" and any(n.name == "model_type" for n in expr.names(r.when))
        for r in rules.refusals
    )


def _verdict(rules: Rule, plan: Plan) -> Fit:
    """Why a rule does not fit (its names first: a refusal of a rule for another layout says little), and the
    refusal that holds, if any, unless it says the source is another model type (then the rule is not its
    answer: it does not read the source)."""
    refusal = next((p.message for p in plan.problems if p.code in ("refused", "accept", "set")), "")
    if refusal and _other_model(rules, refusal):
        refusal = ""
        if not plan.unconsumed:
            return Fit(rules, plan.problems[0].message, reads=False)
    if plan.unconsumed:  # a refusal can be why (a DoRA part the fused module cannot take): --to keeps it
        return _unconsumed(rules, plan.unconsumed, refusal)
    return Fit(rules, plan.problems[0].message, refusal)


Read = tuple[dict[str, TensorInfo], ResolvedSource, Mapping[str, Any] | None, Mapping[str, Any] | None]


def detect(source: object, options: Options, extra: Sequence[Path] = ()) -> Detection:
    """Every candidate's verdict for a source: a folder, a weights file, or a hub repository. A source whose
    weights cannot be read, or whose config file cannot, is one error before any rule is tried."""
    read: dict[object, Read] = {}
    carried: dict[object, object] = {}
    ordered: dict[object, list[str]] = {}  # the source's names, sorted (for the rule-out by prefix)
    fits = []
    rules_list = candidates(extra)
    shipped = len(rules_list) - len(extra)
    model_config: Mapping[str, Any] | None = None
    for n, rules in enumerate(rules_list):
        key = (rules.source.files, rules.source.config_file, tuple(rules.source.parts))  # what a rule reads
        if key not in read:
            try:
                tensors, resolved = source_tensors(rules, options.source, lambda _: None)
            except PhiRulesError as exc:  # the rule's own files (a hub rule's pinned names), or the source
                fits.append(Fit(rules, exc.diagnostics[0].message, reads=False))
                continue
            read[key] = (tensors, resolved, resolved.config(), resolved.base())  # a bad config.json: raised here
            carried[key] = rules.source.extra_files  # the side files that ``resolved`` holds
            ordered[key] = sorted(tensors)
        tensors, resolved, config, base = read[key]
        if rules.source.config_file == "config.json":
            model_config = config
        readable = may_read(rules, ordered[key]) if tensors else None
        if readable is not None and not readable:
            fits.append(replace(_unconsumed(rules, list(tensors)), given=n >= shipped))
            continue
        part = tensors
        if readable is not None and len(readable) < len(tensors):
            part = {name: info for name, info in tensors.items() if name in readable}
        plan = make_plan(rules, part, config, base=base)
        try:
            plan = _lifted(rules, plan, part, config, base, options)
        except PhiRulesError as exc:  # what --set gives the source, refused by the rule
            fits.append(Fit(rules, exc.diagnostics[0].message))
            continue
        if part is not tensors:  # planned on what it may read: the rest of the source no step consumes
            left = set(plan.unconsumed)
            unconsumed = [name for name in tensors if name not in part or name in left]
            fits.append(replace(_verdict(rules, replace(plan, unconsumed=unconsumed)), given=n >= shipped))
            continue
        if headers_only(rules, options.source):
            whole = None
        elif carried[key] == rules.source.extra_files:
            whole = resolved
        else:  # rules that read the same weights need not carry the same side files
            whole = resolve(rules, options.source)
        verdict = _verdict(rules, plan) if plan.problems else Fit(rules, "")
        fits.append(replace(verdict, given=n >= shipped, plan=plan, source=whole))
    if not read:  # the source itself could not be read: that one line says why
        reason = fits[0].reason if fits else "none given"
        raise PhiRulesError(reason if reason.startswith(str(source)) else f"{source}: cannot be read: {reason}")
    names = next(iter(read.values()))[0]
    return Detection(source, fits, model_config, tuple(names))


def _lifted(
    rules: Rule,
    plan: Plan,
    tensors: dict[str, TensorInfo],
    config: Mapping[str, Any] | None,
    base: Mapping[str, Any] | None,
    options: Options,
) -> Plan:
    """A rule whose names fit and that only a refusal stops, planned again with what the user said of the source
    (``--set`` on its source fields, ``--accept``): what may lift the refusal, or say why it does not."""
    given = {k: v for k, v in options.overrides.items() if k in rules.source.config_defaults}
    refused = plan.problems and all(p.code == "refused" for p in plan.problems)
    if not refused or plan.unconsumed or not (given or options.accept):
        return plan
    return make_plan(rules, tensors, config, given, base=base, accept=options.accept)


def what_it_is(detection: Detection) -> str:
    """The source as its config.json names it: ``model_type qwen2, Qwen2ForCausalLM``."""
    config = detection.config or {}
    said = [f"model_type {config['model_type']}"] if isinstance(config.get("model_type"), str) else []
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        said.append(", ".join(map(str, architectures)))
    return ", ".join(said) or ("no config.json" if detection.config is None else "its config.json names no model type")


def nothing_reads(detection: Detection) -> str | None:
    """The one-line answer when no candidate reads the source (none fits, and none leaves only its config or a
    refusal in the way): what the source is, a few tensor names no rule consumes, and the closest rule."""
    fits = detection.fits
    if not fits or any(f.fits or f.reads for f in fits):
        return None
    planned = [set(f.unconsumed) for f in fits if f.unconsumed or f.plan is not None]  # not a rule it cannot read
    shared = set.intersection(*planned) if planned else set()
    strange = [n for n in detection.tensors if n in shared][:SAMPLE]
    # the rule that consumes most of the source; one whose names all fit (refused: another model type) first
    closest = min(fits, key=lambda f: len(f.unconsumed) if f.unconsumed or f.plan else len(detection.tensors) + 1)
    what = "no rule" if any(f.given for f in fits) else "no shipped rule"
    more = ", …" if len(shared) > SAMPLE else ""
    tail = f"; tensors no rule consumes: {', '.join(strange)}{more}" if strange else ""
    if len(closest.unconsumed) == len(detection.tensors):
        near = f"no rule consumes any of its {len(detection.tensors)} tensor(s)"
    elif not closest.unconsumed:
        model_type = (detection.config or {}).get("model_type")
        near = (
            f"the closest is {closest.rules.name}: every tensor name matches, but it reads the "
            f"{closest.rules.layout} layout, not model_type {model_type}"
        )
    else:
        near = f"the closest is {closest.rules.name}: {closest.reason}"
    return f"{detection.source}: {what} reads this source ({what_it_is(detection)}{tail}); {near}"


def config_not_found(rules: Rule, resolved: ResolvedSource, problem: str) -> str:
    """A rule that fails on a source without its config file: the file is the cause, in one line."""
    name = rules.source.config_file
    return (
        f"{resolved.where}/{name}: not found: rule {rules.name} ({rules.layout or 'its'} layout) reads the model's "
        f"sizes from it ({problem}); put the {name} the weights came with beside them"
    )


def missing_config(detection: Detection) -> str | None:
    """The one-line answer when the rules that read the source's names fail for want of its config file."""
    if any(f.fits for f in detection.fits):
        return None
    for f in detection.fits:
        if f.reads and f.source is not None and f.source.config_path is None and f.rules.source.config_file:
            return config_not_found(f.rules, f.source, f.reason)
    return None


def _for_target(detection: Detection, to: str) -> list[Fit]:
    """The verdicts of rules that write ``to``; a refusal among them is the one-line answer when none fits."""
    named = [f for f in detection.fits if to in f.rules.target.names]
    if not named:
        targets = sorted({n for f in detection.fits for n in f.rules.target.names})
        hint = did_you_mean(to, targets)
        raise PhiRulesError(f"--to {to}: no rule writes that{hint} (targets: {', '.join(targets)})")
    refused = sorted((f for f in named if f.refusal), key=lambda f: not f.reads)  # the rule for this layout first
    if not any(f.fits for f in named) and refused:
        raise PhiRulesError(f"{detection.source}: --to {to} {refused[0].refusal} (rule {refused[0].rules.name})")
    return named


def chosen(detection: Detection, to: str | None = None) -> Fit:
    """The one rule that fits (among those writing ``to``), or the one error that says why none does: the
    source's config file missing, no rule reading the source, or every verdict (none fits, or several)."""
    fits = detection.fits
    source = detection.source
    for answer in (missing_config(detection), nothing_reads(detection)):
        if answer is not None:
            raise PhiRulesError(answer)
    if to is not None:
        fits = _for_target(detection, to)
    good = [f for f in fits if f.fits]
    done = [f for f in good if f.rules.converted]
    if done:  # today's layout: nothing to do unless --to asks for another layout (which is then the one rule)
        others = sorted({f.rules.target.names[0] for f in good if not f.rules.converted})
        more = f" (or --to {', '.join(others)} for the layout{'s' if len(others) > 1 else ''} it converts to)"
        raise PhiRulesError(already_converted(source, done[0].rules) + (more if others else ""))
    yours = [f for f in good if f.given]
    if len(good) == 1 or len(yours) == 1:  # a rule the user named wins over shipped ones that fit as well
        return (yours or good)[0]
    targets = sorted({f.rules.target.names[0] for f in good})
    if len(good) > 1 and len(targets) == len(good):
        raise PhiRulesError(f"{source}: converts to {', '.join(targets)}: pick one with --to {targets[0]}")
    if good:  # several for one target: the user names one (a shipped rule by its name)
        listed = ", ".join(f.rules.name for f in good)
        name, src = good[0].rules.name, quote(str(source))
        said = f"{len(good)} rules fit ({listed}); name one: phi-rules apply {name} --source {src} --out {name}"
    else:
        said = f"no rule fits; phi-rules detect {quote(str(source))} --all says why each does not"
    summary = Diagnostic(f"{source}: {said}")
    verdicts = [Diagnostic(f"{f.rules.name} ({f.rules.display}): {'fits' if f.fits else f.reason}") for f in fits]
    raise PhiRulesError([summary, *verdicts])


def route(detection: Detection, to: str | None = None) -> list[Fit]:
    """The rules to run in order: the one that fits (and writes ``to``), or, where none writes ``to`` from this
    layout, two in a row: one that fits, then the one that reads what it writes and writes ``to`` (phi-msft to
    today's Phi, then today's Phi to transformers-4.36)."""
    fits = detection.fits
    if to is not None and not any(f.fits and (to == f.rules.layout or to in f.rules.target.names) for f in fits):
        for first in (f for f in fits if f.fits and not f.rules.converted):
            then = [f for f in fits if f.rules.layout in first.rules.target.names and to in f.rules.target.names]
            if len(then) == 1:
                return [first, then[0]]
    return [chosen(detection, to)]  # one rule writes it, the source is in that layout already, or the error


def already_converted(source: object, rules: Rule) -> str:
    return (
        f"{source}: already in transformers' {rules.target.architecture} layout: it needs no conversion; "
        "load it with from_pretrained"
    )
