"""The rule language: shipped files are valid, every broken file is rejected with its location."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi_rules.errors import Diagnostic, PhiRulesError
from phi_rules.language import expr
from phi_rules.language.document import SCHEMA_PATH
from phi_rules.language.rules import check_file, check_text, load_rules, rule_files

pytestmark = pytest.mark.torch_free  # CI runs these on every Python it has, without torch

SHIPPED = rule_files([ROOT / "rules"])
BROKEN = sorted((ROOT / "tests" / "broken").glob("*.yaml"))


def test_shipped_rules_are_valid(cli) -> None:
    code, out, err = cli("validate", ROOT / "rules")
    assert (code, out) == (0, "")
    assert f"{len(SHIPPED)} file(s) checked, 0 error(s)" in err
    assert len(SHIPPED) >= 6


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_rules_start_with_schema_modeline(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert m, first
    assert (path.parent / m.group(1)).resolve() == SCHEMA_PATH


def test_broken_corpus_is_large_enough() -> None:
    assert len(BROKEN) >= 15


@pytest.fixture(params=["libyaml", "python"])
def composer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The located YAML from libyaml's composer, then from the pure-Python one: the same errors on both."""
    from phi_rules.language import located_yaml

    if request.param == "libyaml" and not located_yaml.LIBYAML:
        pytest.skip("PyYAML was built without libyaml")
    monkeypatch.setattr(located_yaml, "LIBYAML", request.param == "libyaml")
    return str(request.param)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_file_is_rejected_with_location(path: Path, cli, composer: str) -> None:
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    line, col, pointer, message = re.fullmatch(r"(\d+):(\d+): ([^:]*): (.*)", expect).groups()  # type: ignore[union-attr]
    found = check_file(path)
    assert any(
        (d.line, d.column, d.pointer or "", d.file) == (int(line), int(col), pointer, str(path))
        and d.message.startswith(message)
        for d in found
    ), [str(d) for d in found]
    code, out, err = cli("validate", path)
    assert code == 1
    assert "Traceback" not in out + err
    prefix = f"{path}:{line}:{col}: " + (f"{pointer}: " if pointer else "")
    assert any(row.startswith(prefix + message) for row in out.splitlines()), out
    with pytest.raises(PhiRulesError) as info:
        load_rules(path)
    assert [str(d) for d in info.value.diagnostics] == [str(d) for d in found]


def test_all_errors_of_all_files_in_one_run_as_json(cli) -> None:
    code, out, _ = cli("validate", ROOT / "tests" / "broken", ROOT / "rules", "--format", "json")
    assert code == 1
    rows = json.loads(out)
    cycle = (ROOT / "tests" / "broken" / "cycle").glob("*.yaml")
    assert {r["file"] for r in rows} == {str(p) for p in [*BROKEN, *cycle]}
    assert all(set(r) == {"message", "file", "line", "column", "pointer", "code"} for r in rows)
    assert len(rows) >= len(BROKEN)


def test_validate_exits_zero_as_json_when_clean(cli) -> None:
    code, out, _ = cli("validate", ROOT / "rules" / "phi-2.yaml", "--format", "json")
    assert (code, json.loads(out)) == (0, [])


def test_missing_file_is_a_located_error_not_a_traceback(cli, tmp_path: Path) -> None:
    code, out, err = cli("validate", tmp_path / "nope.yaml")
    assert code == 1 and "cannot read rule file" in out and "Traceback" not in err


def _check_jsonschema_passes(path: Path) -> bool:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    run = subprocess.run([exe, "--schemafile", str(SCHEMA_PATH), str(path)], capture_output=True, text=True)
    assert run.returncode in (0, 1), run.stderr
    return run.returncode == 0


@pytest.mark.parametrize("path", SHIPPED + BROKEN, ids=lambda p: p.stem)
def test_independent_validator_agrees_with_schema_verdict(path: Path) -> None:
    ours = not any(d.code in ("yaml", "schema") for d in check_file(path))
    assert _check_jsonschema_passes(path) == ours


def test_schema_documents_every_property() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"].endswith("2020-12/schema") and schema["$id"]

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, where
            for name, prop in node.get("properties", {}).items():
                assert prop.get("title") and prop.get("description"), f"{where}/{name}"
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "")


def test_schema_command_prints_the_schema(cli) -> None:
    code, out, _ = cli("schema")
    assert code == 0 and json.loads(out) == json.loads(SCHEMA_PATH.read_text())


