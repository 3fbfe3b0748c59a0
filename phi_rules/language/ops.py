"""Tensor ops, one class each: arguments, shape inference in plain Python, the byte copy path, printing
and running on real tensors.

An op is built from its rule-file form (``build``), bound to numbers once a match's values are
known (``bind``), then either inferred over :class:`Spec` values (planning, no torch), followed over
source byte ranges (``segments``: the copy fast path; ``None`` when the op changes bytes) or run on
tensors (``run``, which alone touches torch). Adding an op is one class here plus its schema entry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from phi_rules.dtypes import ITEMSIZE
from phi_rules.language import expr, symbolic
from phi_rules.language.symbolic import REST, Sym

if TYPE_CHECKING:
    import torch

Shape = tuple[int, ...]
Segment = tuple[str, int, int]  # file, begin, end (absolute byte offsets)


class OpError(Exception):
    """An op whose arguments do not fit its input shapes."""


@dataclass(frozen=True)
class Spec:
    """A tensor as planning sees it; ``contiguous`` is false after a transpose (``view`` then fails)."""

    shape: Shape
    dtype: str
    contiguous: bool = True


Bytes = tuple[list[Segment], Spec]  # a tensor's bytes as ranges of source files, and its spec
Undone = dict[str, Any] | str  # the op (rule-file form) that undoes one, or why there is none


@dataclass(frozen=True)
class Shapes:
    """Where an op stands in a transform, as the rule writes it (see :mod:`symbolic`): the shapes of the
    current tensors and what ``input`` names there."""

    current: list[Sym]
    start: Sym


@dataclass(frozen=True)
class BuildContext:
    """What ``build`` needs from the rule checker: expression parsing that reports located errors."""

    path: tuple[str | int, ...]
    count: int  # tensors current before the op
    parse: Callable[[tuple[str | int, ...], object], expr.Node | None]
    error: Callable[[tuple[str | int, ...], str], None]


def _dim(dim: int, rank: int, what: str) -> int:
    if not -rank <= dim < rank:
        raise OpError(f"{what}: dim {dim} is out of range for a {rank}-d tensor")
    return dim % rank


def _ints(nodes: tuple[expr.Node, ...], env: Mapping[str, expr.Value]) -> tuple[int, ...]:
    values = [expr.evaluate(n, env) for n in nodes]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
            raise expr.ExprError(f"a dimension must be a whole number, not {v!r}")
    return tuple(int(v) for v in values)  # type: ignore[arg-type]


def _consts(values: tuple[int, ...]) -> tuple[expr.Node, ...]:
    return tuple(expr.Const(v) for v in values)


def _values(nodes: tuple[expr.Node, ...]) -> tuple[int, ...]:
    """The numbers of a bound op (every node a constant)."""
    return tuple(int(n.value) for n in nodes if isinstance(n, expr.Const))  # type: ignore[arg-type]


def _contiguous_prefix(shape: Shape, dim: int) -> bool:
    """True when slicing along ``dim`` yields contiguous byte ranges (all leading dims are 1)."""
    return math.prod(shape[:dim]) == 1


def _slice(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    out: list[Segment] = []
    pos = 0
    for file, b, e in segments:
        s, t = max(lo, pos), min(hi, pos + e - b)
        if s < t:
            out.append((file, b + s - pos, b + t - pos))
        pos += e - b
    return out


class Op(ABC):
    """One op; subclasses are frozen dataclasses whose fields are the rule's arguments."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        """The op from its rule-file argument (already schema-valid); reports problems through ``ctx``."""

    def leaves(self, count: int) -> int:
        """How many tensors are current after the op, given ``count`` before it."""
        return count

    def bind(self, env: Mapping[str, expr.Value], input_shape: Shape, specs: list[Spec]) -> Op:
        """The op with every expression evaluated; ``input_shape`` is what ``input`` names: the shape the current
        run of reshapes started from (the transform input's, or the last split or concat's output)."""
        return self

    @abstractmethod
    def infer(self, specs: list[Spec]) -> list[Spec]:
        """Output specs of a bound op; raises :class:`OpError` where it does not fit."""

    def segments(self, items: list[Bytes]) -> list[Bytes] | None:
        """Follow the op on byte ranges; ``None`` (the default) when it changes bytes."""
        return None

    @abstractmethod
    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply a bound op to real tensors."""

    def fill(self, specs: list[Spec | None]) -> list[Spec]:
        """The inputs with a spec of zeros standing in for each absent one (``absent: zeros``), where the op
        can tell their shape; raises :class:`OpError` where it cannot."""
        if any(s is None for s in specs):
            raise OpError(f"{self} cannot stand zeros in for an absent input")
        return [s for s in specs if s is not None]

    @classmethod
    def follow(cls, arg: Any, at: Shapes) -> list[Sym] | None:
        """The shapes after the op, from its rule-file form; None for an op that has no inverse."""
        return None

    @classmethod
    def undo(cls, arg: Any, before: Shapes, after: Shapes) -> Undone:
        """The op that makes ``before`` from ``after`` again (both as :meth:`follow` saw them; ``after.start``
        is what ``input`` names in the backward rule), or why the rule language has none."""
        return f"has no inverse in the rule language ({cls.name} loses what its inverse would need)"


@dataclass(frozen=True)
class Split(Op):
    name: ClassVar[str] = "split"
    dim: int
    parts: int | None
    sizes: tuple[expr.Node, ...] | None

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        if ctx.count != 1:
            ctx.error(ctx.path, f"split needs exactly one tensor, but {ctx.count} are current")
        if arg.get("sizes") is None:
            return cls(arg["dim"], arg["parts"], None)
        nodes = [ctx.parse((*ctx.path, "split", "sizes", i), s) for i, s in enumerate(arg["sizes"])]
        return cls(arg["dim"], None, tuple(n for n in nodes if n is not None))

    def leaves(self, count: int) -> int:
        return len(self.sizes) if self.sizes is not None else int(self.parts or 1)

    def bind(self, env: Mapping[str, expr.Value], input_shape: Shape, specs: list[Spec]) -> Op:
        if self.sizes is not None:
            return replace(self, sizes=_consts(_ints(self.sizes, env)))
        shape = specs[0].shape if len(specs) == 1 else ()
        parts = self.parts or 1
        if not -len(shape) <= self.dim < len(shape) or shape[self.dim] % parts:
            raise OpError(f"split into {parts} equal parts along dim {self.dim} does not fit shape {list(shape)}")
        return replace(self, parts=None, sizes=_consts((shape[self.dim] // parts,) * parts))

    def infer(self, specs: list[Spec]) -> list[Spec]:
        (spec,) = specs
        dim = _dim(self.dim, len(spec.shape), str(self))
        sizes = _values(self.sizes or ())
        if sum(sizes) != spec.shape[dim] or min(sizes) < 0:
            raise OpError(
                f"sizes {list(sizes)} add up to {sum(sizes)}, but dim {self.dim} of shape {list(spec.shape)} "
                f"is {spec.shape[dim]}"
            )
        keeps = spec.contiguous and _contiguous_prefix(spec.shape, dim)
        return [Spec((*spec.shape[:dim], n, *spec.shape[dim + 1 :]), spec.dtype, keeps) for n in sizes]

    def segments(self, items: list[Bytes]) -> list[Bytes] | None:
        (segs, spec), outs = items[0], self.infer([items[0][1]])
        dim = _dim(self.dim, len(spec.shape), str(self))
        if not (spec.contiguous and _contiguous_prefix(spec.shape, dim)):
            return None
        row = math.prod(spec.shape[dim + 1 :]) * ITEMSIZE[spec.dtype]
        bounds = [0, *[sum(_values(self.sizes or ())[: i + 1]) for i in range(len(outs))]]
        return [(_slice(segs, bounds[i] * row, bounds[i + 1] * row), out) for i, out in enumerate(outs)]

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        return list(torch.split(tensors[0], list(_values(self.sizes or ())), dim=self.dim))

    @classmethod
    def follow(cls, arg: Any, at: Shapes) -> list[Sym] | None:
        """Each part's shape: the input's with the split dim replaced by the part's size (unknown for equal
        parts); a part along dim 0 of an opaque input keeps its tail."""
        sizes: list[symbolic.Dim] = list(arg["sizes"]) if arg.get("sizes") is not None else []
        parts = sizes or [symbolic.Unknown() for _ in range(int(arg.get("parts") or 1))]
        shape = at.current[0]
        if isinstance(shape, symbolic.Opaque):
            if arg["dim"] == 0:
                return [(p, symbolic.Tail(shape)) for p in parts]
            return [symbolic.Opaque(f"part {i} of {shape.what}") for i in range(len(parts))]
        fixed = symbolic.fixed_rank(shape, [arg["dim"]])
        if fixed is None:
            return [None] * len(parts)
        dims, (dim,) = fixed
        return [(*dims[:dim], p, *dims[dim + 1 :]) for p in parts]

    @classmethod
    def undo(cls, arg: Any, before: Shapes, after: Shapes) -> Undone:
        return {"concat": {"dim": arg["dim"]}}

    def __str__(self) -> str:
        return f"split(dim={self.dim}, sizes={list(_values(self.sizes or ()))})"


@dataclass(frozen=True)
class Concat(Op):
    name: ClassVar[str] = "concat"
    dim: int

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        return cls(arg["dim"])

    def leaves(self, count: int) -> int:
        return 1

    def fill(self, specs: list[Spec | None]) -> list[Spec]:
        present = [s for s in specs if s is not None]
        if len({s.shape for s in present}) != 1:
            raise OpError(f"{self} stands zeros in for an absent input only where the inputs present agree in shape")
        return [s or present[0] for s in specs]

    def infer(self, specs: list[Spec]) -> list[Spec]:
        first = specs[0]
        dim = _dim(self.dim, len(first.shape), str(self))
        for s in specs[1:]:
            rest = [d for i, d in enumerate(s.shape) if i != dim]
            if len(s.shape) != len(first.shape) or rest != [d for i, d in enumerate(first.shape) if i != dim]:
                shapes = ", ".join(str(list(x.shape)) for x in specs)
                raise OpError(f"{self} needs equal shapes outside dim {self.dim}, got {shapes}")
            if s.dtype != first.dtype:
                raise OpError(f"{self} needs one dtype, got {first.dtype} and {s.dtype}")
        total = sum(s.shape[dim] for s in specs)
        return [Spec((*first.shape[:dim], total, *first.shape[dim + 1 :]), first.dtype)]

    def segments(self, items: list[Bytes]) -> list[Bytes] | None:
        (out,) = self.infer([spec for _, spec in items])
        dim = _dim(self.dim, len(out.shape), str(self))
        if not all(spec.contiguous and _contiguous_prefix(spec.shape, dim) for _, spec in items):
            return None
        return [([s for segs, _ in items for s in segs], out)]

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        return [torch.cat(tensors, dim=self.dim)]

    def __str__(self) -> str:
        return f"concat(dim={self.dim})"


@dataclass(frozen=True)
class View(Op):
    """A new shape without copying (``dims`` None: ``input``, the run's first shape); ``reshape`` may copy.
    ``rest``: the shape ends with ``...``, the input's dimensions after its first, so that one view serves a
    weight and its bias."""

    name: ClassVar[str] = "view"
    dims: tuple[expr.Node, ...] | None
    rest: bool = False

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        if arg == "input":
            return cls(None)
        if REST in arg[:-1]:
            ctx.error(
                (*ctx.path, cls.name, arg.index(REST)), f"{REST} stands last in a {cls.name}: the dims after the first"
            )
        dims = [(i, d) for i, d in enumerate(arg) if d != REST]
        nodes = tuple(n for i, d in dims if (n := ctx.parse((*ctx.path, cls.name, i), d)) is not None)
        if sum(1 for n in nodes if n == expr.Const(-1)) > 1:
            ctx.error(ctx.path, f"{cls.name} may infer (-1) only one dimension")
        return cls(nodes, bool(arg) and arg[-1] == REST)

    def bind(self, env: Mapping[str, expr.Value], input_shape: Shape, specs: list[Spec]) -> Op:
        if self.dims is None:
            return replace(self, dims=_consts(input_shape))
        rest = specs[0].shape[1:] if self.rest and specs else ()
        return replace(self, dims=_consts(_ints(self.dims, env) + tuple(rest)), rest=False)

    def _shape(self, spec: Spec) -> Shape:
        dims = list(_values(self.dims or ()))
        size = math.prod(spec.shape)
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims and known and size % known == 0:
            dims[dims.index(-1)] = size // known
        if math.prod(dims) != size or any(d < 0 for d in dims):
            raise OpError(f"{self} does not fit input shape {list(spec.shape)}")
        return tuple(dims)

    def infer(self, specs: list[Spec]) -> list[Spec]:
        if not all(s.contiguous for s in specs):
            raise OpError(f"{self} needs a contiguous tensor (after a transpose or permute, use reshape)")
        return [Spec(self._shape(s), s.dtype) for s in specs]

    def segments(self, items: list[Bytes]) -> list[Bytes] | None:
        if not all(spec.contiguous for _, spec in items):
            return None
        return [(segs, spec) for (segs, _), spec in zip(items, self.infer([s for _, s in items]), strict=True)]

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.view(*_values(self.dims or ())) for t in tensors]

    @classmethod
    def follow(cls, arg: Any, at: Shapes) -> list[Sym] | None:
        shape = at.start if arg == "input" else symbolic.written_dims(arg, at.current[0])
        return [shape] * len(at.current)

    @classmethod
    def undo(cls, arg: Any, before: Shapes, after: Shapes) -> Undone:
        """A reshape back to the shape before: ``input`` where that is the backward's run start, else the dims
        as the rule wrote them, alike for every tensor."""
        if before.current[0] is not None and all(s == after.start for s in before.current):
            return {"reshape": "input"}
        written = [symbolic.write(s, after.current[0]) for s in before.current]
        if written[0] is not None and all(w == written[0] for w in written):
            return {"reshape": written[0]}
        return f"cannot be undone: {symbolic.why_unwritten(before.current, after.current[0])}"

    def __str__(self) -> str:
        return f"{self.name}({', '.join([*map(str, _values(self.dims or ())), *([REST] if self.rest else [])])})"


@dataclass(frozen=True)
class Reshape(View):
    name: ClassVar[str] = "reshape"

    def infer(self, specs: list[Spec]) -> list[Spec]:
        return [Spec(self._shape(s), s.dtype) for s in specs]

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.reshape(*_values(self.dims or ())) for t in tensors]


@dataclass(frozen=True)
class Permute(Op):
    name: ClassVar[str] = "permute"
    dims: tuple[int, ...]

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        if sorted(arg) != list(range(len(arg))):
            ctx.error(ctx.path, f"permute needs each of 0..{len(arg) - 1} exactly once, got {arg}")
        return cls(tuple(arg))

    def order(self, rank: int) -> tuple[int, ...]:
        if len(self.dims) != rank:
            raise OpError(f"{self} needs a {len(self.dims)}-d tensor, not a {rank}-d one")
        return self.dims

    def infer(self, specs: list[Spec]) -> list[Spec]:
        out = []
        for s in specs:
            order = self.order(len(s.shape))
            moved = any(s.shape[d] != 1 for i, d in enumerate(order) if d != i)
            out.append(Spec(tuple(s.shape[d] for d in order), s.dtype, s.contiguous and not moved))
        return out

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.permute(*self.order(t.dim())) for t in tensors]

    @classmethod
    def follow(cls, arg: Any, at: Shapes) -> list[Sym] | None:
        return [cls._moved(arg, s) for s in at.current]

    @classmethod
    def _moved(cls, arg: list[int], shape: Sym) -> Sym:
        """The shape permuted, where its rank is known (a permute names every dim)."""
        fixed = symbolic.fixed_rank(shape, list(range(len(arg))))
        if fixed is None or len(fixed[0]) != len(arg):
            return None
        return tuple(fixed[0][d] for d in arg)

    @classmethod
    def undo(cls, arg: Any, before: Shapes, after: Shapes) -> Undone:
        return {"permute": [list(arg).index(i) for i in range(len(arg))]}

    def __str__(self) -> str:
        return f"{self.name}({', '.join(map(str, self.dims))})"


@dataclass(frozen=True)
class Transpose(Permute):
    """Swap two dims: the permutation that exchanges them."""

    name: ClassVar[str] = "transpose"

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        if arg[0] == arg[1]:
            ctx.error(ctx.path, "transpose needs two different dimensions")
        return cls((arg[0], arg[1]))

    def order(self, rank: int) -> tuple[int, ...]:
        a, b = (_dim(d, rank, str(self)) for d in self.dims)
        order = list(range(rank))
        order[a], order[b] = b, a
        return tuple(order)

    @classmethod
    def _moved(cls, arg: list[int], shape: Sym) -> Sym:
        """The shape with two dims swapped, where both are places of their own (before any ``...``)."""
        fixed = symbolic.fixed_rank(shape, list(arg))
        if fixed is None:
            return None
        dims, (a, b) = fixed
        swapped = list(dims)
        swapped[a], swapped[b] = dims[b], dims[a]
        return tuple(swapped)

    @classmethod
    def undo(cls, arg: Any, before: Shapes, after: Shapes) -> Undone:
        return {"transpose": list(arg)}


@dataclass(frozen=True)
class Cast(Op):
    name: ClassVar[str] = "cast"
    dtype: str

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        return cls(arg)

    def infer(self, specs: list[Spec]) -> list[Spec]:
        return [replace(s, dtype=self.dtype) for s in specs]

    def segments(self, items: list[Bytes]) -> list[Bytes] | None:
        return items if all(spec.dtype == self.dtype for _, spec in items) else None

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        from phi_rules.cast import cast

        return [cast(t, getattr(torch, self.dtype)) for t in tensors]

    def __str__(self) -> str:
        return f"cast({self.dtype})"


@dataclass(frozen=True)
class Repeat(Op):
    """One tensor to ``times`` identical outputs: a LoRA A matrix that q, k and v share."""

    name: ClassVar[str] = "repeat"
    times: int

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        if ctx.count != 1:
            ctx.error(ctx.path, f"repeat needs exactly one tensor, but {ctx.count} are current")
        return cls(arg)

    def leaves(self, count: int) -> int:
        return self.times

    def infer(self, specs: list[Spec]) -> list[Spec]:
        return [specs[0]] * self.times

    def segments(self, items: list[Bytes]) -> list[Bytes] | None:
        return [items[0]] * self.times

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[0]] * self.times

    @classmethod
    def follow(cls, arg: Any, at: Shapes) -> list[Sym] | None:
        return [at.current[0]] * int(arg)

    @classmethod
    def undo(cls, arg: Any, before: Shapes, after: Shapes) -> Undone:
        return {"take_one": arg}

    def __str__(self) -> str:
        return f"repeat({self.times})"


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Copies are equal when their bytes are: -0.0 is not 0.0, and a NaN equals its own copy."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(*(t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)))


@dataclass(frozen=True)
class TakeOne(Op):
    """``copies`` tensors that must be equal to one: what ``repeat`` undoes (a LoRA A matrix shared by q, k
    and v, fused back). The bytes are compared when the conversion runs; copies that differ stop it."""

    name: ClassVar[str] = "take_one"
    copies: int

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        if ctx.count != arg:
            ctx.error(ctx.path, f"take_one takes {arg} copies, but {ctx.count} tensor(s) are current")
        return cls(arg)

    def leaves(self, count: int) -> int:
        return 1

    def infer(self, specs: list[Spec]) -> list[Spec]:
        if any(s != specs[0] for s in specs):
            raise OpError(f"{self}: the copies differ in shape or dtype: {[list(s.shape) for s in specs]}")
        return [specs[0]]

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if not all(_same_bytes(tensors[0], t) for t in tensors[1:]):
            raise OpError(f"{self}: the {self.copies} copies differ, so they are not one tensor repeated")
        return [tensors[0]]

    @classmethod
    def follow(cls, arg: Any, at: Shapes) -> list[Sym] | None:
        return [at.current[0]]

    @classmethod
    def undo(cls, arg: Any, before: Shapes, after: Shapes) -> Undone:
        return {"repeat": arg}

    def __str__(self) -> str:
        return f"take_one({self.copies})"


@dataclass(frozen=True)
class BlockDiagonal(Op):
    """Matrices on the diagonal of one, zeros elsewhere: the B matrices of LoRA parts fused into one module
    (their A matrices stacked by ``concat``), so that B·A of the whole is each part's B·A on its rows."""

    name: ClassVar[str] = "block_diagonal"
    rows: tuple[expr.Node, ...] | None

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        if arg.get("rows") is None:
            return cls(None)
        if len(arg["rows"]) != ctx.count:
            ctx.error(ctx.path, f"block_diagonal gives {len(arg['rows'])} row counts for {ctx.count} inputs")
        nodes = [ctx.parse((*ctx.path, "block_diagonal", "rows", i), r) for i, r in enumerate(arg["rows"])]
        return cls(tuple(n for n in nodes if n is not None))

    def leaves(self, count: int) -> int:
        return 1

    def bind(self, env: Mapping[str, expr.Value], input_shape: Shape, specs: list[Spec]) -> Op:
        return self if self.rows is None else replace(self, rows=_consts(_ints(self.rows, env)))

    def fill(self, specs: list[Spec | None]) -> list[Spec]:
        present = [s for s in specs if s is not None]
        if self.rows is None or len({s.shape[1:] for s in present}) != 1:
            raise OpError(f"{self} stands zeros in for an absent input only with rows given and equal column counts")
        rows = _values(self.rows)
        return [s or Spec((rows[i], *present[0].shape[1:]), present[0].dtype) for i, s in enumerate(specs)]

    def infer(self, specs: list[Spec]) -> list[Spec]:
        if any(len(s.shape) != 2 for s in specs) or len({s.dtype for s in specs}) != 1:
            got = ", ".join(f"{list(s.shape)} {s.dtype}" for s in specs)
            raise OpError(f"{self} needs matrices of one dtype, got {got}")
        rows = _values(self.rows) if self.rows is not None else tuple(s.shape[0] for s in specs)
        if list(rows) != [s.shape[0] for s in specs]:
            raise OpError(f"{self}: the inputs have {[s.shape[0] for s in specs]} rows")
        return [Spec((sum(rows), sum(s.shape[1] for s in specs)), specs[0].dtype)]

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        return [torch.block_diag(*tensors)]  # type: ignore[no-untyped-call]

    def __str__(self) -> str:
        return f"block_diagonal(rows={list(_values(self.rows))})" if self.rows is not None else "block_diagonal"


@dataclass(frozen=True)
class Zeros(Op):
    """Zeros standing in for an absent input (``absent: zeros``); the planner makes it, no rule names it."""

    name: ClassVar[str] = "zeros"
    spec: Spec

    @classmethod
    def build(cls, arg: Any, ctx: BuildContext) -> Op | None:
        raise NotImplementedError("zeros is made by the planner, not written in rules")

    def leaves(self, count: int) -> int:
        return 1

    def infer(self, specs: list[Spec]) -> list[Spec]:
        return [self.spec]

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        return [torch.zeros(self.spec.shape, dtype=getattr(torch, self.spec.dtype))]

    def __str__(self) -> str:
        return f"zeros({', '.join(map(str, self.spec.shape))})"


OPS: dict[str, type[Op]] = {
    cls.name: cls for cls in (Split, Concat, View, Reshape, Transpose, Permute, Cast, Repeat, TakeOne, BlockDiagonal)
}
