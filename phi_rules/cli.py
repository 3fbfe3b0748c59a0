"""``phi-rules``: validate, plan and apply rule files. The only place that prints or exits."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from phi_rules.errors import Diagnostic, PhiRulesError

if TYPE_CHECKING:  # the stages are imported by the commands that run them, inside main's interrupt handling
    from phi_rules.language.rules import Rules
    from phi_rules.options import Options

EPILOG = """\
examples:
  phi-rules apply --source ./my-phi-checkpoint --out converted    the layout is detected: no rule to pick
  phi-rules apply --source someone/phi-2-finetune@abc123 --out converted        a hub repository
  phi-rules detect ./my-phi-checkpoint          which rule fits, and why the others do not
  phi-rules apply --source ./phi-4 --to llama --out phi-4-llama     Phi-3/Phi-4 to Llama (or mistral)
  phi-rules apply --source ./phi-4-llama --to phi3 --out phi-4      and back
  phi-rules apply --source ./my-llama-lora --to phi3 --base ./phi-4-llama --out my-lora    an adapter, fused
  phi-rules verify --source ./my-phi-checkpoint converted         prove the output by its function
  phi-rules apply phi-2 --out phi-2             a shipped rule by name: download at the pinned revision
  phi-rules plan phi-2 --source ./ckpt          dry run: what would be written, from headers only
  phi-rules validate rules/                     check every rule file (CI and pre-commit do this)
  phi-rules list                                shipped rules: name, layout, file, description

