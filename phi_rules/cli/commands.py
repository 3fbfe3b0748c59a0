"""The commands: each reads its parsed arguments, runs the stages it needs (imported here, inside main's
interrupt handling, so that start-up stays short) and prints through :mod:`phi_rules.cli.show`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.cli import show
from phi_rules.errors import Diagnostic, PhiRulesError

if TYPE_CHECKING:
    from phi_rules.language.rules import Rules
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
                row["one_way"] = None if r.reversible else (one_way(data) or "it has no reverse section")
                if r.reversible:  # the backward rule it derives: a rule of its own, by name
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
    return Options(source=src, overrides=dict(getattr(args, "set", [])), dtype=getattr(args, "dtype", None), **extra)


def detect_command(args: argparse.Namespace) -> int:
    from phi_rules.detect import detect
    from phi_rules.options import Options, SourceOptions
    from phi_rules.source.resolve import source_argument

    path, hub = source_argument(str(args.source))
    options = Options(source=SourceOptions(path, hub, None, args.cache_dir, args.offline, args.token))
    from phi_rules.language.document import rule_path

    fits = detect(args.source, options, [rule_path(r) for r in args.rules])
    good = [f for f in fits if f.fits]
    if args.json:
        print(json.dumps({"source": str(args.source), "fits": [f.to_json() for f in fits]}, indent=2))
        return 0 if len(good) == 1 or sum(f.given for f in good) == 1 else 1
    if args.to is not None:
        fits = [f for f in fits if args.to in f.rules.target.names] or fits
    good = [f for f in fits if f.fits]
    rows = [
        (
            f.rules.name,
            f.rules.layout or "-",
            f.rules.target.names[0],
            ("yes, yours" if f.given else "yes") if f.fits else "no",
            show.short(f.reason),
        )
        for f in fits
    ]
    show.table(("rule", "layout", "target", "fits", "why not"), rows)
    yours = [f for f in good if f.given]
    if len(yours) == 1 and len(good) > 1:  # a rule the user named wins over shipped ones that fit as well
        others = ", ".join(f.rules.name for f in good if not f.given)
        print(f"\n{args.source}: your rule {yours[0].rules.name} fits and wins over the shipped {others}")
        return 0
    done = [f for f in good if f.rules.converted]
    if done:
        back = [f.rules.target.names[0] for f in good if not f.rules.converted]
        more = f"; --to {', '.join(back)} converts it back" if back else ""
        print(f"\n{args.source}: already in today's layout: load it with from_pretrained, no conversion needed{more}")
        return 0
    if len(good) == 1:  # --to where other rules read this layout too (refused ones, say)
        rival = any(f.rules.layout == good[0].rules.layout and f is not good[0] for f in fits)
        to = f" --to {good[0].rules.target.names[0]}" if rival else ""
        print(f"\n{args.source}: {good[0].rules.layout} layout: phi-rules apply --source {args.source}{to} --out DIR")
    elif len({f.rules.target.names[0] for f in good}) == len(good) > 1:
        targets = [f.rules.target.names[0] for f in good]
        print(
            f"\n{args.source}: {good[0].rules.layout} layout, converts to {', '.join(targets)}: "
            f"phi-rules apply --source {args.source} --to {targets[0]} --out DIR"
        )
        return 0
    else:
        print(f"\n{args.source}: {'no rule fits' if not good else 'several rules fit'}")
    return 0 if len(good) == 1 else 1


def _written_type(folder: Path) -> str | None:
    """The model type of a converted folder's architecture (``LlamaForCausalLM``: llama), if it says."""
    try:
        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return str(architecture).removesuffix("ForCausalLM").lower()


def verify_command(args: argparse.Namespace) -> int:
    from phi_rules.source.resolve import resolve
    from phi_rules.verify import failure, layer_rows, verify

    show.quiet_libraries()
    adapters, shown = None, args.out
    if args.base is not None:  # the layout and sizes are the base's; the adapters ride on each side
        adapters = (args.source, args.out)
        args.source, args.out = args.base
    args.to = _written_type(args.out)  # among the rules that read the source, the one that wrote this output
    (rules,) = _rules_for(args, [args.rules] if args.rules else [])
    options = _options(args)
    resolved = resolve(rules, options.source)
    report = verify(resolved.weights, rules.layout, resolved.config(), args.out, args.tol, adapters)
    if args.json:
        print(json.dumps({"rule": rules.name, **report.to_json()}, indent=2))
    else:
        print(f"{'part':<14}{'max|Δ|':>12}{'tolerance':>12}")
        for part, delta, tol in layer_rows(report):
            print(f"{part:<14}{delta:>12.2e}{tol:>12.2e}  {'ok' if delta <= tol else 'DIVERGES'}")
    problem = failure(shown, report)
    if problem is not None:
        show.diagnostics(problem.diagnostics)
        return 1
    if not args.json:
        print(f"{shown}: computes the original function ({rules.layout} reference, {len(layer_rows(report))} parts)")
    return 0


def _rules_for(args: argparse.Namespace, paths: list[str]) -> list[Rules]:
    """The named rule files, or the one that detection finds for --source."""
    from phi_rules.detect import chosen
    from phi_rules.language.rules import load_ref

    if paths:
        return [load_ref(r) for r in paths]  # every file is checked before any work starts
    return [chosen(args.source, _detected(args), getattr(args, "to", None))]


def _detected(args: argparse.Namespace) -> list[Any]:
    """Every candidate's verdict on --source."""
    from phi_rules.detect import detect

    found = _options(args)  # the layout is the source's own: --set shapes the plan, --tokenizer the output
    return detect(args.source, replace(found, overrides={}, source=replace(found.source, tokenizer=None)))


def plan_command(args: argparse.Namespace) -> int:
    from phi_rules import pipeline

    show.quiet_libraries()
    if args.rules:
        (rules,) = _rules_for(args, [args.rules])
    else:
        from phi_rules.detect import route

        chain = route(args.source, _detected(args), args.to)
        if len(chain) > 1:
            first, then = chain[0], ", then ".join(r.name for r in chain[1:])
            raise PhiRulesError(
                f"{args.source}: --to {args.to} goes through rule {first.name}, then {then}; apply runs them in a "
                f"row, plan shows one rule: plan --source {args.source} --to {first.target.names[0]}"
            )
        (rules,) = chain
    result = pipeline.plan(rules, _options(args), note=show.note(args.json or args.quiet))
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
    if args.rules:  # several rule files: one folder each
        named = _rules_for(args, args.rules)
        runs = [([r], args.out if len(named) == 1 else args.out / r.name) for r in named]
    else:
        from phi_rules.detect import route

        chain = route(args.source, _detected(args), args.to)
        r = chain[0]
        said = f"{args.source}: {r.layout} layout: rule {r.name} ({r.display}) writes {r.target.architecture}"
        show.note(args.quiet)(
            said + "".join(f", then rule {n.name} ({n.display}) {n.target.layout}" for n in chain[1:])
        )
        runs = [(chain, args.out)]
    options = _options(args)
    for chain, out in runs:
        result = pipeline.convert_through(
            chain, out, options, note=show.note(args.quiet), warn=show.warn, progress=show.progress_factory(args.quiet)
        )
        if not args.quiet:
            last = chain[-1].target
            what = last.architecture if len(chain) == 1 else last.layout  # a route ends in a layout
            print(f"{out}: {what}, {len(result.tensors)} tensors, {show.human(result.total_bytes)}", file=sys.stderr)
    return 0
