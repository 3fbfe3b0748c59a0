"""The pipeline, stage by stage: rules → source → plan on metadata → check → execute → write.

``plan`` and ``convert`` are the Python API behind ``phi-rules plan`` and ``phi-rules apply``; each
stage lives in its own package (``language``, ``source``, ``plan``, ``write``) and this module only
runs them in order. Output is written into a temporary sibling folder and renamed into place only
when complete, so that an error, Ctrl-C or kill leaves nothing at the destination. Planning needs
no torch; transformers (for the target check) and torch (for writing) are imported only once the
sources are resolved and their hashing has started, in threads beside the byte copies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from phi_rules.dtypes import FLOAT_DTYPES
from phi_rules.errors import Diagnostic, PhiRulesError
from phi_rules.language.rules import Rule
from phi_rules.options import Options, SourceOptions
from phi_rules.planning import remembered
from phi_rules.planning.planner import Accepted, Plan, make_plan
from phi_rules.source.checkpoint import Checkpoint
from phi_rules.source.digest import Hasher
from phi_rules.source.header import TensorInfo
from phi_rules.source.resolve import NO_TOKENIZER, TOKENIZER_FILES, ResolvedSource, resolve, source_tensors
from phi_rules.write import destination, output
from phi_rules.write.stream import Progress


def target_config(plan: Plan, dtype: str | None) -> Any:
    """The config the target class is built with, once the plan passes the target checks; raises every problem
    of the plan at once."""
    from phi_rules.planning import target

    problems = list(plan.problems)
    try:
        config = target.build_config(plan, dtype)
    except PhiRulesError as exc:
        raise PhiRulesError(problems + exc.diagnostics) from None
    if plan.rules.target.check and plan.adapter_config is not None:
        if not problems:
            problems += target.check_against_target(plan, target.expected_adapter_parameters(plan, config))
    elif plan.rules.target.check:
        expected = target.expected_parameters(plan, config)
        already = None if plan.rules.config_only else target.already_converted(plan, expected.shapes)
        if already:  # every other problem is a consequence of that
            problems = [already]
        elif all(p.code == "unconsumed" for p in problems):  # a failed step would only cascade here
            problems += expected.uses + target.check_against_target(plan, expected.shapes, expected.tied)
            for part in [] if problems else plan.parts:  # each adapter part as PEFT saves it on the target
                shown = replace(plan, tensors=part.tensors, adapter_config=part.adapter_config)
                found = target.check_against_target(shown, target.expected_adapter_parameters(shown, config))
                problems += [replace(p, message=f"part {part.name}, as PEFT reads it: {p.message}") for p in found]
    if problems:
        raise PhiRulesError(problems)
    return config


def _uniform_dtype(plan: Plan) -> str | None:
    """The output's floating dtype when it has one, for the config's ``dtype`` field."""
    floats = {t.dtype for t in plan.tensors if t.dtype in FLOAT_DTYPES}
    return floats.pop() if len(floats) == 1 else None


def _planned(
    rules: Rule, tensors: Mapping[str, TensorInfo], resolved: ResolvedSource, options: Options, made: Plan | None
) -> Plan:
    """plan → blame: the plan (``made`` by detection where nothing given since changes it: no --set, no
    --dtype), a problem that only ``--set`` causes said as such, a missing config file said as the cause, and
    otherwise every problem at once, the target's included. What remains is the check (or its recall) and
    remembering it, which :func:`plan` and :func:`_write_and_check` do."""
    result = made if made is not None and not options.overrides and options.dtype is None else None
    if result is None:
        config, base = resolved.config(), resolved.base()
        result = make_plan(rules, tensors, config, options.overrides, options.dtype, base, options.accept)
    if not result.problems:
        return result
    _blame_overrides(result, tensors, resolved, options)
    if resolved.config_path is None and rules.source.config_file:
        from phi_rules.detect import config_not_found

        raise PhiRulesError(config_not_found(rules, resolved, result.problems[0].message))
    target_config(result, _uniform_dtype(result))  # raises: every problem at once, the target's included
    return result


def _blame_overrides(
    result: Plan, tensors: Mapping[str, TensorInfo], resolved: ResolvedSource, options: Options
) -> None:
    """A problem that only ``--set`` causes is reported as a ``--set`` problem, in one line."""
    if not options.overrides:
        return
    said = [p for p in result.problems if p.code == "set"]
    if said:
        raise PhiRulesError(said)
    plain = make_plan(result.rules, tensors, resolved.config(), {}, options.dtype, resolved.base(), options.accept)
    if not plain.problems:
        given = " ".join(f"{k}={v}" for k, v in options.overrides.items())
        raise PhiRulesError(f"--set {given}: the conversion does not fit with it: {result.problems[0]}")


def plan(rules: Rule, options: Options | None = None, note: Callable[[str], None] = lambda _: None) -> Plan:
    """Plan and check a conversion without writing anything; hub safetensors are read by header only."""
    options = options or Options()
    _refuse_converted(rules, options)
    tensors, resolved = source_tensors(rules, options.source, note)
    for n in resolved.notes:
        note(n)
    result = _planned(rules, tensors, resolved, options, None)
    for n in result.notes:
        note(n)
    dtype = _uniform_dtype(result)
    if remembered.recall(remembered.key(result, dtype)) is None:
        target_config(result, dtype)
    return result


def _write_and_check(result: Plan, folder: Path, write: Callable[[], None]) -> None:
    """Move the bytes at once (``write``) while a second thread imports transformers, checks the plan against
    the target class and then writes the config files; a failed check still fails the conversion (the caller
    removes the folder). A check that passed for an identical plan writes its files again and imports
    nothing (see :mod:`phi_rules.planning.remembered`)."""
    dtype = _uniform_dtype(result)
    check = remembered.key(result, dtype)
    files = remembered.recall(check)
    if files is not None:
        write()
        for name, text in files.items():
            (folder / name).write_text(text)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phi-rules-check")
    try:
        job = pool.submit(target_config, result, dtype)
        write()
        config = job.result()
    finally:  # on Ctrl-C or an error, no waiting for the import to finish: the CLI exits without joining it
        pool.shutdown(wait=False, cancel_futures=True)
    output.write_config(folder, result, config)
    remembered.remember(check, folder)


def _say_accepted(result: Plan, options: Options, warn: Callable[[str], None]) -> None:
    """Each accepted refusal in one line, before anything is written; the output's safetensors metadata records
    it (a .bin has none: refused)."""
    if result.accepted and output.weights_format(result.rules, options) != "safetensors":
        raise PhiRulesError(
            "--accept: the output records what it accepts in its safetensors metadata: drop --format bin"
        )
    for accepted in result.accepted:
        warn(accepted.said())


def check_function(
    rules: Rule,
    resolved: ResolvedSource,
    folder: Path,
    tol: float,
    shown: Path,
    accepted: Sequence[Accepted] = (),
    warn: Callable[[str], None] = lambda _: None,
) -> Any:
    """``verify`` on a folder (up to the length an accepted refusal leaves exact); raises its one-line error when a
    part diverges, else returns the report; a source no reference can run is said in one line (``warn``): its
    names and shapes were checked, not its function."""
    from phi_rules.verify import failure, verify

    if rules.target.adapter is not None:
        raise PhiRulesError(
            f"{shown}: --verify proves models; an adapter is proven on its base: phi-rules verify --source ADAPTER "
            f"{shown} --base ORIGINAL_BASE CONVERTED_BASE"
        )
    max_length = min((a.exact_up_to for a in accepted), default=None)
    report = verify(resolved.weights, rules.layout, resolved.config(), folder, tol, max_length=max_length)
    problem = failure(shown, report)
    if problem is not None:
        raise problem
    if report.checked:  # a source no reference runs: what was checked instead
        warn(f"{shown}: --verify: {report.checked}")
    return report


def _refuse_converted(rules: Rule, options: Options) -> None:
    """A rule for today's layout exists to be detected, not applied."""
    if rules.converted:
        from phi_rules.detect import already_converted

        raise PhiRulesError(already_converted(options.source.source or rules.display, rules))


