"""Safe YAML loading that remembers where every value and key came from.

PyYAML's safe loader forgets source positions once it builds Python objects; diagnostics need them,
so we compose the node graph ourselves and keep a map from JSON-pointer-like paths to marks. The graph
comes from libyaml's composer where PyYAML was built with it (its nodes carry marks too, and it is ten
times faster than the pure-Python one, which was most of ``detect``'s time); a document libyaml refuses
is composed again in pure Python, so that both paths give the same located error. Each text is parsed
once per process: rules that extend a base, and a backward rule derived from its forward one, share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

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


# libyaml's parser and composer with the same (Python) resolver; None where PyYAML was built without it.
_CLoader: type[yaml.CSafeLoader] | None = None
if yaml.__with_libyaml__:

    class _CLoader(yaml.CSafeLoader):  # type: ignore[no-redef]
        """libyaml's safe loader with :class:`_Loader`'s float resolver."""


for _loader in (_Loader, _CLoader):
    if _loader is not None:
        _loader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
            list("-+0123456789"),
        )


def _compose(text: str, libyaml: bool) -> yaml.Node | None:
    """The node graph of one document; a document libyaml refuses is composed again by the pure-Python
    composer, whose error (or, where it accepts the text, whose graph) is then the answer on both paths. A text
    with a tab or a ``? `` goes to the pure-Python composer at once: libyaml reads either inside a plain
    scalar as part of it (``o? ut: 1`` in a flow mapping), where PyYAML's scanner refuses it (no rule needs them).
    """
    if libyaml and _CLoader is not None and "\t" not in text and "? " not in text:
        try:
            return yaml.compose(text, Loader=_CLoader)
        except yaml.YAMLError:
            pass
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlSyntaxError(str(exc.problem or exc.context or "invalid YAML"), line, col) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc), 1, 1) from None


LIBYAML = _CLoader is not None  # compose with libyaml (the tests run the located errors on both paths)


def load_located(text: str, file: str = "<string>") -> Located:
    """Parse one YAML document safely; duplicate keys and non-string keys are syntax errors. The result is
    the caller's to change."""
    parsed = _parsed(text, file, LIBYAML)
    return Located(parsed.data, dict(parsed.values), dict(parsed.keys))


@lru_cache(maxsize=512)
def _parsed(text: str, file: str, libyaml: bool) -> Located:
    """The parse of one text, once per process (its data is never changed: loading builds new merged
    documents, and checking only reads them)."""
    node = _compose(text, libyaml)
    located = Located(None)
    if node is not None:
        located.data = _build(node, (), located, _Loader(""), file)
    else:
        located.values[()] = (file, 1, 1)
    return located


_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_MAX_NODES = 100_000  # aliases can make a tiny file expand exponentially ("billion laughs")


def _empty(node: yaml.Node) -> bool:
    """A value left out (``key:``), which YAML reads as null."""
    return isinstance(node, yaml.ScalarNode) and node.value == "" and not node.style  # plain: None, or libyaml's ""


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
            if _empty(value_node):  # `key: ` with nothing after it: marked at the key, as the composers differ
                located.values[(*path, key)] = located.keys[(*path, key)]
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), located, loader, file) for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(getattr(exc, "problem", exc)), *_mark(node)) from None
