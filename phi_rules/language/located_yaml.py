"""Safe YAML loading that remembers where every value and key came from.

PyYAML's safe loader forgets source positions once it builds Python objects; diagnostics need them,
so we compose the node graph ourselves and keep a map from JSON-pointer-like paths to marks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

Path = tuple[str | int, ...]


@dataclass
class Located:
    """A loaded YAML document with 1-based (line, column) positions of its values and mapping keys."""

    data: object
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """Position of ``path``, or of its nearest ancestor that has one."""
        table = self.keys if key else self.values
        if key and path in table:
            return table[path]
        for end in range(len(path), -1, -1):
            if path[:end] in self.values:
                return self.values[path[:end]]
        return (1, 1)


class YamlSyntaxError(Exception):
    """A YAML document that cannot be parsed, with the 1-based position of the problem."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


def _mark(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def load_located(text: str) -> Located:
    """Parse one YAML document safely; duplicate keys and non-string keys are syntax errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlSyntaxError(str(exc.problem or exc.context or "invalid YAML"), line, col) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc), 1, 1) from None
    located = Located(None)
    if node is not None:
        located.data = _build(node, (), located, yaml.SafeLoader(""))
    return located


_MAX_NODES = 100_000  # aliases can make a tiny file expand exponentially ("billion laughs")


def _build(node: yaml.Node, path: Path, located: Located, loader: yaml.SafeLoader) -> object:
    if len(located.values) >= _MAX_NODES or len(path) > 200:
        raise YamlSyntaxError("document too large or too deeply nested (recursive alias?)", *_mark(node))
    located.values[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlSyntaxError("only plain scalar mapping keys are supported", *_mark(key_node))
            key = str(loader.construct_object(key_node))
            if key in result:
                raise YamlSyntaxError(f"duplicate key {key!r}", *_mark(key_node))
            located.keys[(*path, key)] = _mark(key_node)
            result[key] = _build(value_node, (*path, key), located, loader)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), located, loader) for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(getattr(exc, "problem", exc)), *_mark(node)) from None
