"""The located YAML: libyaml's composer and the pure-Python one give the same documents, the same marks and
the same located errors; a text is parsed once per process."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi_rules.language import located_yaml
from phi_rules.language.located_yaml import YamlSyntaxError

FILES = sorted((ROOT / "rules").rglob("*.yaml")) + sorted((ROOT / "tests" / "broken").rglob("*.yaml"))
needs_libyaml = pytest.mark.skipif(not located_yaml.LIBYAML, reason="PyYAML was built without libyaml")


def parsed(text: str, libyaml: bool) -> object:
    """What one path makes of a text: the data and every mark, or the located error."""
    try:
        p = located_yaml._parsed(text, "f.yaml", libyaml)
    except YamlSyntaxError as exc:
        return ("error", exc.message, exc.line, exc.column)
    return (p.data, p.values, p.keys)


@needs_libyaml
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_both_composers_agree_on_every_rule_file(path: Path) -> None:
    text = path.read_text()
    assert parsed(text, True) == parsed(text, False)


TEXTS = [
    "a: 1\nb: [1, 2\n",  # an unclosed flow sequence
    "a: 1\n\tb: 2\n",  # a tab where indentation is
    "a: &x [1]\nb: *y\n",  # an unknown alias
    "a: 1\na: 2\n",  # a duplicate key (ours, after composing)
    "a: !!python/object:os.system x\n",  # an unsafe tag (ours)
    "- 1\n- 2\n--- 3\n",  # two documents
    "x: 1e-5\ny: '1e-5'\nz: 0x1f\n",  # YAML 1.2 floats, quoted strings, hex
    "a: 'unterminated\n",
    "{a: 1, {b: 2}: 3}\n",  # a mapping as a key (ours)
    "",
    "v\tersion: 1\n",  # a tab inside a plain scalar: libyaml keeps it, PyYAML refuses it
    "m: {o? ut: 1}\n",  # "? " inside a plain scalar in a flow mapping: the same
    "a: {b: }\n",  # an empty value in a flow mapping, which the two composers mark apart
]


@needs_libyaml
@pytest.mark.parametrize("text", TEXTS)
def test_both_composers_agree_on_odd_texts(text: str) -> None:
    assert parsed(text, True) == parsed(text, False)


@needs_libyaml
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(FILES),
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["\t", ":", "- ", "'", '"', "{", "]", "&a ", "*a", "\n  ", "#", "!!str ", "? "]),
)
def test_both_composers_agree_on_broken_texts(path: Path, at: int, insert: str) -> None:
    """A rule file with one piece of YAML syntax put anywhere: the same document or the same located error."""
    text = path.read_text()
    at %= len(text) + 1
    changed = text[:at] + insert + text[at:]
    assert parsed(changed, True) == parsed(changed, False)


def test_a_text_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that extends a base, and the backward rule derived from a forward one, reuse the parse."""
    from phi_rules.language.rules import load_rules

    composed: list[str] = []
    real = located_yaml._compose
    monkeypatch.setattr(located_yaml, "_compose", lambda text, libyaml: composed.append(text) or real(text, libyaml))
    located_yaml._parsed.cache_clear()
    for backward in (False, True, False):
        load_rules(ROOT / "rules" / "phi3" / "llama.yaml", backward=backward)
    texts = [p.read_text() for p in ((ROOT / "rules" / "phi3").glob("*.yaml"))] + [
        p.read_text() for p in (ROOT / "rules" / "layouts").glob("*.yaml")
    ]
    assert composed and len(composed) == len(set(composed)), "a text parsed twice"
    assert all(t in texts for t in composed)


def test_a_changed_file_is_parsed_again(tmp_path: Path) -> None:
    """The parse is remembered by the text, not by the file name: a rule edited in one process is read anew."""
    from phi_rules.language.rules import load_rules

    rule = tmp_path / "mine.yaml"
    for name in ("first", "second"):
        rule.write_text(f"version: 1\nname: {name}\nextends: {ROOT / 'rules' / 'phi-2.yaml'}\n")
        assert load_rules(rule).name == name


def test_a_document_that_passed_the_schema_is_not_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Detection checks every shipped rule each run: a document (data and schema) that passed is remembered in
    PHI_RULES_CACHE; any other document is checked."""
    import jsonschema

    from phi_rules.language.rules import check_text

    monkeypatch.setenv("PHI_RULES_CACHE", str(tmp_path / "cache"))
    text = (ROOT / "rules" / "phi-2.yaml").read_text().replace("name: phi-2", "name: remembered")
    path = ROOT / "rules" / "phi-2.yaml"
    assert check_text(text, "a.yaml", path) == []
    calls: list[object] = []
    real = jsonschema.Draft202012Validator
    monkeypatch.setattr(jsonschema, "Draft202012Validator", lambda *a: calls.append(a) or real(*a))
    assert check_text(text, "a.yaml", path) == [] and calls == []
    wrong = check_text(text + "unknown_key: 1\n", "a.yaml", path)
    assert len(calls) == 1 and [d.message.split(" (")[0] for d in wrong] == ["unknown key 'unknown_key'"]
