"""Produce output tensors one at a time: byte ranges copied file to file where the bytes do not
change, everything else read, moved to the device, run through its ops and moved back.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import torch

from phi_rules.language import ops
from phi_rules.plan.planner import Computation, Pick, PlannedTensor, Value
from phi_rules.source.checkpoint import Checkpoint, torch_dtype
from phi_rules.source.header import TensorInfo, itemsize

Segment = tuple[str, int, int]  # file, begin, end (absolute byte offsets)


def _slice(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    out: list[Segment] = []
    pos = 0
    for file, b, e in segments:
        n = e - b
        s, t = max(lo, pos), min(hi, pos + n)
        if s < t:
            out.append((file, b + s - pos, b + t - pos))
        pos += n
    return out


def _merge(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1][0] == seg[0] and out[-1][2] == seg[1]:
            out[-1] = (seg[0], out[-1][1], seg[2])
        else:
            out.append(seg)
    return out


def _segment_op(op: ops.BoundOp, items: list[tuple[list[Segment], torch.Tensor]]):
    """Follow one op on byte segments; None when the op changes bytes (transpose, real casts, …)."""
    metas = ops.apply(op, [m for _, m in items])
    if op.kind in ("view", "reshape"):
        return [(segs, m) for (segs, _), m in zip(items, metas, strict=True)]
    if op.kind == "cast":
        return items if all(m.dtype == meta.dtype for (_, m), meta in zip(items, metas, strict=True)) else None
    if op.kind == "split":
        (segs, meta), (dim, sizes) = items[0], op.args
        if not ops.contiguous_prefix(tuple(meta.shape), dim):  # type: ignore[arg-type]
            return None
        row = math.prod(meta.shape[dim + 1 :] if dim >= 0 else meta.shape[meta.dim() + dim + 1 :])  # type: ignore[operator]
        row *= meta.element_size()
        bounds = [0, *[sum(sizes[: i + 1]) for i in range(len(sizes))]]  # type: ignore[arg-type, index]
        return [(_slice(segs, bounds[i] * row, bounds[i + 1] * row), m) for i, m in enumerate(metas)]
    if op.kind == "concat":
        if not all(ops.contiguous_prefix(tuple(m.shape), op.args[0]) for _, m in items):  # type: ignore[arg-type]
            return None
        return [([s for segs, _ in items for s in segs], metas[0])]
    return None


def byte_segments(value: Value, out_dtype: str) -> list[Segment] | None:
    """The output's bytes as ranges of source files, if no op changes them; else None."""

    def walk(v: Value) -> list[tuple[list[Segment], torch.Tensor]] | None:
        if isinstance(v, TensorInfo):
            if v.span is None:
                return None
            return [([(v.file, *v.span)], torch.empty(v.shape, dtype=torch_dtype(v.dtype), device="meta"))]
        items: list[tuple[list[Segment], torch.Tensor]] = []
        for inp in v.comp.inputs:
            got = walk(inp)
            if got is None:
                return None
            items.extend(got)
        for op in v.comp.ops:
            nxt = _segment_op(op, items)
            if nxt is None:
                return None
            items = nxt
        return [items[v.index]]

    got = walk(value)
    if got is None or str(got[0][1].dtype).removeprefix("torch.") != out_dtype:
        return None
    return _merge(got[0][0])


class Executor:
    """Materializes planned tensors; a transform's outputs are computed once and kept until all are used."""

    def __init__(self, checkpoint: Checkpoint, tensors: list[PlannedTensor], device: torch.device) -> None:
        self.checkpoint, self.device = checkpoint, device
        self.cache: dict[Computation, list[torch.Tensor]] = {}
        self.uses: Counter[Computation] = Counter()
        for t in tensors:
            for pick in self._picks(t.value):
                self.uses[pick.comp] += 1

    def _picks(self, value: Value) -> Iterator[Pick]:
        if isinstance(value, Pick):
            yield value
            for inp in value.comp.inputs:
                yield from self._picks(inp)

    def _value(self, value: Value) -> torch.Tensor:
        if isinstance(value, TensorInfo):
            return self.checkpoint.load(value).to(self.device)
        comp = value.comp
        if comp not in self.cache:
            tensors = [self._value(inp) for inp in comp.inputs]
            for op in comp.ops:
                tensors = ops.apply(op, tensors)
            self.cache[comp] = tensors
        result = self.cache[comp][value.index]
        self.uses[comp] -= 1
        if self.uses[comp] <= 0:
            del self.cache[comp]
        return result

    def tensor(self, planned: PlannedTensor) -> torch.Tensor:
        """The output tensor on the CPU, in its written dtype, contiguous and owning its storage."""
        t = self._value(planned.value).to(torch_dtype(planned.dtype)).contiguous().cpu()
        if t.untyped_storage().nbytes() != t.numel() * itemsize(planned.dtype):
            t = t.clone()  # a view into a larger tensor (split output): keep only its own bytes
        return t
