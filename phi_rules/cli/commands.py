"""The commands: each reads its parsed arguments, runs the stages it needs (imported here, inside main's
interrupt handling, so that start-up stays short) and prints through :mod:`phi_rules.cli.show`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.cli import show
from phi_rules.errors import Diagnostic, PhiRulesError

if TYPE_CHECKING:
    from phi_rules.language.rules import Rule
    from phi_rules.options import Options


def schema_command(args: argparse.Namespace) -> int:
    from phi_rules.language.document import SCHEMA_PATH

    text = SCHEMA_PATH.read_text(encoding="utf-8")
    output: Path | None = args.output
    if output is None:
        print(text, end="")
        return 0
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PhiRulesError(f"{output}: cannot write the schema: {exc.strerror or exc}") from None
    return 0


def validate_command(args: argparse.Namespace) -> int:
    from phi_rules.language.rules import check_file, notes, rule_files

    files = rule_files(args.paths)
    found: list[Diagnostic] = []
    said: list[Diagnostic] = []
    for f in files:
        found.extend(check_file(f))
        said.extend(notes(f))
    if args.format != "json":
        for d in said:
            print(f"{d.file}:{d.line}:{d.column}: note: {d.message}", file=sys.stderr)
    if not files:
        found.append(Diagnostic("no rule files found", " ".join(args.paths)))
    if args.format == "json":
        print(json.dumps([d.to_json() for d in found], indent=2))
    else:
        for d in found:
            print(d)
        print(f"{len(files)} file(s) checked, {len(found)} error(s)", file=sys.stderr)
    return 1 if found else 0


def list_command(args: argparse.Namespace) -> int:
    from phi_rules.language.document import RULES_DIR, LoadError, load_document
    from phi_rules.language.reverse import one_way
    from phi_rules.language.rules import load_rules, rule_files

    rows = []
    for f in rule_files([RULES_DIR]):
        row: dict[str, str | None] = {"name": None, "layout": None, "file": show.shown(f), "description": ""}
        try:
            document = load_document(f, str(f))
            if document.abstract:
                row["description"] = "(a base that other rules extend)"
            else:
                r = load_rules(f)
                row |= {"name": r.name, "layout": r.layout or None, "description": " ".join(r.description.split())}
                data = document.located.data if isinstance(document.located.data, dict) else {}
                row["one_way"] = None if r.backward_name else (one_way(data) or "it has no reverse section")
                if r.backward_name:  # the backward rule it derives: a rule of its own, by name
                    b = load_rules(f, backward=True)
                    described = f"(derived: {r.name} backward) {' '.join(b.description.split())}"
                    rows.append(row)
                    row = {"name": b.name, "layout": b.layout or None, "file": show.shown(f), "description": described}
                    row["derived_from"] = r.name
        except (PhiRulesError, LoadError) as exc:
            row["description"] = f"(invalid: {exc.diagnostics[0].message})"
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        (str(r["name"] or "-"), str(r["layout"] or "-"), str(r["file"]), show.backward(r), str(r["description"]))
        for r in rows
    ]
    show.table(("name", "layout", "file", "backward", "description"), table)
    return 0


def _options(args: argparse.Namespace) -> Options:

    from phi_rules.options import Options, SourceOptions
    from phi_rules.source.resolve import source_argument

    path, hub = source_argument(str(args.source)) if args.source is not None else (None, None)
    tokenizer = getattr(args, "tokenizer", None)
    base = getattr(args, "base", None) if args.command != "verify" else None  # verify's --base names two folders
    src = SourceOptions(path, hub, args.revision, args.cache_dir, args.offline, args.token, tokenizer, base)
    extra = {}
    if args.command == "apply":
        extra = {
            "device": args.device,
            "max_shard_bytes": args.max_shard_size,
            "format": args.format,
            "force": args.force,
            "fsync": args.fsync,
            "require_tokenizer": args.require_tokenizer,
            "verify": args.verify,
        }
    return Options(
        source=src,
        overrides=dict(getattr(args, "set", [])),
        accept=tuple(getattr(args, "accept", [])),
        dtype=getattr(args, "dtype", None),
        **extra,
    )


def detect_command(args: argparse.Namespace) -> int:
    from phi_rules.detect import detect
    from phi_rules.language.document import rule_path
    from phi_rules.options import Options, SourceOptions
    from phi_rules.source.resolve import source_argument

    path, hub = source_argument(str(args.source))
    options = Options(source=SourceOptions(path, hub, None, args.cache_dir, args.offline, args.token))
    detection = detect(args.source, options, [rule_path(r) for r in args.rules])
    code, answer = show.detected(detection, args.to)
    if args.json:
        verdicts = [f.to_json() for f in detection.fits]
        print(json.dumps({"source": str(args.source), "answer": answer, "fits": verdicts}, indent=2))
        return code
    if args.all:
        fits = [f for f in detection.fits if args.to in f.rules.target.names] if args.to else detection.fits
        rows = [
            (
                f.rules.name,
                f.rules.layout or "-",
                f.rules.target.names[0],
                ("yes, yours" if f.given else "yes") if f.fits else "no",
                show.short(f.reason),
            )
            for f in fits or detection.fits
        ]
        show.table(("rule", "layout", "target", "fits", "why not"), rows)
        print()
    print("\n".join(answer))
    return code


def _written_type(folder: Path) -> str | None:
    """The model type of a converted folder's architecture (``LlamaForCausalLM``: llama), if it says."""
    try:
        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return str(architecture).removesuffix("ForCausalLM").lower()