exit status: 0 success, 1 a problem with the rules, the source or the conversion, 2 bad usage.
A rule file is YAML checked against `phi-rules schema`; the README documents every key.
environment: HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE as huggingface_hub reads them;
PHI_RULES_CACHE, where source sha256s are remembered by file identity (empty: hash every run).
"""


TO_HELP = (
    "what to write, when the source's layout converts to several: a model type (llama, mistral, phi3, phi) or a "
    "layout name; a refused target says why in one line"
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("phi-rules")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _set_value(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a plain byte count, as transformers' ``max_shard_size`` reads them."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num) :]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: must be positive")
    return int(value)


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phi-rules",
        description="Convert original Microsoft Phi checkpoints (phi-1, phi-1.5, phi-2, fine-tunes and their LoRA "
        "adapters) into Hugging Face transformers models, and move Phi-3/Phi-4 models and adapters between Phi3 and "
        "the Llama/Mistral layouts, exactly or refused with the reason; driven by declarative YAML rule files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks (for reporting a bug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check rule files: YAML, schema and semantics; reports every error")
    v.add_argument("paths", nargs="+", metavar="PATH", help="rule files or folders (searched for *.yaml)")
    v.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text: one `file:line:col: key: message` per line; json: a list of objects",
    )

    v.add_argument("--json", action="store_const", const="json", dest="format", help="the same as --format json")
    sc = sub.add_parser("schema", help="print the JSON Schema of rule files (for editors and CI)")
    sc.add_argument("--output", type=Path, metavar="FILE", help="write it to FILE instead")
    li = sub.add_parser("list", help="list the shipped rules: name, layout, file, description")
    li.add_argument("--json", action="store_true", help="print them as one JSON document")

    def source_args(q: argparse.ArgumentParser, converting: bool = True) -> None:
        """Where the source comes from; and, for commands that write or plan an output, what shapes it."""
        g = q.add_argument_group("source", "where the original weights come from (default: the rule's source)")
        g.add_argument(
            "--source",
            type=Path,
            metavar="PATH|OWNER/NAME@REV",
            help="a local folder (weights found like from_pretrained finds them), one weights file, or a hub "
            "repository owner/name@revision (a branch is resolved to its commit)",
        )
        g.add_argument("--revision", help="hub commit, tag or branch instead of the rule's pinned revision")
        g.add_argument("--cache-dir", type=Path, metavar="DIR", help="hub cache (default: HF_HUB_CACHE)")
        g.add_argument("--offline", action="store_true", help="use only the hub cache (like HF_HUB_OFFLINE=1)")
        g.add_argument("--token", help="hub token for private or gated repos (default: HF_TOKEN / saved login)")
        if not converting:  # verify reads what was written: nothing here would change it
            return
        g.add_argument(
            "--tokenizer",
            metavar="PATH|OWNER/NAME@REV",
            help="copy tokenizer files from this folder or hub repository instead of the source's "
            "(the base model a fine-tune came from)",
        )
        g.add_argument(
            "--base",
            metavar="PATH|OWNER/NAME@REV",
            help="for an adapter: the base model it was trained on, whose config.json gives the sizes the adapter's "
            "tensors do not show (fusing q_proj alone into qkv_proj needs k and v's rows)",
        )
        q.add_argument(
            "--set",
            action="append",
            type=_set_value,
            default=[],
            metavar="NAME=VALUE",
            help="override a source config field or a target config value (JSON or plain text)",
        )
        q.add_argument(
            "--dtype",
            choices=["float32", "float16", "bfloat16"],
            help="dtype of written floating-point tensors (default: the rule's target.dtype)",
        )

    d = sub.add_parser(
        "detect",
        help="which rule fits a checkpoint: plans every candidate on tensor names and shapes",
        description="Plan every shipped detection candidate (one generic rule per legacy layout, and today's "
        "layout) and any --rules against the source's tensor names and shapes, and say which fit and why "
        "the others do not. Reads no tensor bytes and needs no torch for safetensors. Exit 0 when exactly "
        "one rule fits, 1 otherwise.",
    )
    d.add_argument(
        "source", type=Path, metavar="SRC", help="a checkpoint folder or weights file, or a hub repo owner/name@rev"
    )
    d.add_argument(
        "--rules", nargs="+", default=[], metavar="RULE", help="more candidates: rule files or shipped names"
    )
    d.add_argument("--json", action="store_true", help="print the verdicts as one JSON document")
    d.add_argument("--to", metavar="TARGET", help="show only the rules that write TARGET (llama, mistral, phi3, …)")
    d.add_argument("--cache-dir", type=Path, metavar="DIR", help="hub cache (default: HF_HUB_CACHE)")
    d.add_argument("--offline", action="store_true", help="use only the hub cache (like HF_HUB_OFFLINE=1)")
    d.add_argument("--token", help="hub token for private or gated repos")

    ve = sub.add_parser(
        "verify",
        help="prove a conversion by its function: the original architecture vs the converted folder",
        description="Run the original Phi architecture (a reference written from its description, reading the "
        "source by its original names and sizes from its own config.json, never from the rule) and the converted "
        "folder through transformers, on the same token ids, layer by layer in float32, and compare. Exit 0 when "
        "every part is within tolerance, 1 naming the first part that diverges.",
    )
    ve.add_argument("out", type=Path, metavar="OUT", help="the converted folder")
    ve.add_argument("--rules", metavar="RULE", help="the rule used, a file or a shipped name (default: detected)")
    ve.add_argument("--tol", type=float, default=1e-4, help="tolerance relative to each part's scale (default 1e-4)")
    ve.add_argument("--json", action="store_true", help="print the comparison as one JSON document")
    ve.add_argument(
        "--base",
        nargs=2,
        type=Path,
        metavar=("ORIGINAL", "CONVERTED"),
        help="OUT and --source are adapters: the base they belong to, its original checkpoint and its conversion",
    )
    source_args(ve, converting=False)

    pl = sub.add_parser(
        "plan",
        help="dry run: plan and check on metadata only; writes nothing",
        description="Plan a conversion from tensor names, shapes and dtypes alone and check it "
        "against the target model. Hub safetensors are read by header only.",
    )
    pl.add_argument(
        "rules",
        nargs="?",
        metavar="RULE",
        help="a rule file or a shipped rule's name (default: the one that fits --source)",
    )
    source_args(pl)
    pl.add_argument("--to", metavar="TARGET", help=TO_HELP)
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON document")
    pl.add_argument("--quiet", action="store_true", help="no notes (warnings and errors still show)")

    a = sub.add_parser(
        "apply",
        help="convert: write a from_pretrained-ready folder",
        description="Convert one or more rule files. The output is written to a temporary sibling "
        "folder and renamed into place when complete: on any failure nothing is left "
        "at --out.",
    )
    a.add_argument(
        "rules",
        nargs="*",
        metavar="RULE",
        help="rule files or shipped rules' names; several give one folder each (default: the one that fits "
        "--source, see detect)",
    )
    a.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (must be empty or new)")
    source_args(a)
    a.add_argument("--to", metavar="TARGET", help=TO_HELP)
    a.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="where tensors that change are computed: cpu, cuda or cuda:N (default: cpu)",
    )
    a.add_argument(
        "--max-shard-size",
        type=_parse_size,
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard (default 5GB)",
    )
    a.add_argument("--format", choices=["safetensors", "bin"], help="output format (default: the rule's)")
    a.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    a.add_argument(
        "--fsync",
        action="store_true",
        help="flush the output to disk before publishing it, so it survives a power loss (slower)",
    )
    a.add_argument(
        "--verify",
        nargs="?",
        type=float,
        const=1e-4,
        metavar="TOL",
        help="before publishing, prove the output by its function (see `verify`); on failure nothing is written",
    )
    a.add_argument(
        "--require-tokenizer",
        action="store_true",
        help="fail, writing nothing, when the output would have no tokenizer files (default: a warning)",
    )
    a.add_argument("--quiet", action="store_true", help="no progress bars or notes (warnings still show)")
    return p


def _print_table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, two spaces apart; the last one is left as it is."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip())


def _print_diagnostics(diags: Sequence[Diagnostic]) -> None:
    for d in diags:
        print(f"error: {d}" if d.file is None else str(d), file=sys.stderr)


def _schema(output: Path | None) -> int:
    from phi_rules.language.document import SCHEMA_PATH

    text = SCHEMA_PATH.read_text(encoding="utf-8")
    if output is None:
        print(text, end="")
        return 0
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PhiRulesError(f"{output}: cannot write the schema: {exc.strerror or exc}") from None
    return 0


def _validate(args: argparse.Namespace) -> int:
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


def _shown(path: Path) -> str:
    """A shipped file as the user can open it: relative to here inside a clone, else its installed path."""
    real = path.resolve()
    return str(real.relative_to(Path.cwd())) if real.is_relative_to(Path.cwd()) else str(real)


def _backward(row: dict[str, str | None]) -> str:
    """The list's backward column: the derived rule's name, or why the rule runs one way only."""
    if row.get("one_way"):
        return f"no: {row['one_way']}"
    return "derived" if row.get("derived_from") else ("-" if row["name"] is None else "yes")


def _list(as_json: bool) -> int:
    from phi_rules.language.document import RULES_DIR, LoadError, load_document
    from phi_rules.language.reverse import one_way
    from phi_rules.language.rules import load_rules, rule_files

    rows = []
    for f in rule_files([RULES_DIR]):
        row: dict[str, str | None] = {"name": None, "layout": None, "file": _shown(f), "description": ""}
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
                    row = {"name": b.name, "layout": b.layout or None, "file": _shown(f), "description": described}
                    row["derived_from"] = r.name
        except (PhiRulesError, LoadError) as exc:
            row["description"] = f"(invalid: {exc.diagnostics[0].message})"
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        (str(r["name"] or "-"), str(r["layout"] or "-"), str(r["file"]), _backward(r), str(r["description"]))
        for r in rows
    ]
    _print_table(("name", "layout", "file", "backward", "description"), table)
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


def _note(quiet: bool) -> Callable[[str], None]:
    return (lambda _m: None) if quiet else (lambda m: print(f"note: {m}", file=sys.stderr))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Library warnings (toy token ids, the hub client's retry chatter) would bury our one-line errors.

    Set through the environment, which both libraries read when they are imported (later, lazily).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")


def _short(reason: str) -> str:
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _detect(args: argparse.Namespace) -> int:
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
            _short(f.reason),
        )
        for f in fits
    ]
    _print_table(("rule", "layout", "target", "fits", "why not"), rows)
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


def _verify(args: argparse.Namespace) -> int:
    from phi_rules.source.resolve import resolve
    from phi_rules.verify import failure, layer_rows, verify

    _quiet_libraries()
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
        _print_diagnostics(problem.diagnostics)
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


def _plan(args: argparse.Namespace) -> int:
    from phi_rules import pipeline

    _quiet_libraries()
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
    result = pipeline.plan(rules, _options(args), note=_note(args.json or args.quiet))
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
        for t in result.tensors
    ]
    _print_table(("output", "shape", "dtype", "<- source", "ops", "bytes", "steps"), rows)
    print(
        f"\n{result.rules.name}: {len(result.tensors)} tensors, {result.total_bytes / 1e9:.3f} GB, "
        f"{result.rules.target.architecture} with {json.dumps(result.config)}"
    )
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _progress_factory(quiet: bool) -> Callable[[Any], Callable[[int], None]]:
    """A byte-counting progress bar per rule, on a terminal only."""
    if quiet or not sys.stderr.isatty():
        return lambda _plan: lambda _n: None
    from tqdm import tqdm

    def factory(plan: Any) -> Callable[[int], None]:
        bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc=plan.rules.name, file=sys.stderr)

        def update(n: int) -> None:
            bar.update(n)
            if bar.total is not None and bar.n >= bar.total:
                bar.close()

        return update

    return factory


def _apply(args: argparse.Namespace) -> int:
    from phi_rules import pipeline

    _quiet_libraries()
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
        _note(args.quiet)(said + "".join(f", then rule {n.name} ({n.display}) {n.target.layout}" for n in chain[1:]))
        runs = [(chain, args.out)]
    options = _options(args)
    for chain, out in runs:
        result = pipeline.convert_through(
            chain, out, options, note=_note(args.quiet), warn=_warn, progress=_progress_factory(args.quiet)
        )
        if not args.quiet:
            last = chain[-1].target
            what = last.architecture if len(chain) == 1 else last.layout  # a route ends in a layout
            print(f"{out}: {what}, {len(result.tensors)} tensors, {_human(result.total_bytes)}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "apply" and len(args.rules) > 1 and args.source is not None:
        parser.error("--source takes one rule file, not several")
    if args.command == "verify" and args.source is None:
        parser.error("verify needs --source: the original checkpoint the output was converted from")
    if args.command in ("apply", "plan") and not args.rules and args.source is None:
        parser.error("give a rule file, or --source to find the rule that fits it")
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "schema":
            return _schema(args.output)
        if args.command == "list":
            return _list(args.json)
        if args.command == "detect":
            return _detect(args)
        if args.command == "verify":
            return _verify(args)
        return _plan(args) if args.command == "plan" else _apply(args)
    except PhiRulesError as exc:
        _print_diagnostics(exc.diagnostics)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `phi-rules plan … | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug, not bad input: still one line, the traceback only on request
        if args.debug:
            raise
        reason = " ".join(str(exc).split())[:300]
        print(
            f"error: internal error ({type(exc).__name__}: {reason}); rerun with --debug to report it", file=sys.stderr
        )
        return 1


def run() -> NoReturn:
    """The ``phi-rules`` command: ``main``, then an exit that skips the interpreter's teardown. Once torch and
    transformers are loaded, tearing their modules down takes 0.6 s of a 4 s conversion, and there is nothing
    left for it to do: every file is closed and renamed by then; only the standard streams need a flush."""
    try:
        code = main()
    except KeyboardInterrupt:  # while the parser is being built, before main's own handling starts
        print("interrupted: nothing was written", file=sys.stderr)
        code = 130
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a reader that went away (`phi-rules plan … | head`)
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
