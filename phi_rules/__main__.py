"""``python -m phi_rules`` runs the CLI."""

import sys

from phi_rules.cli import main

sys.exit(main())
