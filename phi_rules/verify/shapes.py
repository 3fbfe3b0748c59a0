"""What verify checks where nothing can run the source: a layout with no reference here, whose
config.json names no class transformers has. No function check is possible then (q and k swapped would
pass), so the report says so in one line, and checks that the output is what its own class loads: every
tensor it needs, by name and shape, and nothing else."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from phi_rules.verify.common import Converted, Report, Row


def verify_shapes(source: Path, layout_name: str, out: Path) -> Report:
    try:
        names = json.loads((source / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        names = None
    with ExitStack() as stack:
        conv = Converted(out, stack)
        cls = type(conv.model).__name__
        want = {k: tuple(v.shape) for k, v in conv.model.state_dict().items()}
        if getattr(conv.model.config, "tie_word_embeddings", False):
            want.pop("lm_head.weight", None)
        have = {k: t.shape for k, t in conv.files.tensors.items()}
    problems = [f"{k} is missing" for k in want if k not in have]
    problems += [
        f"{k} is {list(have[k])}, {cls} needs {list(v)}" for k, v in want.items() if k in have and have[k] != v
    ]
    problems += [f"{k} is not {cls}'s" for k in have if k not in want]
    shown = "the source's layout" if not layout_name else f"layout {layout_name!r}"
    checked = (
        f"no function check is possible: verify has no reference for {shown} and the source's config.json names "
        f"no class transformers has (architectures: {names}); checked instead: every tensor of the output by "
        f"name and shape against {cls} ({len(want)} tensors)"
    )
    row = Row("shapes", float("inf") if problems else 0.0, 0.0, "; ".join(problems[:3]) or "ok")
    return Report([row], [], None, checked, reference=cls)