@contextlib.contextmanager
def _interruptible() -> Iterator[threading.Event]:
    """SIGTERM unwinds like Ctrl-C, so the temporary folder is removed; and either signal is remembered.

    CPython swallows a KeyboardInterrupt that lands while a finalizer or callback runs ("Exception ignored
    in …"); the conversion would then go on and publish. The event it sets is checked before publishing."""
    seen = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.set()
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        yield seen
        return
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
    rules: Rule,
    out: Path | str,
    options: Options | None = None,
    *,
    note: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = lambda _: None,
    progress: Callable[[Plan], Progress] = lambda _: lambda _n: None,
) -> Plan:
    """Convert one rule's source into ``out``, a folder ``from_pretrained`` loads; returns the plan used."""
    return convert_through([rules], out, options, note=note, warn=warn, progress=progress)


def convert_through(
    chain: list[Rule],
    out: Path | str,
    options: Options | None = None,
    *,
    note: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = lambda _: None,
    progress: Callable[[Plan], Progress] = lambda _: lambda _n: None,
    found: tuple[ResolvedSource, Plan | None] | None = None,
) -> Plan:
    """Run rules in a row (phi-msft to today's Phi, then to transformers-4.36): each but the last writes a
    folder inside a temporary one beside ``out`` (removed at the end, or by the next run after a kill) that the
    next reads; the last writes ``out``. Returns the last plan. One rule is a plain conversion. ``found``: the
    first rule's source as detection resolved it, and the plan it made there (none is made or resolved again)."""
    if not chain:
        raise PhiRulesError("no rules to run")
    options = options or Options()
    _refuse_converted(chain[0], options)
    if options.verify is not None and len(chain) > 1:
        raise PhiRulesError("--verify proves one rule's output against its source: apply the rules one at a time")
    out = destination.absolute(Path(out))
    destination.refuse_overlap(out, _given_sources(chain[0], options))
    with destination.locked(out):
        destination.clear_stale(out, note)
        if len(chain) == 1:
            return _convert(chain[0], out, options, note, warn, progress, found)
        scratch = destination.temporary(out)
        try:
            step, said = replace(options, force=False, format=None), note
            for rules in chain[:-1]:
                folder = scratch / rules.name
                _convert(rules, folder, step, said, lambda _: None, progress, found)
                found = None
                said = lambda _: None  # noqa: E731 - what later steps would note is about the scratch folder
                read = SourceOptions(source=folder, cache_dir=options.source.cache_dir, offline=True)
                step = replace(options, source=read, overrides={}, accept=(), dtype=None, force=False, format=None)
            last = replace(step, force=options.force, format=options.format)
            return _convert(chain[-1], out, last, said, warn, progress, None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _beside(options: Options) -> list[str]:
    """The names of a local source folder's files: what an earlier output of it may hold besides ours."""
    folder = options.source.source
    return [p.name for p in folder.iterdir()] if folder is not None and folder.is_dir() else []


def _given_sources(rules: Rule, options: Options) -> list[Path]:
    """The local paths a conversion reads, before any resolution: each named folder with what lies in it
    (the files of an HF cache snapshot are links into its blobs folder)."""
    src = options.source
    named = [src.source, rules.source.path if src.source is None and src.hub is None else None]
    if src.tokenizer is not None:
        named.append(Path(src.tokenizer))
    paths = [p for p in named if p is not None and p.exists()]
    return paths + [f for p in paths if p.is_dir() for f in p.iterdir()]


def _check_whole(
    rules: Rule, resolved: ResolvedSource, tmp: Path, out: Path, options: Options, warn: Callable[[str], None]
) -> None:
    """The whole-folder checks (:mod:`phi_rules.check`): what the conversion broke refuses the output, what the
    source itself has is a warning."""
    from phi_rules import check

    if rules.target.adapter is not None:  # an adapter has no config.json or tokenizer of its own to check
        return
    source = {p.name: p for p in (*resolved.weights, *resolved.extras)}
    if resolved.config_path is not None:
        source["config.json"] = resolved.config_path
    defaults = rules.source.config_defaults
    refused, own = check.before_publishing(source, check.folder_files(tmp), options.overrides, defaults)
    for f in own:
        warn(f"{resolved.origin}: the source itself: {f}")
    if refused:
        raise PhiRulesError([Diagnostic(f"{out}: not written: {'; '.join(map(str, refused))}", code="check")])


def _convert(
    rules: Rule,
    out: Path,
    options: Options,
    note: Callable[[str], None],
    warn: Callable[[str], None],
    progress: Callable[[Plan], Progress],
    found: tuple[ResolvedSource, Plan | None] | None,
) -> Plan:
    """One rule, top to bottom: the destination, the source (resolved, or as detection found it), the plan and
    its problems, then the bytes beside the target check, verify, and the rename that publishes."""
    carried = [*(f.name for f in rules.source.extra_files), *TOKENIZER_FILES, *_beside(options)]
    destination.prepare(out, options.force, carried, [p.name for p in rules.target.parts])
    _check_device(options.device)
    resolved, made = found if found is not None else (resolve(rules, options.source), None)
    files = [*resolved.weights, *resolved.extras, *([resolved.config_path] if resolved.config_path else [])]
    destination.refuse_overlap(out, [*files, *(p.parent for p in files)])  # hub snapshots and their blobs
    for n in resolved.notes:
        note(n)
    tokenizer = resolved.has_tokenizer() or rules.target.adapter is not None  # an adapter uses its base's
    if not tokenizer and (options.require_tokenizer or rules.target.require_tokenizer):
        raise PhiRulesError(f"{out}: not written: {NO_TOKENIZER}")
    records = output.weights_format(rules, options) == "safetensors"  # a .bin has no metadata for them
    hashed = [w for w in resolved.weights if records or w in resolved.pins]
    hasher = Hasher(hashed, resolved.pins)  # hashes in the background from here on, pins checked at the end
    tmp = destination.temporary(out)
    try:
        with _interruptible() as interrupted, Checkpoint(resolved.weights, resolved.prefixes) as ckpt:
            result = _planned(rules, ckpt.tensors, resolved, options, made)  # nothing written on a problem
            _say_accepted(result, options, warn)
            shown = progress(result)
            for n in result.notes:
                note(n)

            def write() -> None:
                output.write_weights(tmp, result, ckpt, options, resolved, hasher, shown)
                output.write_parts(tmp, result, ckpt, options, resolved, hasher, shown)

            _write_and_check(result, tmp, write)
            if options.verify is not None:
                check_function(rules, resolved, tmp, options.verify, out, result.accepted, warn)
            output.write_side_files(tmp, result, resolved, note)
            _check_whole(rules, resolved, tmp, out, options, warn)
            if options.fsync:
                _flush_to_disk(tmp)
            if interrupted.is_set():  # an interrupt whose exception something swallowed: still nothing published
                raise KeyboardInterrupt("interrupted")
            destination.commit(tmp, out)
    except BaseException as exc:
        corrupt = hasher.mismatch() if isinstance(exc, PhiRulesError) else None
        hasher.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        if corrupt is not None:
            raise corrupt from None
        if isinstance(exc, OSError):  # a full disk, a file too large, a folder that vanished
            raise PhiRulesError(f"{exc.filename or out}: cannot write the output: {exc.strerror or exc}") from None
        raise
    if not tokenizer:
        warn(f"{out}: {NO_TOKENIZER}")
    return result
