"""Which outputs are source bytes in order: follow each op over the source's byte ranges, without torch.

A tensor whose bytes no op moves (a rename, a split along dim 0 of a contiguous tensor, a cast to its
own dtype) is copied file to file by the kernel; one whose elements only change dtype (``--dtype``) is
cast in chunks as it streams by. Knowing that needs only the plan, so bytes move before torch and
transformers are imported.
"""

from __future__ import annotations

from phi_rules.language.ops import Bytes, Segment, Spec
from phi_rules.planning.planner import Value
from phi_rules.source.header import TensorInfo


def _merge(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1][0] == seg[0] and out[-1][2] == seg[1]:
            out[-1] = (seg[0], out[-1][1], seg[2])
        else:
            out.append(seg)
    return out


def source_segments(value: Value) -> tuple[list[Segment], str] | None:
    """The output's elements as ranges of source files, in order, and their dtype there; None when an op
    moves them (a transpose) or computes them. Equal dtypes make a byte copy, others a streamed cast."""

    def walk(v: Value) -> list[Bytes] | None:
        if isinstance(v, TensorInfo):
            return None if v.span is None else [([(v.file, *v.span)], Spec(v.shape, v.dtype))]
        items: list[Bytes] = []
        for inp in v.comp.inputs:
            got = walk(inp)
            if got is None:
                return None
            items.extend(got)
        for op in v.comp.ops:
            nxt = op.segments(items)
            if nxt is None:
                return None
            items = nxt
        return [items[v.index]]

    got = walk(value)
    if got is None or not got[0][1].contiguous:
        return None
    return _merge(got[0][0]), got[0][1].dtype
