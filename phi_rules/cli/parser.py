"""The ``phi-rules`` argument parser: one function per command, so each command's options read together."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from phi_rules.language.expr import unfit

if TYPE_CHECKING:
    _Commands = argparse._SubParsersAction[argparse.ArgumentParser]

EPILOG = """\
examples:
  phi-rules apply --source ./my-phi-checkpoint --out converted    the layout is detected: no rule to pick
  phi-rules apply --source someone/phi-2-finetune@abc123 --out converted        a hub repository
  phi-rules detect ./my-phi-checkpoint          which rule fits, and why the others do not
  phi-rules apply --source ./phi-4 --to llama --out phi-4-llama     Phi-3/Phi-4 to Llama (or mistral)
  phi-rules apply --source ./phi-4-llama --to phi3 --out phi-4      and back
  phi-rules apply --source ./my-llama-lora --to phi3 --base ./phi-4-llama --out my-lora    an adapter, fused
  phi-rules verify --source ./my-phi-checkpoint converted         prove the output by its function
  phi-rules check ./any-model-folder            stop ids, long-context fields, tokenizer size, head_dim
  phi-rules apply phi-2 --out phi-2             a shipped rule by name: download at the pinned revision
  phi-rules plan phi-2 --source ./ckpt          dry run: what would be written, from headers only
  phi-rules validate rules/                     check every rule file (CI and pre-commit do this)
  phi-rules list                                shipped rules: name, layout, file, description

exit status: 0 success, 1 a problem with the rules, the source or the conversion, 2 bad usage.
A rule file is YAML checked against `phi-rules schema`; docs/reference/rule-language.md documents every key.
environment: HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE as huggingface_hub reads them;
PHI_RULES_CACHE, where source sha256s (by file identity), passed target checks and rule documents that passed
the schema are remembered (empty: nothing is; everything is worked out every run).
"""


TO_HELP = (
    "what to write, when the source's layout converts to several: a model type (llama, mistral, phi3, phi) or a "
    "layout name; a refused target says why in one line"
)


RULES_HELP = "one more candidate: a rule file or a shipped rule's name (repeat the option for several)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("phi-rules")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``, looked up only when asked: importing importlib.metadata costs every command 0.1 s."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _set_value(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:  # not JSON (or more digits than Python reads): plain text
        return key, raw
    why = unfit(value)
    if why is not None:
        raise argparse.ArgumentTypeError(f"{key}={raw[:40]}: {why}")
    return key, value


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


def build() -> argparse.ArgumentParser:
    """The whole parser: the program's own options, then each command's."""
    p = argparse.ArgumentParser(
        prog="phi-rules",
        description="Convert original Microsoft Phi checkpoints (phi-1, phi-1.5, phi-2, fine-tunes and their LoRA "
        "adapters) into Hugging Face transformers models, and move Phi-3/Phi-4 models and adapters between Phi3 and "
        "the Llama/Mistral layouts, exactly or refused with the reason; driven by declarative YAML rule files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_Version, help="show the version and exit")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks (for reporting a bug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in (_validate, _schema, _list, _detect, _verify, _check, _plan, _apply):
        command(sub)
    return p


def _source(q: argparse.ArgumentParser, converting: bool = True) -> None:
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
        help="override a source config field (planning and refusals see it) or a target config value (JSON or "
        "plain text); the output's metadata records it; a name that is neither is refused",
    )
    q.add_argument(
        "--accept",
        action="append",
        default=[],
        metavar="REFUSAL",
        help="convert although the rule's refusal REFUSAL holds (its name, as `detect` and the rule show it), where "
        "the rule says up to what input length the output stays exact: said in one line, recorded in the output, "
        "and `verify` proves that length",
    )
    q.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of written floating-point tensors (default: the rule's target.dtype)",
    )


def _validate(sub: _Commands) -> None:
    """``validate``: rule files and folders, text or JSON."""
    v = sub.add_parser("validate", help="check rule files: YAML, schema and semantics; reports every error")
    v.add_argument("paths", nargs="+", metavar="PATH", help="rule files or folders (searched for *.yaml)")
    v.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text: one `file:line:col: key: message` per line; json: a list of objects",
    )

    v.add_argument("--json", action="store_const", const="json", dest="format", help="the same as --format json")


def _schema(sub: _Commands) -> None:
    """``schema``: the rule files' JSON Schema."""
    sc = sub.add_parser("schema", help="print the JSON Schema of rule files (for editors and CI)")
    sc.add_argument("--output", type=Path, metavar="FILE", help="write it to FILE instead")


