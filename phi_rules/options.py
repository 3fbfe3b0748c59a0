"""What a user can tell a conversion besides the rule file: plain values, shared by every stage."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from phi_rules.language.expr import Value


@dataclass(frozen=True)
class SourceOptions:
    """Command-line overrides of a rule's source."""

    source: Path | None = None
    hub: str | None = None  # --source owner/name[@revision]: a hub repository instead of a folder
    revision: str | None = None
    cache_dir: Path | None = None
    offline: bool = False
    token: str | None = None
    tokenizer: str | None = None  # a folder or owner/name@revision to copy tokenizer files from
    base: str | None = None  # for an adapter: the base model's folder or owner/name@revision (its config.json)


@dataclass(frozen=True)
class Options:
    """Everything ``apply`` can be told besides the rule file."""

    source: SourceOptions = field(default_factory=SourceOptions)
    overrides: Mapping[str, Value] = field(default_factory=dict)
    accept: tuple[str, ...] = ()  # refusals to convert anyway, by name (``--accept``), where the rule allows it
    device: str = "cpu"
    dtype: str | None = None
    max_shard_bytes: int = 5 * 10**9
    format: str | None = None
    force: bool = False
    fsync: bool = False
    require_tokenizer: bool = False
    verify: float | None = None  # run verify on the finished output with this tolerance before publishing it
