"""Numbers are checked where they enter the rule language: a literal, the result of arithmetic, a value
read from a config; NaN, infinities and integers past int64 are errors with a place, never a crash later."""

from __future__ import annotations

import math

import pytest

from phi_rules.language import expr


@pytest.mark.parametrize(
    ("text", "env", "says"),
    [
        ("1e308 * 10", {}, "'*' gives a number out of range"),
        ("n * 4", {"n": 2**62}, "'*' gives a number out of range"),
        ("n + 1", {"n": math.nan}, "left side of '+': nan is not a finite number"),
        ("n // 2", {"n": math.inf}, "left side of '//': inf is not a finite number"),
    ],
)
def test_arithmetic_out_of_range_is_an_expression_error(text: str, env: dict[str, expr.Value], says: str) -> None:
    with pytest.raises(expr.ExprError, match=says.replace("*", r"\*").replace("+", r"\+")):
        expr.evaluate(expr.parse(text), env)


@pytest.mark.parametrize("text", ["1e999", "1e999 - 1e999", "9" * 400, "1" + "0" * 5000])
def test_a_literal_out_of_range_does_not_parse(text: str) -> None:
    with pytest.raises(expr.ExprError, match="is out of range"):
        expr.parse(text)


def test_numbers_that_fit_pass() -> None:
    assert expr.evaluate(expr.parse("n * 2 + 0.5"), {"n": 2**61}) == 2**62 + 0.5
    assert expr.unfit({"a": [1, 2.5, None, "x"], "b": True}) is None
    assert expr.unfit({"rope": {"factor": math.nan}}) == "rope: factor: nan is not a finite number"
