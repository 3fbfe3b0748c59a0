"""A target check remembered, so that a conversion of a shape seen before imports neither transformers nor torch.

What the check proves (the config builds, the class's parameters are the plan's names and shapes, the
model uses the values ``target.uses`` says the source means) and the config files it writes depend only on
the rule (its text with its bases, and its direction), the planned outputs and config, the values
``target.uses`` compares, the output dtype, the transformers version and phi-rules' own checking code: the
key holds each of them, so that a plan that differs in any of them is checked again. Once a check has
passed, the files it wrote are kept under that key beside the remembered digests (``PHI_RULES_CACHE``); a
conversion with the same key writes them again byte for byte instead of importing transformers (2-3 s of a
core). A plan with any problem never gets here: only passed checks are remembered.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from phi_rules.planning.planner import Plan
from phi_rules.source.digest import cache_folder, write_atomically

_CHECKING_CODE = ("planning/target.py", "write/config.py", "write/output.py", "planning/remembered.py")
# generation_config.json is no part of the check: it is the source's, carried (or derived from config.json)
# after the config is written, on a first run and a remembered one alike.
FILES = ("config.json", "adapter_config.json")


def key(plan: Plan, dtype: str | None) -> str | None:
    """The check's identity, or None when it is not remembered: for adapters (small; their check needs PEFT)
    and where transformers is not installed as a distribution."""
    if plan.adapter_config is not None or plan.parts:  # parts: adapters too
        return None
    try:
        versions = [metadata.version(d) for d in ("transformers", "huggingface_hub")]
    except metadata.PackageNotFoundError:
        return None
    package = Path(__file__).resolve().parent.parent
    code = hashlib.sha256(b"".join((package / f).read_bytes() for f in _CHECKING_CODE)).hexdigest()
    identity = {
        "rule": plan.rules.sha256,
        "backward": plan.rules.backward,
        "config": plan.config,
        "uses": plan.uses,  # what the model must compute with: the same config may mean another rotary size
        "dtype": dtype,
        "tensors": [(t.name, list(t.shape), t.dtype) for t in plan.tensors],
        "versions": versions,
        "code": code,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _entry(check: str) -> Path | None:
    folder = cache_folder()
    return None if folder is None else folder / "checked" / f"{check}.json"


def recall(check: str | None) -> dict[str, str] | None:
    """The config files a passed check wrote, by file name; None when it is not remembered."""
    entry = _entry(check) if check else None
    try:
        files = json.loads(entry.read_text()) if entry is not None else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(files, dict) and files and all(k in FILES and isinstance(v, str) for k, v in files.items())
    return files if ok else None


def remember(check: str | None, folder: Path) -> None:
    """Keep the config files a passed check wrote into ``folder``; best effort, like the digest cache."""
    entry = _entry(check) if check else None
    if entry is not None:
        files = {name: (folder / name).read_text() for name in FILES if (folder / name).is_file()}
        write_atomically(entry, json.dumps(files))
