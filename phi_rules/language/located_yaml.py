"""Safe YAML loading that remembers where every value and key came from.

PyYAML's safe loader forgets source positions once it builds Python objects; diagnostics need them,
so we compose the node graph ourselves and keep a map from JSON-pointer-like paths to marks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

Path = tuple[str | int, ...]
Mark = tuple[str, int, int]  # file, 1-based line and column


@dataclass
class Located:
    """A loaded YAML document with the file, line and column of each of its values and mapping keys.

    Marks carry their file because a document can be merged from several (``extends``).
    """

    data: object
    values: dict[Path, Mark] = field(default_factory=dict)
    keys: dict[Path, Mark] = field(default_factory=dict)

    def position(self, path: Path, *, key: bool = False) -> Mark:
        """Where ``path`` was written, or its nearest ancestor that has a position."""
        if key and path in self.keys:
            return self.keys[path]
        for end in range(len(path), -1, -1):
            if path[:end] in self.values:
                return self.values[path[:end]]
        return next(iter(self.values.values()), ("<unknown>", 1, 1))

    def subtree(self, prefix: Path, to: Path) -> Located:
        """The marks below ``prefix`` moved under ``to`` (data not copied): for merging documents."""
        n = len(prefix)
        return Located(
            None,
            {(*to, *p[n:]): m for p, m in self.values.items() if p[:n] == prefix},
            {(*to, *p[n:]): m for p, m in self.keys.items() if p[:n] == prefix},
        )

    def take(self, other: Located) -> None:
        self.values.update(other.values)
        self.keys.update(other.keys)


class YamlSyntaxError(Exception):
    """A YAML document that cannot be parsed, with the 1-based position of the problem."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


def _mark(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


class _Loader(yaml.SafeLoader):
    """The safe loader, reading numbers as YAML 1.2 does: ``1e-5`` is a float, not the string YAML 1.1 makes
    of it (a rule that says ``layer_norm_epsilon: 1e-5`` means the number)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_located(text: str, file: str = "<string>") -> Located:
    """Parse one YAML document safely; duplicate keys and non-string keys are syntax errors."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlSyntaxError(str(exc.problem or exc.context or "invalid YAML"), line, col) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc), 1, 1) from None
    located = Located(None)
    if node is not None:
        located.data = _build(node, (), located, _Loader(""), file)
    else:
        located.values[()] = (file, 1, 1)
    return located


_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_MAX_NODES = 100_000  # aliases can make a tiny file expand exponentially ("billion laughs")


def _build(node: yaml.Node, path: Path, located: Located, loader: yaml.SafeLoader, file: str) -> object:
    if len(located.values) >= _MAX_NODES or len(path) > 200:
        raise YamlSyntaxError("document too large or too deeply nested (recursive alias?)", *_mark(node))
    located.values[path] = (file, *_mark(node))
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _COLLECTION_TAGS:
        raise YamlSyntaxError(f"unsupported YAML tag {node.tag!r}", *_mark(node))  # e.g. !!python/object
    if isinstance(node, yaml.MappingNode):
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlSyntaxError("only plain scalar mapping keys are supported", *_mark(key_node))
            key = str(loader.construct_object(key_node))
            if key in result:
                raise YamlSyntaxError(f"duplicate key {key!r}", *_mark(key_node))
            located.keys[(*path, key)] = (file, *_mark(key_node))
            result[key] = _build(value_node, (*path, key), located, loader, file)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), located, loader, file) for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(getattr(exc, "problem", exc)), *_mark(node)) from None
