"""Write the output folder's files: weights streamed into safetensors (or one .bin), then the configs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_rules.language.ops import Segment
from phi_rules.language.rules import Rule
from phi_rules.options import Options
from phi_rules.planning.planner import Plan, PlannedTensor
from phi_rules.planning.segments import source_segments
from phi_rules.source.checkpoint import Checkpoint
from phi_rules.source.digest import Hasher
from phi_rules.source.resolve import GENERATION_CONFIG, ResolvedSource
from phi_rules.write import stream
from phi_rules.write.safetensors import SafetensorsWriter
from phi_rules.write.stream import Progress

ACCEPTED = "phi_rules.accepted"  # the safetensors metadata key of the accepted refusals

if TYPE_CHECKING:  # torch is imported only when a tensor's bytes change: byte copies need none
    import torch

    from phi_rules.write.execute import Executor


def _metadata(
    rules: Rule, resolved: ResolvedSource, hashes: Mapping[str, str], said: Mapping[str, str]
) -> dict[str, str]:
    return {
        "format": "pt",
        "phi_rules.rule": rules.name,
        "phi_rules.rule_sha256": rules.sha256,
        "phi_rules.source": resolved.origin,
        "phi_rules.source_revision": resolved.revision or "",
        "phi_rules.source_sha256": json.dumps(dict(hashes), sort_keys=True),
        **said,
    }


def _said(result: Plan, options: Options) -> dict[str, str]:
    """What the user told the conversion besides the rule, recorded with it: ``--set`` values, and each accepted
    refusal with the length up to which the output is exact (``verify`` reads it)."""
    said = {}
    if options.overrides:
        said["phi_rules.set"] = json.dumps(dict(options.overrides), sort_keys=True)
    if result.accepted:
        said[ACCEPTED] = json.dumps(
            [{"refusal": a.name, "exact_up_to": a.exact_up_to, "differs": a.differs} for a in result.accepted]
        )
    return said


def weights_format(rules: Rule, options: Options) -> str:
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
    said = _said(result, options)
    writer = SafetensorsWriter(
        folder, result.tensors, options.max_shard_bytes, _metadata(result.rules, resolved, placeholder, said), single
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
        writer.finish(_metadata(result.rules, resolved, hasher.result(), said))
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
    """config.json; for an adapter, its rewritten adapter_config.json alone. generation_config.json is a side
    file (:func:`write_side_files`): the source's, carried."""
    if result.adapter_config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(result.adapter_config, indent=2, sort_keys=True) + "\n")
        return
    if isinstance(config, dict):  # a remote-code target: the values as they are
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return
    from phi_rules.write import config as config_file

    config_file.write_config(result, config, folder)


def write_side_files(folder: Path, result: Plan, resolved: ResolvedSource, note: Callable[[str], None]) -> None:
    """Everything beside the weights and config.json, byte for byte: the files the rule names, and (for a model)
    the source folder's other files with a note each; then generation_config.json from config.json where the
    source has none. No conversion here changes a token id, so a carried generation_config.json stays exact."""
    for extra in resolved.extras:
        shutil.copyfile(extra, folder / extra.name)
    if result.adapter_config is not None:  # an adapter is loaded onto its base, which has the side files
        return
    for other in resolved.unlisted:
        shutil.copyfile(other, folder / other.name)
        note(f"{other.name}: no rule names it and it is not weights: copied as it is")
    if not (folder / GENERATION_CONFIG).exists() and (folder / "config.json").is_file():
        _write_generation_config(folder)


def _write_generation_config(folder: Path) -> None:
    """generation_config.json for a source that has none, as transformers derives it from config.json (the token
    ids and the version, no torch needed), with the token the chat template ends a turn with among the stop ids:
    an instruct model whose config.json names only its document end would otherwise talk past every answer.
    Here, not beside the config writer, because a remembered check imports neither torch nor transformers."""
    from phi_rules.check import end_of_turn, folder_files

    saved = json.loads((folder / "config.json").read_text())
    fields: dict[str, Any] = {"_from_model_config": True}
    fields |= {k: saved[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if saved.get(k) is not None}
    end = end_of_turn(folder_files(folder))
    eos = saved.get("eos_token_id")
    stops = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list) else []
    if end is not None and end[1] not in stops:
        fields["eos_token_id"] = [*stops, end[1]]
    if "transformers_version" in saved:
        fields["transformers_version"] = saved["transformers_version"]
    (folder / "generation_config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