def test_list_shows_shipped_rules(cli) -> None:
    code, out, _ = cli("list")
    assert code == 0
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert rows["phi-2"] == ["phi-msft", "rules/phi-2.yaml"] and "phi-to-transformers-4.36" in rows
    assert rows["llama-to-phi3"] == ["llama", "rules/phi3/llama.yaml"]  # a derived backward rule, by name
    code, out, _ = cli("list", "--json")
    listed = {r["file"]: r for r in json.loads(out)}
    by_name = {r["name"]: r for r in json.loads(out) if r["name"]}
    assert code == 0 and by_name["phi-transformers-4.36"]["layout"] == "transformers-4.36"
    assert by_name["phi-to-transformers-4.36"]["derived_from"] == "phi-transformers-4.36"
    assert listed["rules/layouts/phi-msft.yaml"]["name"] is None  # the abstract base
    assert by_name["phi3-to-llama"]["one_way"] is None  # it runs backward as llama-to-phi3
    assert by_name["llama-to-phi3"]["derived_from"] == "phi3-to-llama"
    assert by_name["phi-2"]["one_way"] is None and by_name["phi-to-phi-msft"]["derived_from"] == "phi-2"
    assert by_name["phi-to-mixformer-sequential"]["derived_from"] == "phi-1_5-mixformer-sequential"
    assert by_name["phi-msft-adapter"]["one_way"] is None and "phi-adapter-to-phi-msft" in by_name
    assert by_name["llama-adapter-to-phi3"]["one_way"].startswith("fuses modules (target.adapter.fused)")
    assert by_name["phi-1"]["one_way"] == "it has no reverse section"


def test_schema_output_file_and_version(cli, tmp_path: Path) -> None:
    assert cli("schema", "--output", tmp_path / "s.json")[0] == 0
    assert json.loads((tmp_path / "s.json").read_text())["$id"] == json.loads(SCHEMA_PATH.read_text())["$id"]
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == "phi-rules 0.2.0"


# --- the validator never raises anything but its own error type -----------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=25,
)
VALID_TEXTS = [p.read_text() for p in SHIPPED]


def _assert_only_diagnostics(text: str) -> None:
    found = check_text(text, "fuzz.yaml")
    assert all(isinstance(d, Diagnostic) and d.message for d in found)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_yaml_documents(doc: object) -> None:
    _assert_only_diagnostics(yaml.safe_dump(doc))


def _mutate(data: object, path: list[int], value: object, delete: bool) -> object:
    """Replace (or delete) the node that ``path`` leads to, indices wrapping around at each level."""
    if not path or not isinstance(data, dict | list) or not data:
        return value
    head, *rest = path
    copy = dict(data) if isinstance(data, dict) else list(data)
    key = list(copy)[head % len(copy)] if isinstance(copy, dict) else head % len(copy)
    if delete and not rest:
        del copy[key]
    else:
        copy[key] = _mutate(copy[key], rest, value, delete)
    return copy


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID_TEXTS),
    st.lists(st.integers(0, 50), min_size=1, max_size=6),
    st.one_of(scalars, documents),
    st.booleans(),
)
def test_mutated_valid_rules(text: str, path: list[int], value: object, delete: bool) -> None:
    data = yaml.safe_load(text)
    _assert_only_diagnostics(yaml.safe_dump(_mutate(data, path, value, delete)))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID_TEXTS), st.integers(0, 10_000), st.integers(0, 40), st.text(max_size=8))
def test_text_splices_of_valid_rules(text: str, at: int, cut: int, insert: str) -> None:
    at %= len(text)
    _assert_only_diagnostics(text[:at] + insert + text[at + cut :])


def test_extends_cycle_through_two_files_is_located_where_it_closes(cli) -> None:
    a, b = ROOT / "tests" / "broken" / "cycle" / "a.yaml", ROOT / "tests" / "broken" / "cycle" / "b.yaml"
    (found,) = check_file(a)
    assert (found.file, found.line, found.column, found.pointer) == (str(b), 3, 10, "extends")
    assert found.message == "extends cycle: a.yaml -> b.yaml -> a.yaml"


