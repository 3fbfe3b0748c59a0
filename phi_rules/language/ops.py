"""Tensor ops with concrete arguments, run on ``meta`` tensors to plan and on real ones to convert.

One implementation serves both, so a plan's shapes are exactly what execution produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from phi_rules.source.checkpoint import torch_dtype


@dataclass(frozen=True)
class BoundOp:
    """An op with every expression already evaluated: ``kind`` names it, ``args`` are ints/str."""

    kind: str
    args: tuple[object, ...]

    def __str__(self) -> str:
        if self.kind == "split":
            dim, sizes = self.args
            return f"split(dim={dim}, sizes={list(sizes)})"  # type: ignore[arg-type]
        if self.kind == "concat":
            return f"concat(dim={self.args[0]})"
        if self.kind == "cast":
            return f"cast({self.args[0]})"
        return f"{self.kind}({', '.join(map(str, self.args[0]))})"  # type: ignore[call-overload]


class OpError(Exception):
    """An op whose arguments do not fit its input shapes."""


def apply(op: BoundOp, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply one op to the list of current tensors; split turns one into many, concat many into one."""
    try:
        if op.kind == "split":
            dim, sizes = op.args
            (t,) = tensors
            if sum(sizes) != t.shape[dim]:  # type: ignore[arg-type, index]
                raise OpError(
                    f"sizes {list(sizes)} add up to {sum(sizes)}, "  # type: ignore[arg-type]
                    f"but dim {dim} of shape {list(t.shape)} is {t.shape[dim]}"
                )  # type: ignore[index]
            return list(torch.split(t, list(sizes), dim=dim))  # type: ignore[arg-type, call-overload]
        if op.kind == "concat":
            return [torch.cat(tensors, dim=op.args[0])]  # type: ignore[arg-type]
        if op.kind == "view":
            return [t.view(*op.args[0]) for t in tensors]  # type: ignore[misc]
        if op.kind == "reshape":
            return [t.reshape(*op.args[0]) for t in tensors]  # type: ignore[misc]
        if op.kind == "transpose":
            return [t.transpose(*op.args[0]) for t in tensors]  # type: ignore[misc]
        if op.kind == "permute":
            return [t.permute(*op.args[0]) for t in tensors]  # type: ignore[misc]
        if op.kind == "cast":
            return [t.to(torch_dtype(str(op.args[0]))) for t in tensors]
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:
        shapes = ", ".join(str(list(t.shape)) for t in tensors)
        raise OpError(f"{op} does not fit input shape {shapes}: {str(exc).splitlines()[0]}") from None
    raise OpError(f"unknown op {op.kind!r}")


def contiguous_prefix(shape: tuple[int, ...], dim: int) -> bool:
    """True when slicing along ``dim`` yields contiguous byte ranges (all leading dims are 1)."""
    dim = dim % len(shape) if shape else 0
    return math.prod(shape[:dim]) == 1
