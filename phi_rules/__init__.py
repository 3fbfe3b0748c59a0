"""phi-rules: declarative YAML rules that convert original Phi checkpoints into transformers models.

The Python API mirrors the CLI::

    import phi_rules
    rules = phi_rules.load_rules("rules/phi-2.yaml")
    plan = phi_rules.plan(rules, phi_rules.Options(source=phi_rules.SourceOptions(source=Path("ckpt"))))
    phi_rules.convert(rules, "out/phi-2", phi_rules.Options(...))

Every failure caused by input raises :class:`PhiRulesError`, whose ``diagnostics`` locate each problem.
"""

from phi_rules.errors import Diagnostic, PhiRulesError
from phi_rules.language.rules import Rules, load_rules
from phi_rules.options import Options, SourceOptions
from phi_rules.pipeline import convert, plan

__all__ = ["Diagnostic", "Options", "PhiRulesError", "Rules", "SourceOptions", "convert", "load_rules", "plan"]