def _list(sub: _Commands) -> None:
    """``list``: the shipped rules."""
    li = sub.add_parser("list", help="list the shipped rules: name, layout, file, description")
    li.add_argument("--json", action="store_true", help="print them as one JSON document")


def _detect(sub: _Commands) -> None:
    """``detect``: which rule fits a checkpoint."""
    d = sub.add_parser(
        "detect",
        help="which rule fits a checkpoint: plans every candidate on tensor names and shapes",
        description="Plan every shipped detection candidate (one generic rule per layout, each way) and any "
        "--rules against the source's tensor names and shapes. The answer comes first: the layout found, the "
        "targets it converts to (a refused one with its reason) and the command to run; --all adds the table of "
        "every rule and why it does not fit. Reads no tensor bytes and needs no torch for safetensors. Exit 0 when "
        "there is one command to run (one rule fits, or one per target when the source converts to several, or "
        "your --rules wins) or nothing to do (already in today's layout); 1 when no rule fits, or several fit "
        "one target.",
    )
    d.add_argument(
        "source", type=Path, metavar="SRC", help="a checkpoint folder or weights file, or a hub repo owner/name@rev"
    )
    d.add_argument("--rules", action="append", default=[], metavar="RULE", help=RULES_HELP)
    d.add_argument("--all", action="store_true", help="also show every rule and why it does not fit")
    d.add_argument("--json", action="store_true", help="print the verdicts as one JSON document")
    d.add_argument("--to", metavar="TARGET", help="show only the rules that write TARGET (llama, mistral, phi3, …)")
    d.add_argument("--cache-dir", type=Path, metavar="DIR", help="hub cache (default: HF_HUB_CACHE)")
    d.add_argument("--offline", action="store_true", help="use only the hub cache (like HF_HUB_OFFLINE=1)")
    d.add_argument("--token", help="hub token for private or gated repos")


def _verify(sub: _Commands) -> None:
    """``verify``: a converted folder against the original, by function."""
    ve = sub.add_parser(
        "verify",
        help="prove a conversion by its function: the original architecture vs the converted folder",
        description="Run the original model (the Phi-1/1.5/2 architecture written from its description, or the "
        "transformers class the source's config.json names, or for Phi-4-multimodal's remote code transformers' "
        "native class on its text decoder; sizes from the source's own config.json, never from the rule) and the "
        "converted folder through transformers, on the same token ids, layer by layer in "
        "float32, and compare each layer's contribution and the logits end to end, at 16 tokens and past every "
        "length where either config changes the function (sliding_window, attention_chunk_size, longrope). "
        "Tolerances follow each part's scale and both sides' dtypes. Exit 0 when every part is within "
        "tolerance, 1 naming the first part that diverges.",
    )
    ve.add_argument("out", type=Path, metavar="OUT", help="the converted folder")
    ve.add_argument("--rules", metavar="RULE", help="the rule used, a file or a shipped name (default: detected)")
    ve.add_argument("--tol", type=float, default=1e-4, help="tolerance relative to each part's scale (default 1e-4)")
    ve.add_argument("--json", action="store_true", help="print the comparison as one JSON document")
    ve.add_argument("--quiet", action="store_true", help="no progress bar (a terminal shows one, layer by layer)")
    ve.add_argument(
        "--base",
        nargs=2,
        type=Path,
        metavar=("ORIGINAL", "CONVERTED"),
        help="OUT and --source are adapters: the base they belong to, its original checkpoint and its conversion",
    )
    _source(ve, converting=False)


def _check(sub: _Commands) -> None:
    """``check``: any model folder's side files against its weights and each other."""
    ch = sub.add_parser(
        "check",
        help="check a model folder's generation config, tokenizer, chat template and long-context fields",
        description="Check any model folder (converted by phi-rules or by another tool): eos/bos/pad ids inside "
        "vocab_size, an eos list with the token the chat template ends a turn with, longrope factor lists of "
        "rotary dimensions / 2, original_max_position_embeddings kept, head_dim as the weights use it, a tokenizer "
        "no larger than vocab_size. One line per finding; exit 1 when one would make the model compute or "
        "generate wrongly, 0 otherwise. Reads JSON files and safetensors headers only.",
    )
    ch.add_argument("folder", type=Path, metavar="FOLDER", help="a model folder")
    ch.add_argument("--json", action="store_true", help="print the findings as one JSON document")


def _plan(sub: _Commands) -> None:
    """``plan``: a dry run."""
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
    _source(pl)
    pl.add_argument("--to", metavar="TARGET", help=TO_HELP)
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON document")
    pl.add_argument("--quiet", action="store_true", help="no notes (warnings and errors still show)")


def _apply(sub: _Commands) -> None:
    """``apply``: convert."""
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
    _source(a)
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
