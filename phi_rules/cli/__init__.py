"""``phi-rules``: validate, plan and apply rule files. The only place that prints or exits: the parser
(:mod:`.parser`), the commands that run the stages (:mod:`.commands`) and how they show things (:mod:`.show`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from phi_rules.cli import show
from phi_rules.cli.parser import build
from phi_rules.errors import PhiRulesError


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, refuse what argparse cannot (combinations of options), run the command: any error is one line."""
    parser = build()
    args = parser.parse_args(argv)
    if args.command == "apply" and len(args.rules) > 1 and args.source is not None:
        parser.error("--source takes one rule file, not several")
    if args.command == "verify" and args.source is None:
        parser.error("verify needs --source: the original checkpoint the output was converted from")
    if args.command in ("apply", "plan") and not args.rules and args.source is None:
        parser.error("give a rule file, or --source to find the rule that fits it")
    try:
        from phi_rules.cli import commands

        command: dict[str, Callable[[argparse.Namespace], int]] = {
            "validate": commands.validate_command,
            "schema": commands.schema_command,
            "list": commands.list_command,
            "detect": commands.detect_command,
            "verify": commands.verify_command,
            "check": commands.check_command,
            "plan": commands.plan_command,
            "apply": commands.apply_command,
        }
        return command[args.command](args)
    except PhiRulesError as exc:
        show.diagnostics(exc.diagnostics)
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
