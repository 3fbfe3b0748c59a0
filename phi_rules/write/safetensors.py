"""Write safetensors files incrementally, which the safetensors library cannot do.

Every output shape and dtype is known from the plan, so each shard's header (and thus every
tensor's offset) is fixed before any data is written. Data is written first at its offset and the
header last, so that metadata computed during the run (source sha256s) can go into it; its length
is reserved with placeholders of the same length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from phi_rules.language.ops import Segment
from phi_rules.planning.planner import PlannedTensor
from phi_rules.source.header import ST_CODES
from phi_rules.write.stream import Run, join, pwrite_all, reserve

if TYPE_CHECKING:
    import torch


def shard(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy shards in plan order: a new shard starts where adding a tensor would pass ``max_bytes``."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        entries[t.name] = {
            "dtype": ST_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


class SafetensorsWriter:
    """Writes planned tensors into ``model.safetensors`` or shards plus their index, in plan order."""

    def __init__(
        self,
        folder: Path,
        tensors: list[PlannedTensor],
        max_bytes: int,
        metadata: dict[str, str],
        single: str | None = None,
    ) -> None:
        """``single``: one file of that name, never sharded (a PEFT adapter's ``adapter_model.safetensors``)."""
        self.folder = folder
        self.shards = [tensors] if single else shard(tensors, max_bytes)
        n = len(self.shards)
        self.names = (
            [single or "model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.header_len = [len(_header(s, metadata)) for s in self.shards]
        self.where: dict[str, tuple[int, int]] = {}  # tensor -> (shard, absolute offset)
        for i, tensors_i in enumerate(self.shards):
            offset = 8 + self.header_len[i]
            for t in tensors_i:
                self.where[t.name] = (i, offset)
                offset += t.nbytes
        self.fds = [os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for name in self.names]
        for fd, name, tensors_i, header_len in zip(self.fds, self.names, self.shards, self.header_len, strict=True):
            reserve(fd, 8 + header_len + sum(t.nbytes for t in tensors_i), str(folder / name))

    def order(self) -> list[PlannedTensor]:
        return [t for s in self.shards for t in s]

    def write_tensor(self, planned: PlannedTensor, tensor: torch.Tensor) -> None:
        import torch

        i, offset = self.where[planned.name]
        data = tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else memoryview(b"")
        pwrite_all(self.fds[i], data.cast("B"), offset)

    def runs(self, moves: Iterable[tuple[PlannedTensor, list[Segment], str]]) -> list[Run]:
        """Where each output's source bytes go, adjacent ones joined; ``moves``: output, its source ranges and
        their dtype, in the order to move them."""
        runs: list[Run] = []
        for planned, segments, dtype in moves:
            shard_i, at = self.where[planned.name]
            for file, begin, end in segments:
                runs.append(Run(file, begin, end, shard_i, at, dtype, planned.dtype))
                at += runs[-1].out_bytes
        return join(runs)

    def finish(self, metadata: dict[str, str]) -> list[str]:
        """Write headers (now with final metadata) and the index; return the files written."""
        for i, tensors_i in enumerate(self.shards):
            header = _header(tensors_i, metadata)
            if len(header) != self.header_len[i]:
                raise AssertionError("metadata changed length between planning and writing")
            pwrite_all(self.fds[i], memoryview(len(header).to_bytes(8, "little") + header), 0)
            os.close(self.fds[i])
        self.fds = []
        written = list(self.names)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                "weight_map": {t.name: self.names[i] for i, s in enumerate(self.shards) for t in s},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            written.append("model.safetensors.index.json")
        return written

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
