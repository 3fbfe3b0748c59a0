"""``phi-rules verify``: prove a conversion by its function, layer by layer, in bounded memory.

Three references, none of which reads the rule being verified: the original Phi-1/1.5/2 architecture
written from its description for the legacy layouts (:mod:`.legacy`), transformers' own class for
sources that are today's architectures, or whose config.json names a class transformers has
(:mod:`.own_class`), and Phi-4-multimodal's remote code, run by transformers' native class for it on text
(:mod:`.multimodal`). A source with neither cannot be run: :mod:`.shapes` says so and checks what it can.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phi_rules.errors import PhiRulesError
from phi_rules.verify.common import Report, failure, layer_rows
from phi_rules.verify.legacy import LAYOUTS, verify_legacy
from phi_rules.verify.multimodal import REMOTE, architecture, verify_multimodal
from phi_rules.verify.own_class import verify_own_class
from phi_rules.verify.shapes import verify_shapes

OWN_CLASS_LAYOUTS = ("phi3", "llama", "mistral", "transformers")

__all__ = ["Report", "accepted_up_to", "failure", "layer_rows", "verify"]


def accepted_up_to(out: Path) -> tuple[int, list[str]] | None:
    """The length up to which an output made with refusals accepted (``apply --accept``) computes its source's
    function, and those refusals' names, from its safetensors metadata; None for an output that accepted none."""
    from phi_rules.source.header import read_metadata
    from phi_rules.write.output import ACCEPTED

    files = sorted(out.glob("*.safetensors"))
    recorded = read_metadata(files[0]).get(ACCEPTED) if files else None
    if not recorded:
        return None
    try:
        accepted = [(str(a["refusal"]), int(a["exact_up_to"])) for a in json.loads(recorded)]
    except (ValueError, TypeError, KeyError):
        raise PhiRulesError(f"{files[0]}: its metadata {ACCEPTED} is not what phi-rules writes") from None
    return min(n for _, n in accepted), [name for name, _ in accepted]


def verify(
    source: tuple[Path, ...],
    layout_name: str,
    config: dict[str, Any] | None,
    out: Path,
    tol: float,
    adapters: tuple[Path, Path] | None = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
    max_length: int | None = None,
) -> Report:
    """The source against the output, by the reference that fits the source's layout; ``max_length``: no probe
    longer than this many tokens (the output was made with a refusal accepted, exact up to that length)."""
    if layout_name in LAYOUTS:
        if max_length is not None:
            raise PhiRulesError(f"verify of the {layout_name} layout probes a fixed length: no limit can be kept")
        return verify_legacy(source, layout_name, config, out, tol, adapters, progress)
    folder = source[0].parent
    if REMOTE in (architecture(folder), architecture(out)):  # Phi-4-multimodal's remote code, on either side
        return verify_multimodal(folder, out, tol, adapters, progress, max_length)
    if layout_name in OWN_CLASS_LAYOUTS or _has_class(folder):
        return verify_own_class(folder, out, tol, adapters, progress, max_length)
    return verify_shapes(folder, layout_name, out)


def _has_class(folder: Path) -> bool:
    """Whether the source's config.json names an architecture transformers has a class for."""
    from phi_rules.planning.target import model_class

    name = architecture(folder)
    if name is None:
        return False
    try:
        model_class(name)
    except PhiRulesError:
        return False
    return True
