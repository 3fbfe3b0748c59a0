"""phi-rules: declarative YAML rules that convert original Phi checkpoints into transformers models.

The Python API mirrors the CLI::

    import phi_rules
    rules = phi_rules.load_rules("rules/phi-2.yaml")
    plan = phi_rules.plan(rules, phi_rules.Options(source=phi_rules.SourceOptions(source=Path("ckpt"))))
    phi_rules.convert(rules, "out/phi-2", phi_rules.Options(...))

Every failure caused by input raises :class:`PhiRulesError`, whose ``diagnostics`` locate each problem.
The names are imported when first used: ``import phi_rules`` costs nothing, so the ``phi-rules`` command
is answering Ctrl-C itself from its first milliseconds (no traceback from an import in progress).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phi_rules.errors import Diagnostic, PhiRulesError
    from phi_rules.language.rules import Rule, load_rules
    from phi_rules.options import Options, SourceOptions
    from phi_rules.pipeline import convert, plan

_WHERE = {
    "Diagnostic": "phi_rules.errors",
    "PhiRulesError": "phi_rules.errors",
    "Rule": "phi_rules.language.rules",
    "load_rules": "phi_rules.language.rules",
    "Options": "phi_rules.options",
    "SourceOptions": "phi_rules.options",
    "convert": "phi_rules.pipeline",
    "plan": "phi_rules.pipeline",
}
__all__ = ["Diagnostic", "Options", "PhiRulesError", "Rule", "SourceOptions", "convert", "load_rules", "plan"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'phi_rules' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
