"""``phi-rules verify``: prove a conversion by its function, layer by layer, in bounded memory.

Two references, neither of which reads the rule being verified: the original Phi-1/1.5/2 architecture
written from its description for the legacy layouts (:mod:`.legacy`), and transformers' own class for
sources that are today's architectures (:mod:`.own_class`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi_rules.errors import PhiRulesError
from phi_rules.verify.common import Report, failure, layer_rows
from phi_rules.verify.legacy import LAYOUTS, verify_legacy
from phi_rules.verify.own_class import verify_own_class

OWN_CLASS_LAYOUTS = ("phi3", "llama", "mistral", "transformers")

__all__ = ["Report", "failure", "layer_rows", "verify"]


def verify(
    source: tuple[Path, ...],
    layout_name: str,
    config: dict[str, Any] | None,
    out: Path,
    tol: float,
    adapters: tuple[Path, Path] | None = None,
) -> Report:
    """The source against the output, by the reference that fits the source's layout."""
    if layout_name in LAYOUTS:
        return verify_legacy(source, layout_name, config, out, tol, adapters)
    if layout_name in OWN_CLASS_LAYOUTS:
        return verify_own_class(source[0].parent, out, tol, adapters)
    known = ", ".join([*LAYOUTS, *OWN_CLASS_LAYOUTS])
    raise PhiRulesError(f"no reference forward for layout {layout_name!r}: verify knows {known}")
