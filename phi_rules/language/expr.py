"""The expression language of rule files: parsed into a small AST and evaluated here, never by ``eval``.

Grammar (lowest precedence first)::

    expr    := compare
    compare := sum (("==" | "!=" | "<" | "<=" | ">" | ">=") sum)?
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/" | "//" | "%") unary)*
    unary   := "-" unary | atom
    atom    := NUMBER | STRING | NAME | NAME "(" [expr ("," expr)*] ")" | "(" expr ")"

Names are config fields or regex groups; ``true``, ``false`` and ``null`` are constants. ``get(obj, 'key')``
reads a field of a config object (``rope_parameters``), null where it is absent; ``object('k', v, …)``
builds one (null values left out); ``replace(x, old, new)`` maps a value that was renamed;
``removeprefix(x, 'model.')`` takes a leading piece off a string;
``any(…)`` and ``all(…)`` join conditions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from phi_rules.language import regex

Value = int | float | str | bool | None


INT64 = 2**63  # no size, count or id of a model reaches this: torch, safetensors and JSON readers stop here


def unfit(value: object) -> str | None:
    """Why a number cannot be a model's (NaN, an infinity, an integer past int64), looking inside lists and
    objects (``key: why``); None where every number fits."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT64:
        return f"an integer of {value.bit_length()} bits is too large (past int64)"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((f"{k}: {why}" for k, v in items if (why := unfit(v)) is not None), None)


