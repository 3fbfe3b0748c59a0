"""Derived backward rules are inverses: each op says what undoes it given the shapes on both sides of it, and
what is not provably an inverse is refused by validate at its step. Forward-then-backward is run on real
tensors through the ops themselves (build, bind, infer, run, as the planner does), bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi_rules.language import expr
from phi_rules.language.ops import OPS, BuildContext, Op, OpError, Spec
from phi_rules.language.reverse import inverse_ops
from phi_rules.language.rules import check_file

Raw = list[dict[str, Any]]


def _build(raw: Raw, count: int) -> list[Op]:
    built: list[Op] = []
    problems: list[str] = []
    for j, item in enumerate(raw):
        kind, arg = next(iter(item.items()))
        ctx = BuildContext(
            ("ops", j), count, lambda p, v: expr.parse(v) if isinstance(v, str) else expr.Const(v), problems.append
        )
        op = OPS[kind].build(arg, ctx)
        assert op is not None and not problems, problems
        built.append(op)
        count = op.leaves(count)
    return built


def run(raw: Raw, tensors: list[torch.Tensor], env: dict[str, expr.Value] | None = None) -> list[torch.Tensor]:
    """The ops on real tensors as the planner binds them: ``input`` is the run's first shape, the shape after
    the last op that changed the count of tensors."""
    specs = [Spec(tuple(t.shape), "float32") for t in tensors]
    start = tuple(tensors[0].shape)
    for op in _build(raw, len(tensors)):
        bound = op.bind(env or {}, start, specs)
        inferred = bound.infer(specs)
        if len(inferred) != len(specs):
            start = inferred[0].shape
        specs, tensors = inferred, bound.run(tensors)
        assert [tuple(t.shape) for t in tensors] == [s.shape for s in specs]
    return tensors


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.contiguous(), y.contiguous())
        for x, y in zip(a, b, strict=True)
    )


def round_trip(raw: Raw, tensors: list[torch.Tensor]) -> list[torch.Tensor] | str:
    """Forward then the derived backward, or why the backward is refused."""
    back = inverse_ops(raw, len(tensors))
    return back if isinstance(back, str) else run(back, run(raw, tensors))


INVERTIBLE: list[tuple[Raw, tuple[int, ...]]] = [
    (
        [{"view": [4, 3, -1, "..."]}, {"transpose": [0, 1]}, {"reshape": "input"}, {"split": {"dim": 0, "parts": 3}}],
        (24, 5),
    ),  # transformers 4.36's fused qkv
    ([{"view": [-1, 2, "..."]}, {"transpose": [0, 1]}, {"reshape": "input"}], (8, 3)),
    ([{"view": [2, 3, 4]}, {"permute": [1, 2, 0]}, {"reshape": "input"}], (24,)),  # a 3-cycle
    ([{"view": [2, 3, 4]}, {"permute": [2, 0, 1]}, {"reshape": "input"}], (6, 4)),
    ([{"split": {"dim": 0, "sizes": [2, 4, 4]}}], (10, 3)),
    ([{"split": {"dim": 1, "parts": 2}}, {"transpose": [0, 1]}], (4, 6)),
    ([{"repeat": 3}], (4, 2)),
    ([{"split": {"dim": 0, "sizes": [3, 3]}}, {"reshape": [-1, 2, 2]}, {"reshape": "input"}], (6, 4)),
]


@pytest.mark.parametrize(("raw", "shape"), INVERTIBLE, ids=[str(i) for i in range(len(INVERTIBLE))])
def test_the_backward_of_a_chain_gives_its_input_back_bit_for_bit(raw: Raw, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    back = round_trip(raw, [x])
    assert not isinstance(back, str), back
    assert same(back, [x])


REFUSED = [  # the chain, the op refused and why
    (
        [{"split": {"dim": 1, "parts": 2}}, {"reshape": [3, 4]}],
        "reshape (ops/1) that cannot be undone: the shape before it is part 0",
    ),  # issue: came back [3, 8]
    (
        [{"reshape": [6, 4]}, {"split": {"dim": 0, "parts": 2}}],
        "reshape (ops/0) that cannot be undone: the shape before it is the transform's input",
    ),  # issue: came back [6, 4]
    (
        [{"view": [-1, 2, "..."]}, {"transpose": [1, 2]}, {"reshape": "input"}],
        "reshape (ops/2) that cannot be undone: the shape before it is lost",
    ),
    (
        [{"view": [6, 4]}, {"split": {"dim": 0, "sizes": [2, 4]}}, {"reshape": [-1]}],
        "reshape (ops/2) that cannot be undone: the tensors it reshapes had different shapes",
    ),
    (
        [{"split": {"dim": 1, "sizes": [3, 3]}}, {"view": [-1, "..."]}],
        "view (ops/1) that cannot be undone: the shape before it is part 0",
    ),
    ([{"view": [2, 3, 4]}, {"permute": [1, 2, 0]}], "view (ops/0)"),
    ([{"cast": "float16"}], "'cast'"),
    (
        [{"split": {"dim": 0, "sizes": [2]}}, {"view": [1, 2]}],
        "view (ops/1) that cannot be undone: the shape before it ends in the dims after the first of a shape",
    ),  # a 1-D part: its tail is not the tail of what the backward's view reads (Hypothesis found it)
]


@pytest.mark.parametrize(("raw", "where"), REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_what_is_not_provably_an_inverse_is_refused_with_its_op(raw: Raw, where: str) -> None:
    why = inverse_ops(raw, 1)
    assert isinstance(why, str) and where in why


RULE = """version: 1
name: mine
source:
  fields: [hidden_size]