def verify_command(args: argparse.Namespace) -> int:
    from phi_rules.source.resolve import resolve
    from phi_rules.verify import accepted_up_to, failure, layer_rows, verify

    show.quiet_libraries()
    adapters, shown = None, args.out
    if args.base is not None:  # the layout and sizes are the base's; the adapters ride on each side
        adapters = (args.source, args.out)
        args.source, args.out = args.base
    args.to = _written_type(args.out)  # among the rules that read the source, the one that wrote this output
    accepted = accepted_up_to(args.out)  # made with a refusal accepted: proven up to the length it leaves exact
    max_length, args.accept = accepted or (None, [])
    (rules,) = _rules_for(args, [args.rules] if args.rules else [])
    options = _options(args)
    resolved = resolve(rules, options.source)
    progress = partial(show.bar, args.quiet, unit="layer", desc="verify")  # layer by layer, on a terminal
    report = verify(
        resolved.weights, rules.layout, resolved.config(), args.out, args.tol, adapters, progress, max_length
    )
    if args.json:
        print(json.dumps({"rule": rules.name, **report.to_json()}, indent=2))
    else:
        rows = layer_rows(report)
        width = max([len("part"), *(len(part) for part, _, _ in rows)]) + 2
        print(f"{'part':<{width}}{'max|Δ|':>12}{'tolerance':>12}")
        for part, delta, tol in rows:
            print(f"{part:<{width}}{delta:>12.2e}{tol:>12.2e}  {'ok' if delta <= tol else 'DIVERGES'}")
        for probe in report.probes:
            print(f"probed {probe.tokens} tokens: {probe.why}")
        for note in report.notes:
            print(note)
        if report.bounds is not None:
            print(f"dtypes: {report.bounds.describe()}")
    if report.checked:
        show.warn(f"{shown}: {report.checked}")
    problem = failure(shown, report)
    if problem is not None:
        show.diagnostics(problem.diagnostics)
        return 1
    if not args.json:
        if report.bounds is None:
            print(f"{shown}: has every tensor {report.reference} needs, by name and shape (no function check)")
        else:
            within = ""
            if accepted is not None:
                within = f" for inputs up to {accepted[0]} tokens, as --accept {', '.join(accepted[1])} left it"
            parts = f"({report.reference} reference, {len(layer_rows(report))} parts)"
            print(f"{shown}: computes the original function{within} {parts}")
    return 0


