"""The pipeline, stage by stage: rules → source → plan on metadata → check → execute → write.

``plan`` and ``convert`` are the Python API behind ``phi-rules plan`` and ``phi-rules apply``.
Output is written into a temporary sibling folder and renamed into place only when complete, so
that an error, Ctrl-C or kill leaves nothing at the destination. This module stays free of torch:
sources are resolved and their hashing started before :mod:`phi_rules.engine` is imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from phi_rules.errors import PhiRulesError
from phi_rules.expr import Value
from phi_rules.rules import Rules
from phi_rules.sources import NO_TOKENIZER, Hasher, SourceOptions, resolve

if TYPE_CHECKING:
    from phi_rules.planner import Plan

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Options:
    """Everything ``apply`` can be told besides the rule file."""

    source: SourceOptions = field(default_factory=SourceOptions)
    overrides: Mapping[str, Value] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str | None = None
    max_shard_bytes: int = 5 * 10**9
    format: str | None = None
    force: bool = False
    fsync: bool = False
    require_tokenizer: bool = False


def plan(rules: Rules, options: Options | None = None, note: Callable[[str], None] = lambda _: None) -> Plan:
    """Plan and check a conversion without writing anything; hub safetensors are read by header only."""
    from phi_rules import engine

    return engine.plan(rules, options or Options(), note)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C so the temporary folder is removed."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PhiRulesError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PhiRulesError(f"{out}: folder exists and is not empty (use --force to replace it)")


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one (with --force) is removed only afterwards."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _flush_to_disk(folder: Path) -> None:
    """fsync every file and the folder, so the rename publishes data that survives a power loss."""
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_device(device: str) -> None:
    """Fail before any download or work; torch is imported early only for a GPU device."""
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise PhiRulesError(f"--device {device}: CUDA is not available on this machine")


def convert(
    rules: Rules,
    out: Path | str,
    options: Options | None = None,
    *,
    note: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = lambda _: None,
    progress: Callable[[Plan], Progress] = lambda _: lambda _n: None,
) -> Plan:
    """Convert one rule's source into ``out``, a folder ``from_pretrained`` loads; returns the plan used."""
    options = options or Options()
    out = Path(out)
    _prepare_destination(out, options.force)
    _check_device(options.device)
    resolved = resolve(rules, options.source)
    for n in resolved.notes:
        note(n)
    tokenizer = resolved.has_tokenizer()
    if not tokenizer and (options.require_tokenizer or rules.target.require_tokenizer):
        raise PhiRulesError(f"{out}: not written: {NO_TOKENIZER}")
    hasher = Hasher(resolved)  # checks pins, then hashes in the background from here on
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with _terminate_as_interrupt():
            from phi_rules import engine  # torch and transformers load while the sources hash

            result = engine.write(tmp, rules, resolved, options, hasher, progress)
            for extra in resolved.extras:
                shutil.copyfile(extra, tmp / extra.name)
            if options.fsync:
                _flush_to_disk(tmp)
            _commit(tmp, out)
    except BaseException:
        hasher.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not tokenizer:
        warn(f"{out}: {NO_TOKENIZER}")
    return result
