"""Shapes as a rule writes them, followed through a transform's ops so that each op can say what undoes it.

A derived backward rule is a document: its ops name shapes by the rule's own expressions, never by numbers.
So the forward ops are followed on their written form: a dimension is the expression the rule wrote
(``num_attention_heads``, ``3``), :class:`Unknown` (a ``-1``, or a part of ``parts`` equal ones), or
:class:`Tail` (what ``...`` stands for: a shape's dims after its first); a whole shape the rule never spells
out (the transform's input) is :class:`Opaque`. Two shapes are the same only where that is provable: an
unknown dimension or an opaque shape equals itself alone. ``None`` is a shape the following lost track of.
"""

from __future__ import annotations

from dataclasses import dataclass

REST = "..."  # last in a view or reshape: the input's dimensions after its first


@dataclass(frozen=True, eq=False)
class Opaque:
    """A shape the rule does not spell out, equal to itself alone (a transform's input)."""

    what: str


@dataclass(frozen=True, eq=False)
class Unknown:
    """One dimension the rule leaves to inference (``-1``), equal to itself alone."""


@dataclass(frozen=True)
class Tail:
    """The dims of ``of`` after its first: what ``...`` stands for."""

    of: Opaque


Dim = str | int | float | Unknown | Tail  # str, int: an expression as the rule writes it
Sym = Opaque | tuple[Dim, ...] | None  # None: not known


def tail(shape: Sym) -> tuple[Dim, ...] | None:
    """A shape's dims after its first, where they are known."""
    if isinstance(shape, Opaque):
        return (Tail(shape),)
    if isinstance(shape, tuple) and shape and not isinstance(shape[0], Tail):
        return shape[1:]
    return None


def written_dims(arg: list[object], first: Sym) -> Sym:
    """The shape a view or reshape writes: its dims, ``-1`` unknown, ``...`` the tail of ``first`` (the first
    current tensor's shape, as the op binds it)."""
    dims: list[Dim] = [Unknown() if d == -1 else d for d in arg if d != REST]  # type: ignore[misc]
    if not arg or arg[-1] != REST:
        return tuple(dims)
    rest = tail(first)
    return None if rest is None else (*dims, *rest)


def fixed_rank(shape: Sym, dims: list[int]) -> tuple[tuple[Dim, ...], list[int]] | None:
    """``shape`` and ``dims`` made non-negative where each of ``dims`` is provably a place of its own: before any
    ``...`` (whose count of dims is not known), or anywhere in a shape of known rank."""
    if not isinstance(shape, tuple):
        return None
    end = next((i for i, d in enumerate(shape) if isinstance(d, Tail)), None)
    if end is None:
        fixed = [d % len(shape) if -len(shape) <= d < len(shape) else None for d in dims]
    else:
        fixed = [d if 0 <= d < end else None for d in dims]
    return (shape, [d for d in fixed if d is not None]) if None not in fixed else None


def write(shape: Sym, current: Sym) -> list[object] | None:
    """``shape`` as a reshape's argument that makes it from a tensor shaped ``current`` (the first current one,
    which ``...`` reads), or None where the rule's names cannot spell it: at most one unknown dim (``-1``), and
    a tail only where ``current`` has the same tail."""
    if not isinstance(shape, tuple) or sum(isinstance(d, Unknown) for d in shape) > 1:
        return None
    out: list[object] = []
    for i, d in enumerate(shape):
        if isinstance(d, Tail):
            if i != len(shape) - 1 or tail(current) != (d,):
                return None
            out.append(REST)
        else:
            out.append(-1 if isinstance(d, Unknown) else d)
    return out


def why_unwritten(shapes: list[Sym], current: Sym) -> str:
    """Why :func:`write` cannot spell ``shapes`` (one per tensor) alike for every tensor."""
    for shape in shapes:
        if shape is None:
            return "the shape before it is lost (a transpose or permute of dims behind `...` or never written)"
        if isinstance(shape, Opaque):
            return f"the shape before it is {shape.what}, which the rule does not write out (view it to named dims)"
        if sum(isinstance(d, Unknown) for d in shape) > 1:
            return "the shape before it has more than one dim the rule leaves unknown (-1, or a part of equal parts)"
        if write(shape, current) is None:
            return "the shape before it ends in the dims after the first of a shape that is not the one it reads"
    return "the tensors it reshapes had different shapes before it (parts of a split of different sizes)"
