"""Write the output folder's files: weights streamed into safetensors (or one .bin), then the configs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.language.ops import Segment
from phi_rules.language.rules import Rules
from phi_rules.options import Options
from phi_rules.planning.planner import Plan, PlannedTensor
from phi_rules.planning.segments import source_segments
from phi_rules.source.checkpoint import Checkpoint
from phi_rules.source.digest import Hasher
from phi_rules.source.resolve import ResolvedSource
from phi_rules.write import stream
from phi_rules.write.safetensors import SafetensorsWriter
from phi_rules.write.stream import Progress

if TYPE_CHECKING:  # torch is imported only when a tensor's bytes change: byte copies need none
    import torch

    from phi_rules.write.execute import Executor


def _metadata(rules: Rules, resolved: ResolvedSource, hashes: Mapping[str, str]) -> dict[str, str]:
    return {
        "format": "pt",
        "phi_rules.rule": rules.name,
        "phi_rules.rule_sha256": rules.sha256,
        "phi_rules.source": resolved.origin,
        "phi_rules.source_revision": resolved.revision or "",
        "phi_rules.source_sha256": json.dumps(dict(hashes), sort_keys=True),
    }


def weights_format(rules: Rules, options: Options) -> str:
    """``safetensors`` or ``bin``: the option wins over the rule."""
    return options.format or rules.target.format


def write_weights(
    folder: Path,
    result: Plan,
    ckpt: Checkpoint,
    options: Options,
    resolved: ResolvedSource,
    hasher: Hasher,
    progress: Progress,
) -> None:
    if weights_format(result.rules, options) == "bin":
        import torch

        executor = _executor(ckpt, result, options)
        state = {}
        for t in result.tensors:
            state[t.name] = executor.tensor(t)
            progress(t.nbytes)
        torch.save(state, folder / "pytorch_model.bin")
        hasher.result()  # the pins, checked (a .bin has no metadata to record the digests in)
        return
    placeholder = {p.name: "0" * 64 for p in resolved.weights}
    single = "adapter_model.safetensors" if result.adapter_config is not None else None
    writer = SafetensorsWriter(
        folder, result.tensors, options.max_shard_bytes, _metadata(result.rules, resolved, placeholder), single
    )
    try:
        moves: list[tuple[PlannedTensor, list[Segment], str]] = []
        computed: list[PlannedTensor] = []
        for t in writer.order():
            got = source_segments(t.value)
            if got is None or (got[1] != t.dtype and options.device != "cpu"):  # casts on --device as asked
                computed.append(t)
            else:
                moves.append((t, *got))
        runs = writer.runs(sorted(moves, key=_source_order))
        stream.copy([r for r in runs if r.dtype == r.to], ckpt.fd, writer.fds, progress)
        casts = [r for r in runs if r.dtype != r.to]
        if casts:
            stream.cast(casts, ckpt.fd, writer.fds, progress)
        if computed:
            _write_computed(writer, computed, _executor(ckpt, result, options), progress)
        writer.finish(_metadata(result.rules, resolved, hasher.result()))
    finally:
        writer.close()


def write_parts(
    folder: Path,
    result: Plan,
    ckpt: Checkpoint,
    options: Options,
    resolved: ResolvedSource,
    hasher: Hasher,
    progress: Progress,
) -> None:
    """Each part of the plan (``target.parts``) into its sub-folder: a PEFT adapter's weights and config."""
    for part in result.parts:
        sub = folder / part.name
        sub.mkdir()
        planned = replace(result, tensors=part.tensors, adapter_config=part.adapter_config, parts=[])
        write_weights(sub, planned, ckpt, replace(options, format="safetensors"), resolved, hasher, progress)
        (sub / "adapter_config.json").write_text(json.dumps(part.adapter_config, indent=2, sort_keys=True) + "\n")


def _source_order(move: tuple[PlannedTensor, list[Segment], str]) -> tuple[str, int]:
    """Bytes move through each source file front to back, as its hash thread reads it: the two share the
    page cache, so every source byte is read from storage once."""
    segments = move[1]
    return (segments[0][0], segments[0][1]) if segments else ("", 0)


def _write_computed(
    writer: SafetensorsWriter, tensors: list[PlannedTensor], executor: Executor, progress: Progress
) -> None:
    """Each tensor computed while the one before it is written; at most two outputs alive at once, besides
    the inputs of the one being computed."""

    def write(t: PlannedTensor, tensor: torch.Tensor) -> None:
        writer.write_tensor(t, tensor)
        progress(t.nbytes)

    stream.pipelined(tensors, lambda _, t: executor.tensor(t), write)


def _executor(ckpt: Checkpoint, result: Plan, options: Options) -> Executor:
    import torch

    from phi_rules.write.execute import Executor

    return Executor(ckpt, result.tensors, torch.device(options.device))


def write_config(folder: Path, result: Plan, config: Any) -> None:
    """config.json and generation_config.json; for an adapter, its rewritten adapter_config.json alone."""
    if result.adapter_config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(result.adapter_config, indent=2, sort_keys=True) + "\n")
        return
    if isinstance(config, dict):  # a remote-code target: the values as they are
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return
    from transformers import GenerationConfig

    from phi_rules.write import config as config_file

    config_file.write_config(result, config, folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