target:
  architecture: PhiForCausalLM
  check: false
  config: {{}}
steps:
  - name: reshaped
    transform:
      from: a.{{i}}
      ops: {ops}
      to: {to}
reverse:
  name: mine-back
  architecture: PhiForCausalLM
"""


@pytest.mark.parametrize(
    ("ops", "to"),
    [
        ("[{split: {dim: 1, parts: 2}}, {reshape: [3, 4]}]", "['b.{i}', 'c.{i}']"),
        ("[{reshape: [6, 4]}, {split: {dim: 0, parts: 2}}]", "['b.{i}', 'c.{i}']"),
    ],
)
def test_validate_refuses_a_backward_that_is_not_the_inverse_at_its_step(cli, tmp_path: Path, ops, to) -> None:
    rule = tmp_path / "mine.yaml"
    rule.write_text(RULE.format(ops=ops, to=to))
    problems = check_file(rule)
    assert len(problems) == 1
    assert problems[0].line == 10 and "step 'reshaped' cannot run backward: it has reshape (ops/" in problems[0].message
    code, out, _ = cli("validate", rule)
    assert (
        code == 1 and out.startswith(f"{rule}:10:5: steps/0: step 'reshaped' cannot run backward") and "undone" in out
    )


def _draw_op(draw: st.DrawFn, tensors: list[torch.Tensor]) -> dict[str, Any]:
    """One op that fits the current tensors (shapes as the planner binds them)."""
    shape = tuple(tensors[0].shape)
    kinds = ["view", "reshape", "transpose", "permute"] if shape else ["view", "reshape"]
    kinds += ["split", "repeat"] if len(tensors) == 1 and shape else []
    equal = len(tensors) > 1 and all(torch.equal(t, tensors[0]) for t in tensors)
    kinds += ["take_one"] if equal else []
    kind = draw(st.sampled_from(kinds))
    rank = len(shape)
    if kind in ("view", "reshape"):
        if draw(st.booleans()):
            return {kind: "input"}
        rest = rank > 0 and draw(st.booleans())
        total = shape[0] if rest else tensors[0].numel()
        dims: list[object] = []
        while total > 1 and len(dims) < 3:
            d = draw(st.sampled_from([k for k in range(1, total + 1) if total % k == 0]))
            dims.append(d)
            total //= d
        dims = dims or [1]
        if draw(st.booleans()):
            dims[draw(st.integers(0, len(dims) - 1))] = -1
        return {kind: [*dims, "..."] if rest else dims}
    if kind == "transpose":
        a, b = (
            draw(
                st.lists(st.integers(-rank, rank - 1), min_size=2, max_size=2).filter(
                    lambda x: x[0] % rank != x[1] % rank
                )
            )
            if rank > 1
            else (0, -1)
        )
        return {kind: [a, b]}
    if kind == "permute":
        return {kind: draw(st.permutations(list(range(rank))))}
    if kind == "split":
        dim = draw(st.integers(0, rank - 1))
        n = shape[dim]
        if draw(st.booleans()):
            parts = draw(st.sampled_from([k for k in range(1, n + 1) if n % k == 0] or [1]))
            return {kind: {"dim": dim, "parts": parts}}
        cut = sorted(draw(st.lists(st.integers(0, n), max_size=2)))
        bounds = [0, *cut, n]
        return {kind: {"dim": dim, "sizes": [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]}}
    if kind == "repeat":
        return {kind: draw(st.integers(1, 3))}
    return {kind: len(tensors)}


@st.composite
def chains(draw: st.DrawFn) -> tuple[Raw, torch.Tensor]:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    x = torch.randn(shape)
    raw: Raw = []
    tensors = [x]
    for _ in range(draw(st.integers(1, 5))):
        op = _draw_op(draw, tensors)
        try:
            tensors = run([*raw, op], [x])
        except (OpError, RuntimeError):
            continue  # does not fit (view of a transposed tensor, an inferred dim that is not whole)
        raw.append(op)
    return raw, x


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_forward_then_backward_is_bit_identical_or_refused(chain: tuple[Raw, torch.Tensor]) -> None:
    raw, x = chain
    back = round_trip(raw, [x])
    if not isinstance(back, str):
        assert same(back, [x]), (raw, inverse_ops(raw, 1))


def test_take_one_compares_bytes() -> None:
    """Copies that differ only in the sign of a zero are two tensors; a NaN and its byte-identical copy are one."""
    (take,) = _build([{"take_one": 2}], 2)
    zero = torch.zeros(3)
    with pytest.raises(OpError, match="the 2 copies differ"):
        take.run([zero, -zero])
    nan = torch.tensor([float("nan"), 1.0])
    (one,) = take.run([nan, nan.clone()])
    assert one.isnan()[0] and one[1] == 1.0
    with pytest.raises(OpError, match="the 2 copies differ"):
        take.run([nan, nan.double()])


def test_a_users_own_rule_runs_backward_from_the_command_line(cli, tmp_path: Path) -> None:
    """`apply MINE.yaml --to LAYOUT` runs the backward rule MINE derives where that writes LAYOUT, as --to does
    for the shipped rules: forward, then back, the very same bytes."""
    from conftest import ROOT
    from phi_reference import MsftConfig, random_state, write_checkpoint
    from safetensors.torch import load_file

    cfg = MsftConfig(vocab_size=80, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    src = write_checkpoint(tmp_path / "src", random_state(cfg, torch.float32, seed=30), cfg)
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"version: 1\nname: mine\nextends: {ROOT / 'rules' / 'phi-2.yaml'}\nreverse: {{name: mine-back}}\n")
    assert cli("apply", mine, "--source", src, "--out", tmp_path / "there", "--quiet")[0] == 0
    code, out, err = cli("plan", mine, "--source", tmp_path / "there", "--to", "phi-msft")
    assert code == 0 and "\nmine-back: " in out, err
    code, _, err = cli("apply", mine, "--source", tmp_path / "there", "--to", "phi-msft", "--out", tmp_path / "back")
    assert code == 0, err
    before, back = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(back)
    assert all(same([back[k].view(torch.uint8)], [t.view(torch.uint8)]) for k, t in before.items())