def test_extends_merges_and_edits_steps_by_name(tmp_path: Path) -> None:
    base = ROOT / "rules" / "phi-2.yaml"
    variant = tmp_path / "v.yaml"
    variant.write_text(
        f"version: 1\nname: v\nextends: {base}\n"
        "source: {config_defaults: {n_embd: 64}}\n"
        "target: {config: {hidden_act: '\"gelu\"'}}\n"
        "edit_steps:\n"
        "  - {name: drop-rotary-buffers, remove: true}\n"
        "  - {name: first, before: split-qkv, drop: 'x', optional: true}\n"
        "  - {name: split-qkv, after: names, drop: 'y', optional: true}\n"
    )
    rules = load_rules(variant)
    assert [s.name for s in rules.steps] == ["first", "names", "split-qkv"]
    assert rules.source.repo == "microsoft/phi-2" and rules.source.config_defaults["n_embd"] == 64
    assert rules.source.config_defaults["n_layer"] == 32  # merged deeply, not replaced
    assert rules.target.config["hidden_act"] == expr.Const("gelu")
    assert rules.target.config_where["hidden_act"].file == str(variant)
    assert rules.target.config_where["hidden_size"].file.endswith("layouts/phi-msft.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"version: 1\nname: v\nextends: {base}\nedit_steps:\n  - {{name: n, after: nmes, drop: x}}\n")
    (problem,) = check_file(bad)
    assert (
        str(problem) == f"{bad}:5:22: edit_steps/0/after: no step named 'nmes' to insert after; did you mean 'names'?"
    )


def test_short_form_is_the_documented_regex_form() -> None:
    from phi_rules.language import shortform

    regex, kinds = shortform.pattern("transformer.h.{i}.mlp.{fc:fc1|fc2}.{p}", {"i": "int"})
    assert regex == r"transformer\.h\.(?P<i>\d+)\.mlp\.(?P<fc>fc1|fc2)\.(?P<p>[^.]+)"
    assert kinds == {"i": "int", "fc": "text", "p": "text"}
    assert shortform.target("model.layers.{i - 1}.mlp.{fc}.{p}", kinds, ()) == r"model.layers.{i - 1}.mlp.\g<fc>.\g<p>"
    assert shortform.pattern("a.{x:int}", {})[1] == {"x": "int"}
    assert shortform.pattern("a.{i}.{layer}", {"layer": "int"})[1] == {"i": "text", "layer": "int"}  # not by letter


def test_a_copied_shipped_rule_validates_elsewhere(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its relative base is not beside the copy: the shipped one is used, and a note says so."""
    for shipped in ("phi-2.yaml", "phi3/mistral.yaml"):
        (tmp_path / Path(shipped).name).write_text((ROOT / "rules" / shipped).read_text())
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("validate", "phi-2.yaml", "mistral.yaml")
    assert code == 0, out + err
    assert "phi-2.yaml:5:10: note: layouts/phi-msft.yaml is not beside this file: using the shipped" in err
    assert "mistral.yaml:4:10: note: llama.yaml is not beside this file: using the shipped phi3/llama.yaml" in err


@pytest.mark.parametrize("name", ["phi-2", "phi-1_5-mixformer", "llama-to-phi3"])
def test_validate_takes_a_shipped_rule_by_name_or_file_stem(cli, name: str) -> None:
    code, out, err = cli("validate", name)
    assert code == 0 and "1 file(s) checked, 0 error(s)" in err, out + err


def test_a_local_path_replaces_an_inherited_hub_source(cli, tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="plan checks against the target class")
    rule = tmp_path / "mine.yaml"
    rule.write_text(f"version: 1\nname: mine\nextends: phi-2\nsource: {{path: {ROOT / 'rules/examples/tiny-phi-2'}}}\n")
    assert cli("validate", rule)[0] == 0
    code, out, err = cli("plan", rule, "--json", "--quiet")
    assert code == 0 and json.loads(out)["rule"] == "mine", err


def test_exponent_numbers_are_numbers(cli, tmp_path: Path) -> None:
    """YAML 1.1 reads 1e-5 as a string; rules read it as YAML 1.2 does, a number, and the model gets it.
    (A config_defaults value is data, not an expression: only the YAML reading makes it a number.)"""
    pytest.importorskip("torch", reason="plan checks against the target class")
    rule = tmp_path / "eps.yaml"
    tiny = ROOT / "rules" / "examples" / "tiny-phi-2"
    rule.write_text(
        f"version: 1\nname: eps\nextends: phi-2\nsource: {{path: {tiny}, config_defaults: {{my_eps: 1e-5}}}}\n"
        "target: {config: {layer_norm_eps: my_eps}}\n"
    )
    assert cli("validate", rule)[0] == 0
    code, out, err = cli("plan", rule, "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["config"]["layer_norm_eps"] == 1e-5
