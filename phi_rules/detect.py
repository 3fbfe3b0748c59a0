"""Which rule fits a checkpoint: plan every candidate on the source's names and shapes, torch-free.

Candidates are the shipped rules marked ``detect: true`` (one generic rule per layout, today's
layout included, marked ``converted``) plus any the user names. A rule fits when its plan has no
problem: every source tensor consumed, no dead step, every op fitting its shapes. Tensor bytes are
never read (a ``.bin`` is a pickle, so reading its names loads it; safetensors give headers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from phi_rules.errors import Diagnostic, PhiRulesError, did_you_mean
from phi_rules.language.document import RULES_DIR, load_document
from phi_rules.language.rules import Rules, load_rules, rule_files
from phi_rules.options import Options
from phi_rules.planning.planner import Plan, make_plan
from phi_rules.source.header import TensorInfo
from phi_rules.source.resolve import ResolvedSource, source_tensors


@dataclass(frozen=True)
class Fit:
    """One candidate's verdict: ``reason`` is its first problem, empty when it fits."""

    rules: Rules
    reason: str
    refusal: str = ""  # a refusal of the rule that holds for this source
    names_fit: bool = True  # every source tensor is consumed
    given: bool = False  # named by the user (--rules): it wins over shipped rules that fit as well

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


def candidates(extra: Sequence[Path] = ()) -> list[Rules]:
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


def _verdict(rules: Rules, plan: Plan) -> Fit:
    """Why a rule does not fit (its names first: a refusal of a rule for another layout says little), and the
    refusal that holds, if any."""
    refusal = next((p.message for p in plan.problems if p.code == "refused"), "")
    if plan.unconsumed:
        unconsumed = f"{len(plan.unconsumed)} source tensor(s) no step consumes, first: {plan.unconsumed[0]}"
        return Fit(rules, unconsumed, refusal, names_fit=False)
    return Fit(rules, plan.problems[0].message, refusal)


def detect(source: object, options: Options, extra: Sequence[Path] = ()) -> list[Fit]:
    """Every candidate's verdict for a source: a folder, a weights file, or a hub repository."""
    read: dict[object, tuple[dict[str, TensorInfo], ResolvedSource]] = {}
    fits = []
    rules_list = candidates(extra)
    shipped = len(rules_list) - len(extra)
    for n, rules in enumerate(rules_list):
        try:
            key = (rules.source.files, rules.source.config_file, tuple(rules.source.parts))  # what a rule reads
            if key not in read:
                read[key] = source_tensors(rules, options.source, lambda _: None)
            tensors, resolved = read[key]
            plan = make_plan(rules, tensors, resolved.config(), options.overrides, base=resolved.base())
        except PhiRulesError as exc:
            fits.append(Fit(rules, exc.diagnostics[0].message))
            continue
        fits.append(replace(_verdict(rules, plan) if plan.problems else Fit(rules, ""), given=n >= shipped))
    if not read:  # the source itself could not be read: that one line says why
        reason = fits[0].reason if fits else "none given"
        raise PhiRulesError(reason if reason.startswith(str(source)) else f"{source}: cannot be read: {reason}")
    return fits


def _for_target(source: object, fits: list[Fit], to: str) -> list[Fit]:
    """The verdicts of rules that write ``to``; a refusal among them is the one-line answer when none fits."""
    named = [f for f in fits if to in f.rules.target.names]
    if not named:
        targets = sorted({n for f in fits for n in f.rules.target.names})
        hint = did_you_mean(to, targets)
        raise PhiRulesError(f"--to {to}: no rule writes that{hint} (targets: {', '.join(targets)})")
    refused = sorted((f for f in named if f.refusal), key=lambda f: not f.names_fit)  # the rule for this layout
    if not any(f.fits for f in named) and refused:
        raise PhiRulesError(f"{source}: --to {to} {refused[0].refusal} (rule {refused[0].rules.name})")
    return named


def chosen(source: object, fits: list[Fit], to: str | None = None) -> Rules:
    """The one rule that fits (among those writing ``to``), or every verdict as the error (none, several,
    or already converted)."""
    if to is not None:
        fits = _for_target(source, fits, to)
    good = [f for f in fits if f.fits]
    done = [f for f in good if f.rules.converted]
    if done:  # today's layout: nothing to do unless --to asks for another layout (which is then the one rule)
        others = sorted({f.rules.target.names[0] for f in good if not f.rules.converted})
        more = f" (or --to {', '.join(others)} for the layout{'s' if len(others) > 1 else ''} it converts to)"
        raise PhiRulesError(already_converted(source, done[0].rules) + (more if others else ""))
    if len(good) == 1:
        return good[0].rules
    targets = sorted({f.rules.target.names[0] for f in good})
    if len(good) > 1 and len(targets) == len(good):
        raise PhiRulesError(f"{source}: converts to {', '.join(targets)}: pick one with --to {targets[0]}")
    what = "no rule fits" if not good else f"{len(good)} rules fit ({', '.join(f.rules.name for f in good)})"
    summary = Diagnostic(f"{source}: {what}; name the rule to use (or add candidates with --rules FILE)")
    verdicts = [Diagnostic(f"{f.rules.name} ({f.rules.display}): {'fits' if f.fits else f.reason}") for f in fits]
    raise PhiRulesError([summary, *verdicts])


def route(source: object, fits: list[Fit], to: str | None = None) -> list[Rules]:
    """The rules to run in order: the one that fits (and writes ``to``), or, where none writes ``to`` from this
    layout, two in a row: one that fits, then the one that reads what it writes and writes ``to`` (phi-msft to
    today's Phi, then today's Phi to transformers-4.36)."""
    if to is None or any(f.fits and (to == f.rules.layout or to in f.rules.target.names) for f in fits):
        return [chosen(source, fits, to)]  # one rule writes it, or the source is in that layout already
    for first in (f.rules for f in fits if f.fits and not f.rules.converted):
        then = [f.rules for f in fits if f.rules.layout in first.target.names and to in f.rules.target.names]
        if len(then) == 1:
            return [first, then[0]]
    return [chosen(source, fits, to)]  # its error says what fits and what does not


def already_converted(source: object, rules: Rules) -> str:
    return (
        f"{source}: already in transformers' {rules.target.architecture} layout: it needs no conversion; "
        "load it with from_pretrained"
    )