def check_command(args: argparse.Namespace) -> int:
    from phi_rules.check import findings, folder_files

    files = folder_files(args.folder)
    if "config.json" not in files:
        raise PhiRulesError(f"{args.folder}: no config.json: not a model folder (an adapter is checked on its base)")
    try:
        config = json.loads(files["config.json"].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PhiRulesError(f"{files['config.json']}: cannot read it as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PhiRulesError(f"{files['config.json']}: not a JSON object")
    found = findings(files, config)
    if args.json:
        print(json.dumps({"folder": str(args.folder), "findings": [f.to_json() for f in found]}, indent=2))
    else:
        for f in found:
            print(f"{'error' if f.wrong else 'warning'}: {args.folder / f.file}: {f.message}")
        if not found:
            print(f"{args.folder}: no findings", file=sys.stderr)
    return 1 if any(f.wrong for f in found) else 0


def _rules_for(args: argparse.Namespace, paths: list[str]) -> list[Rule]:
    """The named rule files, or the one that detection finds for --source."""
    from phi_rules.language.rules import load_ref

    if paths:
        return [load_ref(r, getattr(args, "to", None)) for r in paths]  # every file checked before any work starts
    return [f.rules for f in _route(args, one=True)]


def _writing(rules: list[Rule], to: str | None) -> list[Rule]:
    """Named rules beside ``--to``: each must write that target; a rule writes what it says, never another."""
    for r in rules:
        if to is not None and to not in r.target.names:
            raise PhiRulesError(
                f"--to {to}: rule {r.name} ({r.display}) writes {' / '.join(r.target.names)}, not {to}; name the "
                f"rule that writes {to}, or leave the rule out and --to picks it"
            )
    return rules


def _route(args: argparse.Namespace, one: bool = False) -> list[Any]:
    """Detection, once: the verdict (a ``Fit``) of each rule to run on --source, in order (one, or two in a row
    where no rule writes --to from this layout); ``one``: the one rule that writes --to."""
    from phi_rules.detect import chosen, detect, route

    found = _options(args)  # the layout is the source's own (--set and --accept only lift a refusal of a rule that
    # fits it); --tokenizer shapes the output
    detection = detect(args.source, replace(found, source=replace(found.source, tokenizer=None)))
    to = getattr(args, "to", None)
    return [chosen(detection, to)] if one else route(detection, to)


def plan_command(args: argparse.Namespace) -> int:
    from phi_rules import pipeline

    show.quiet_libraries()
    if args.rules:
        (rules,) = _writing(_rules_for(args, [args.rules]), args.to)
    else:
        chain = [f.rules for f in _route(args)]
        if len(chain) > 1:
            first, then = chain[0], ", then ".join(r.name for r in chain[1:])
            raise PhiRulesError(
                f"{args.source}: --to {args.to} goes through rule {first.name}, then {then}; apply runs them in a "
                f"row, plan shows one rule: phi-rules plan --source {show.quoted(args.source)} "
                f"--to {first.target.names[0]}"
            )
        (rules,) = chain
    result = pipeline.plan(rules, _options(args), note=show.note(args.json or args.quiet))
    for accepted in result.accepted:
        show.warn(accepted.said())
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    rows = [
        (
            t.name,
            "x".join(map(str, t.shape)) or "scalar",
            t.dtype,
            " + ".join(t.sources()),
            " > ".join(t.ops()) or "-",
            t.moves(),
            ", ".join(t.steps),
        )
        for t in result.all_tensors()
    ]
    show.table(("output", "shape", "dtype", "<- source", "ops", "bytes", "steps"), rows)
    print(
        f"\n{result.rules.name}: {len(result.tensors)} tensors, {result.total_bytes / 1e9:.3f} GB, "
        f"{result.rules.target.architecture} with {json.dumps(result.config)}"
    )
    return 0


def apply_command(args: argparse.Namespace) -> int:
    from phi_rules import pipeline

    show.quiet_libraries()
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    options = _options(args)
    found = None  # what detection read and planned of the source, where the conversion would do the same
    if args.rules:  # several rule files: one folder each
        named = _writing(_rules_for(args, args.rules), args.to)
        runs = [([r], args.out if len(named) == 1 else args.out / r.name) for r in named]
    else:
        fits = _route(args)
        chain = [f.rules for f in fits]
        r = chain[0]
        said = f"{args.source}: {r.layout} layout: rule {r.name} ({r.display}) writes {r.target.architecture}"
        show.note(args.quiet)(
            said + "".join(f", then rule {n.name} ({n.display}) {n.target.layout}" for n in chain[1:])
        )
        runs = [(chain, args.out)]
        if fits[0].source is not None and options.source.tokenizer is None:
            found = (fits[0].source, fits[0].plan)
    for chain, out in runs:
        result = pipeline.convert_through(
            chain,
            out,
            options,
            note=show.note(args.quiet),
            warn=show.warn,
            progress=show.progress_factory(args.quiet),
            found=found,
        )
        idle = [a for a in options.accept if a not in {x.name for x in result.accepted}]
        if idle:  # a refusal named that does not hold for this source: nothing was accepted
            show.note(args.quiet)(f"--accept {', '.join(idle)}: the refusal does not hold for this source")
        if not args.quiet:
            last = chain[-1].target
            what = last.architecture if len(chain) == 1 else last.layout  # a route ends in a layout
            print(f"{out}: {what}, {len(result.tensors)} tensors, {show.human(result.total_bytes)}", file=sys.stderr)
        if result.adapter_config is not None and not result.adapter_config.get("base_model_name_or_path"):
            show.warn(
                f"{out}: adapter_config.json names no base model (the converted adapter fits only the converted "
                "base): --set base_model_name_or_path=CONVERTED_BASE names it"
            )
    return 0
