"""``python -m phi_rules`` runs the CLI."""

from phi_rules.cli import run

run()
