"""``phi-rules verify``: prove a conversion by its function, layer by layer, in bounded memory.

Two references, neither of which reads the rule being verified: the original Phi-1/1.5/2 architecture
written from its description for the legacy layouts (:mod:`.legacy`), and transformers' own class for
sources that are today's architectures, or whose config.json names a class transformers has
(:mod:`.own_class`). A source with neither cannot be run: :mod:`.shapes` says so and checks what it can.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phi_rules.errors import PhiRulesError
from phi_rules.verify.common import Report, failure, layer_rows
from phi_rules.verify.legacy import LAYOUTS, verify_legacy
from phi_rules.verify.own_class import verify_own_class
from phi_rules.verify.shapes import verify_shapes

OWN_CLASS_LAYOUTS = ("phi3", "llama", "mistral", "transformers")

__all__ = ["Report", "failure", "layer_rows", "verify"]


def verify(
    source: tuple[Path, ...],
    layout_name: str,
    config: dict[str, Any] | None,
    out: Path,
    tol: float,
    adapters: tuple[Path, Path] | None = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> Report:
    """The source against the output, by the reference that fits the source's layout."""
    if layout_name in LAYOUTS:
        return verify_legacy(source, layout_name, config, out, tol, adapters, progress)
    folder = source[0].parent
    if layout_name in OWN_CLASS_LAYOUTS or _has_class(folder):
        return verify_own_class(folder, out, tol, adapters, progress)
    return verify_shapes(folder, layout_name, out)


def _has_class(folder: Path) -> bool:
    """Whether the source's config.json names an architecture transformers has a class for."""
    from phi_rules.planning.target import model_class

    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        model_class(str(architectures[0]))
    except (OSError, ValueError, AttributeError, IndexError, PhiRulesError):
        return False
    return True