class ExprError(Exception):
    """A syntax or evaluation problem, with the character offset where it was found."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.message, self.offset = message, offset


@dataclass(frozen=True)
class Const:
    value: Value


@dataclass(frozen=True)
class Name:
    name: str
    offset: int


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True)
class Binary:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Node, ...]
    offset: int


Node = Const | Name | Unary | Binary | Call

CONSTANTS: dict[str, Value] = {"true": True, "false": False, "null": None}
FUNCTIONS: dict[str, tuple[int, int]] = {
    "default": (2, 99),
    "min": (1, 99),
    "max": (1, 99),
    "int": (1, 1),
    "dim": (2, 2),
    "max_index": (1, 1),
    "get": (2, 2),
    "object": (0, 98),
    "replace": (3, 3),
    "removeprefix": (2, 2),
    "any": (1, 99),
    "all": (1, 99),
    "if": (3, 3),
}
# Functions that read the source's tensor names and shapes: their first argument is a quoted regex.
TENSOR_FUNCTIONS = ("dim", "max_index")
Shapes = Mapping[str, tuple[int, ...]]

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d*(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?|\.\d+)"
    r"|(?P<str>\"[^\"]*\"|'[^']*')"
    r"|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<op>//|==|!=|<=|>=|[-+*/%(),<>]))"
)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup is None:
            bad = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise ExprError(f"unexpected character {text[bad]!r}", bad)
        tokens.append((m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup)))
        pos = m.end()
    tokens.append(("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.i]

    def take(self) -> tuple[str, str, int]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        kind, text, offset = self.take()
        if text != value or kind != "op":
            raise ExprError(f"expected {value!r}, found {text or 'end of expression'!r}", offset)

    def parse(self) -> Node:
        node = self.compare()
        kind, text, offset = self.peek()
        if kind != "end":
            raise ExprError(f"unexpected {text!r}", offset)
        return node

    def compare(self) -> Node:
        node = self.sum()
        kind, text, _ = self.peek()
        if kind == "op" and text in ("==", "!=", "<", "<=", ">", ">="):
            self.take()
            node = Binary(text, node, self.sum())
        return node

    def sum(self) -> Node:
        node = self.product()
        while self.peek()[0] == "op" and self.peek()[1] in "+-":
            node = Binary(self.take()[1], node, self.product())
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.peek()[0] == "op" and self.peek()[1] in ("*", "/", "//", "%"):
            node = Binary(self.take()[1], node, self.unary())
        return node

    def unary(self) -> Node:
        if self.peek()[:2] == ("op", "-"):
            self.take()
            return Unary("-", self.unary())
        return self.atom()

    def atom(self) -> Node:
        kind, text, offset = self.take()
        if kind == "num":
            try:
                value: Value = float(text) if any(c in text for c in ".eE") else int(text)
            except ValueError:  # more digits than Python converts
                value = math.inf
            if unfit(value) is not None:
                raise ExprError(f"the number {text[:24]}{'…' if len(text) > 24 else ''} is out of range", offset)
            return Const(value)
        if kind == "str":
            return Const(text[1:-1])
        if kind == "name":
            if self.peek()[:2] == ("op", "("):
                return self.call(text, offset)
            if text in CONSTANTS:
                return Const(CONSTANTS[text])
            return Name(text, offset)
        if (kind, text) == ("op", "("):
            node = self.compare()
            self.expect(")")
            return node
        raise ExprError(f"unexpected {text or 'end of expression'!r}", offset)

    def call(self, func: str, offset: int) -> Node:
        if func not in FUNCTIONS:
            raise ExprError(f"unknown function {func!r} (known: {', '.join(FUNCTIONS)})", offset)
        self.expect("(")
        args: list[Node] = []
        if self.peek()[:2] != ("op", ")"):
            args.append(self.compare())
            while self.peek()[:2] == ("op", ","):
                self.take()
                args.append(self.compare())
        self.expect(")")
        low, high = FUNCTIONS[func]
        if not low <= len(args) <= high:
            raise ExprError(f"{func}() takes {low if low == high else f'{low} or more'} arguments", offset)
        return Call(func, tuple(args), offset)


def parse(text: str) -> Node:
    """Parse an expression; raises :class:`ExprError` with the offset of the first problem."""
    return _Parser(text).parse()


def walk(node: Node) -> list[Node]:
    """The node and every node below it."""
    if isinstance(node, Unary):
        return [node, *walk(node.operand)]
    if isinstance(node, Binary):
        return [node, *walk(node.left), *walk(node.right)]
    if isinstance(node, Call):
        return [node, *(n for arg in node.args for n in walk(arg))]
    return [node]


def names(node: Node) -> list[Name]:
    """Every name the expression reads, in order, so validation can reject unknown ones."""
    if isinstance(node, Name):
        return [node]
    if isinstance(node, Unary):
        return names(node.operand)
    if isinstance(node, Binary):
        return names(node.left) + names(node.right)
    if isinstance(node, Call):
        return [n for arg in node.args for n in names(arg)]
    return []


def _number(value: Value, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExprError(f"{what} must be a number, not {value!r}")
    why = unfit(value)
    if why is not None:
        raise ExprError(f"{what}: {why}")
    return value


def _arith(op: str, a: Value, b: Value) -> Value:
    if op == "+" and isinstance(a, str) and isinstance(b, str):
        return a + b
    x, y = _number(a, f"left side of {op!r}"), _number(b, f"right side of {op!r}")
    if op in ("/", "//", "%") and y == 0:
        raise ExprError("division by zero")
    ops: dict[str, Callable[[int | float, int | float], int | float]] = {
        "+": lambda p, q: p + q,
        "-": lambda p, q: p - q,
        "*": lambda p, q: p * q,
        "/": lambda p, q: p / q,
        "//": lambda p, q: p // q,
        "%": lambda p, q: p % q,
    }
    result = ops[op](x, y)
    why = unfit(result)
    if why is not None:
        raise ExprError(f"{op!r} gives a number out of range: {why}")
    return result


def _compare(op: str, a: Value, b: Value) -> bool:
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    x, y = _number(a, f"left side of {op!r}"), _number(b, f"right side of {op!r}")
    return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[op]


def _tensor_query(node: Call, env: Mapping[str, Value], shapes: Shapes | None) -> Value:
    """``dim(pattern, axis)``: that axis of the first source tensor whose name matches, else null;
    ``max_index(pattern)``: the largest integer its group 1 captures over all names, else null."""
    if shapes is None:
        raise ExprError(f"{node.func}() reads source tensors: use it in target.config or let", node.offset)
    pattern = regex.compile(str(evaluate(node.args[0], {})))
    hits = [(n, s) for n, s in shapes.items() if pattern.fullmatch(n)]
    if node.func == "dim":
        axis = _number(evaluate(node.args[1], {}), "axis of dim()")
        return next((s[int(axis)] for _, s in hits if -len(s) <= axis < len(s)), None)
    groups = [m.group(1) for n, _ in hits if (m := pattern.fullmatch(n))]
    found = [int(g) for g in groups if g is not None and g.isdigit()]
    return max(found) if found else None


def evaluate(node: Node, env: Mapping[str, Value], shapes: Shapes | None = None) -> Value:
    """Evaluate with names looked up in ``env`` (an absent name is an error) and, for ``dim()`` and
    ``max_index()``, tensor shapes from ``shapes``."""
    if isinstance(node, Const):
        return node.value
    if isinstance(node, Name):
        if node.name not in env:
            raise ExprError(f"unknown name {node.name!r}", node.offset)
        return env[node.name]
    if isinstance(node, Unary):
        return -_number(evaluate(node.operand, env, shapes), "operand of '-'")
    if isinstance(node, Binary):
        a, b = evaluate(node.left, env, shapes), evaluate(node.right, env, shapes)
        return _compare(node.op, a, b) if node.op in ("==", "!=", "<", "<=", ">", ">=") else _arith(node.op, a, b)
    if node.func in TENSOR_FUNCTIONS:
        return _tensor_query(node, env, shapes)
    if node.func == "default":
        return next((v for arg in node.args if (v := evaluate(arg, env, shapes)) is not None), None)
    if node.func == "object":  # object('key', value, …): a config object, its null values left out
        items = [evaluate(arg, env, shapes) for arg in node.args]
        if len(items) % 2:
            raise ExprError("object() takes key, value pairs", node.offset)
        return {str(k): v for k, v in zip(items[::2], items[1::2], strict=True) if v is not None}  # type: ignore[return-value]
    if node.func in ("any", "all"):  # any(a, b): true when one argument is; all(a, b): when every one is
        truths = (bool(evaluate(arg, env, shapes)) for arg in node.args)
        return any(truths) if node.func == "any" else all(truths)
    if node.func == "if":  # if(condition, then, else): only the chosen side is evaluated
        chosen = node.args[1] if evaluate(node.args[0], env, shapes) else node.args[2]
        return evaluate(chosen, env, shapes)
    if node.func == "replace":  # replace(x, old, new): a value that had another name ('su' is now 'longrope')
        value, old, new = (evaluate(arg, env, shapes) for arg in node.args)
        return new if value == old else value
    if node.func == "removeprefix":  # removeprefix(x, 'model.'): a name under another root; x unchanged without it
        text, prefix = (evaluate(arg, env, shapes) for arg in node.args)
        return text.removeprefix(prefix) if isinstance(text, str) and isinstance(prefix, str) else text
    if node.func == "get":  # a field inside a config object (rope_parameters); null where there is none
        inside: object = evaluate(node.args[0], env, shapes)
        key = evaluate(node.args[1], env, shapes)
        return inside.get(str(key)) if isinstance(inside, dict) else None
    values = [_number(evaluate(arg, env, shapes), f"argument of {node.func}()") for arg in node.args]
    if node.func == "int":
        if isinstance(values[0], float) and not math.isfinite(values[0]):
            raise ExprError("int() of a non-finite number")
        return int(values[0])
    return min(values) if node.func == "min" else max(values)
