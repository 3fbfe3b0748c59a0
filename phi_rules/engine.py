"""The torch side of a conversion: plan on metadata, check against the target, write the output.

Imported by :mod:`phi_rules.pipeline` only once the source is resolved and its hashing has
started, so that the second or so spent importing torch and transformers overlaps with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phi_rules import target
from phi_rules.checkpoint import Checkpoint
from phi_rules.errors import PhiRulesError
from phi_rules.execute import Executor, byte_segments
from phi_rules.planner import FLOAT_DTYPES, Plan, make_plan
from phi_rules.rules import Rules
from phi_rules.safetensors_header import TensorInfo
from phi_rules.sources import Hasher, ResolvedSource, remote_tensors, resolve
from phi_rules.writer import SafetensorsWriter

if TYPE_CHECKING:
    from phi_rules.pipeline import Options

Progress = Callable[[int], None]


def checked(plan: Plan, dtype: str | None) -> object:
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


def _planned(
    rules: Rules, tensors: Mapping[str, TensorInfo], resolved: ResolvedSource, options: Options
) -> tuple[Plan, object]:
    """The checked plan and the target config it was checked with (its dtype: the output's, if uniform)."""
    result = make_plan(rules, tensors, resolved.config(), options.overrides, options.dtype)
    floats = {t.dtype for t in result.tensors if t.dtype in FLOAT_DTYPES}
    return result, checked(result, floats.pop() if len(floats) == 1 else None)


def plan(rules: Rules, options: Options, note: Callable[[str], None]) -> Plan:
    """Plan and check without writing anything; hub safetensors are read by header only."""
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
    return _planned(rules, tensors, resolved, options)[0]


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
) -> None:
    device = torch.device(options.device)
    executor = Executor(ckpt, result.tensors, device)
    fmt = options.format or result.rules.target.format
    if fmt == "bin":
        state = {}
        for t in result.tensors:
            state[t.name] = executor.tensor(t)
            progress(t.nbytes)
        torch.save(state, folder / "pytorch_model.bin")
        hasher.cancel()  # a .bin has no metadata to record them in
        return
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
        writer.finish(_metadata(result.rules, resolved, hasher.result()))
    finally:
        writer.close()


def _write_configs(folder: Path, result: Plan, config: object) -> None:
    from transformers import GenerationConfig

    target.write_config(result, config, folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)  # type: ignore[arg-type]


def write(
    tmp: Path,
    rules: Rules,
    resolved: ResolvedSource,
    options: Options,
    hasher: Hasher,
    progress: Callable[[Plan], Progress],
) -> Plan:
    """Plan, check and write everything into ``tmp``; raises before writing if any check fails."""
    with Checkpoint(resolved.weights) as ckpt:
        result, config = _planned(rules, ckpt.tensors, resolved, options)
        _write_weights(tmp, result, ckpt, options, resolved, hasher, progress(result))
        _write_configs(tmp, result, config)
    return result
