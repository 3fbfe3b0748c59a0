"""Regenerate phi_rules/language/config_fields.json, the fields of every causal-LM config class of the installed
transformers (run from the repo root): ``validate`` checks a rule's ``target.config`` keys against it without
importing transformers or torch. A test regenerates it and compares, so the committed table is this script's
output for the transformers that CI installs.

Each architecture maps to its config class' name and the fields that class knows beyond those every config
class knows (``common``), as the target check at ``plan`` time reads them: the class' own (``_known_fields``) and
those its modeling code reads (``read_by_code``; the module's text is read, not imported).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import warnings
from importlib import metadata
from pathlib import Path

from transformers.models.auto import configuration_auto, modeling_auto
from transformers.utils import logging as transformers_logging

from phi_rules.planning.target import _known_fields, read_by_code

TABLE = Path(__file__).resolve().parent.parent / "phi_rules" / "language" / "config_fields.json"


def table() -> str:
    """The table's text: one line per architecture, sorted, so that a new transformers shows as a small diff."""
    transformers_logging.set_verbosity_error()  # default configs whose token ids fall outside their vocabulary
    found: dict[str, tuple[str, set[str]]] = {}
    for model_type, classes in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        name = configuration_auto.CONFIG_MAPPING_NAMES.get(model_type)
        short = configuration_auto.model_type_to_module_name(model_type)
        module = f"transformers.models.{short}"
        try:
            cls = getattr(importlib.import_module(module), str(name))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fields = _known_fields(cls)
        except Exception:  # a config class that cannot build its own defaults: plan checks it alone
            continue
        spec = importlib.util.find_spec(f"{module}.modeling_{short}")
        if spec is not None and spec.origin is not None:
            fields |= read_by_code(Path(spec.origin).read_text(encoding="utf-8"))
        for architecture in classes if isinstance(classes, list | tuple) else (classes,):
            found[architecture] = (str(name), fields)
    common = set.intersection(*(f for _, f in found.values()))
    lines = [f"    {json.dumps(a)}: {json.dumps([name, sorted(f - common)])}" for a, (name, f) in sorted(found.items())]
    version = json.dumps(metadata.version("transformers"))
    return (
        f'{{\n  "transformers": {version},\n  "common": {json.dumps(sorted(common))},\n  "architectures": {{\n'
        + ",\n".join(lines)
        + "\n  }\n}\n"
    )


if __name__ == "__main__":
    (Path(sys.argv[1]) if len(sys.argv) > 1 else TABLE).write_text(table())
