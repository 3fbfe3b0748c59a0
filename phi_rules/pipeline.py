"""The pipeline, stage by stage: rules → source → plan on metadata → check → execute → write.

``plan`` and ``convert`` are the Python API behind ``phi-rules plan`` and ``phi-rules apply``.
Output is written into a temporary sibling folder and renamed into place only when complete, so
that an error, Ctrl-C or kill leaves nothing at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import torch

from phi_rules import target
from phi_rules.checkpoint import Checkpoint
from phi_rules.errors import PhiRulesError
from phi_rules.execute import Executor, byte_segments
from phi_rules.expr import Value
from phi_rules.plan import Plan, make_plan
from phi_rules.rules import Rules
from phi_rules.sources import Hasher, ResolvedSource, SourceOptions, remote_tensors, resolve, verify_pins
from phi_rules.writer import SafetensorsWriter

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


def _checked(plan: Plan, dtype: str | None) -> object:
    """Run the target checks and raise every problem of the plan at once; returns the built config."""
    problems = list(plan.problems)
    try:
        config = target.build_config(plan, dtype)
    except PhiRulesError as exc:
        raise PhiRulesError(problems + exc.diagnostics) from None
    if plan.rules.target.check:
        expected = target.expected_parameters(plan, config)
        already = target.already_converted(plan, expected)
        if already:  # every other problem is a consequence of that
            problems = [already]
        elif all(p.code == "unconsumed" for p in problems):  # a failed step would only cascade here
            problems += target.check_against_target(plan, expected)
    if problems:
        raise PhiRulesError(problems)
    return config


def _output_dtype(plan: Plan) -> str | None:
    floats = {t.dtype for t in plan.tensors if t.dtype in ("float32", "float16", "bfloat16", "float64")}
    return floats.pop() if len(floats) == 1 else None


def plan(rules: Rules, options: Options | None = None, note: Callable[[str], None] = lambda _: None) -> Plan:
    """Plan and check a conversion without writing anything; hub safetensors are read by header only."""
    options = options or Options()
    remote = options.source.source is None and rules.source.path is None
    if remote:
        tensors, resolved = remote_tensors(rules, options.source, note)
        with Checkpoint(resolved.weights) as local:
            tensors = {**tensors, **local.tensors}
    else:
        resolved = resolve(rules, options.source)
        with Checkpoint(resolved.weights) as ckpt:
            tensors = dict(ckpt.tensors)
    for n in resolved.notes:
        note(n)
    result = make_plan(rules, tensors, resolved.config(), options.overrides, options.dtype)
    _checked(result, _output_dtype(result))
    return result


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


def _metadata(rules: Rules, resolved: ResolvedSource, hashes: Mapping[str, str]) -> dict[str, str]:
    return {
        "format": "pt",
        "phi_rules.rule": rules.name,
        "phi_rules.rule_sha256": rules.sha256,
        "phi_rules.source": resolved.origin,
        "phi_rules.source_revision": resolved.revision or "",
        "phi_rules.source_sha256": json.dumps(dict(hashes), sort_keys=True),
    }


def _write_weights(
    folder: Path,
    result: Plan,
    ckpt: Checkpoint,
    options: Options,
    resolved: ResolvedSource,
    hasher: Hasher,
    progress: Progress,
) -> dict[str, str]:
    device = torch.device(options.device)
    executor = Executor(ckpt, result.tensors, device)
    fmt = options.format or result.rules.target.format
    if fmt == "bin":
        state = {}
        for t in result.tensors:
            state[t.name] = executor.tensor(t)
            progress(t.nbytes)
        torch.save(state, folder / "pytorch_model.bin")
        return hasher.result()
    placeholder = {p.name: "0" * 64 for p in resolved.weights}
    writer = SafetensorsWriter(
        folder, result.tensors, options.max_shard_bytes, _metadata(result.rules, resolved, placeholder)
    )
    try:
        for t in writer.order():
            segments = byte_segments(t.value, t.dtype)
            if segments is not None:
                writer.copy_segments(t, segments, ckpt.fd)
            else:
                writer.write_tensor(t, executor.tensor(t))
            progress(t.nbytes)
        hashes = hasher.result()
        writer.finish(_metadata(result.rules, resolved, hashes))
    finally:
        writer.close()
    return hashes


def _write_configs(folder: Path, result: Plan, config: object) -> None:
    from transformers import GenerationConfig

    config.save_pretrained(folder)  # type: ignore[attr-defined]
    target.check_saved_config(result, folder / "config.json")
    GenerationConfig.from_model_config(config).save_pretrained(folder)  # type: ignore[arg-type]


def convert(
    rules: Rules,
    out: Path | str,
    options: Options | None = None,
    *,
    note: Callable[[str], None] = lambda _: None,
    progress: Callable[[Plan], Progress] = lambda _: lambda _n: None,
) -> Plan:
    """Convert one rule's source into ``out``, a folder ``from_pretrained`` loads; returns the plan used."""
    options = options or Options()
    out = Path(out)
    _prepare_destination(out, options.force)
    resolved = resolve(rules, options.source)
    for n in resolved.notes:
        note(n)
    verify_pins(resolved)
    hasher = Hasher(resolved)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with _terminate_as_interrupt(), Checkpoint(resolved.weights) as ckpt:
            result = make_plan(rules, ckpt.tensors, resolved.config(), options.overrides, options.dtype)
            config = _checked(result, _output_dtype(result))
            _write_weights(tmp, result, ckpt, options, resolved, hasher, progress(result))
            _write_configs(tmp, result, config)
            for extra in resolved.extras:
                shutil.copyfile(extra, tmp / extra.name)
            if options.fsync:
                _flush_to_disk(tmp)
            _commit(tmp, out)
    except BaseException:
        hasher.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
