"""``validate`` checks ``target.config`` keys against the target's config class without torch (#34): from a table
committed with the package, which must be what transformers says today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.torch_free

TYPO = (
    "version: 1\nname: typo\nextends: phi3-to-llama\ntarget:\n  config:\n    num_key_value_head: num_key_value_heads\n"
)


SHIPPED = ("PhiForCausalLM", "Phi3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Phi4MultimodalForCausalLM")


def test_the_committed_table_is_what_transformers_says() -> None:
    """Under the transformers it was made with, the table is exactly what it says; under another release (CI
    installs the newest), every architecture the shipped rules write still has the same fields: a new release
    that changes one of those fails here, one that changes only other models does not."""
    pytest.importorskip("torch", reason="regenerating the table needs transformers' config classes, and torch")
    import json
    from importlib import metadata

    from make_config_fields import TABLE, table

    committed, now = json.loads(TABLE.read_text()), table()
    if committed["transformers"] == metadata.version("transformers"):
        assert TABLE.read_text() == now, "regenerate it: python tests/make_config_fields.py"
    fresh = json.loads(now)
    for architecture in SHIPPED:
        (cls, fields), (now_cls, now_fields) = (
            committed["architectures"][architecture],
            fresh["architectures"][architecture],
        )
        had, has = {*fields, *committed["common"]}, {*now_fields, *fresh["common"]}
        assert (cls, had) == (now_cls, has), (architecture, had ^ has)


def test_a_typo_in_target_config_fails_validate_at_its_line(cli, tmp_path: Path) -> None:
    rule = tmp_path / "typo.yaml"
    rule.write_text(TYPO)
    code, out, _ = cli("validate", rule)
    assert code == 1
    assert f"{rule}:6:25: target/config/num_key_value_head: LlamaConfig has no field 'num_key_value_head'" in out
    assert "did you mean 'num_key_value_heads'?" in out


def test_a_copied_field_the_target_lacks_fails_validate(cli, tmp_path: Path) -> None:
    rule = tmp_path / "copy.yaml"
    rule.write_text("version: 1\nname: copy\nextends: phi3-to-llama\ntarget:\n  copy: [vocab_size, hiden_act]\n")
    code, out, _ = cli("validate", rule)
    assert code == 1 and f"{rule}:5:22: target/copy/1: LlamaConfig has no field 'hiden_act'" in out, out


def test_validate_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    rule = tmp_path / "typo.yaml"
    rule.write_text(TYPO)
    probe = (
        "import sys; from phi_rules.language.rules import check_file; "
        f"assert check_file({str(rule)!r}); print(sorted(m for m in sys.modules if m in ('torch', 'transformers')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
