"""``detect`` answers first and briefly, and every failure answers with its cause, once: models of other
architectures (made with transformers' own classes) get one line that says no rule reads them and what they
are; a config.json that is missing or not JSON is one line; every command an answer or error suggests runs as
written."""

from __future__ import annotations

import json
import shlex
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_phi3 import FAMILY, phi3_model, save

Cli = Callable[..., tuple[int, str, str]]


def tiny(kind: str, folder: Path) -> Path:
    """A tiny random model of another architecture, saved by transformers."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GemmaConfig,
        GemmaForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    sizes = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    sizes |= {"num_key_value_heads": 2, "intermediate_size": 48}
    made: dict[str, Callable[[], torch.nn.Module]] = {
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**sizes)),
        "gemma": lambda: GemmaForCausalLM(GemmaConfig(**sizes, head_dim=8)),
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**sizes, head_dim=8)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)),
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made[kind]().save_pretrained(folder)
    return folder


ARCHITECTURES = {
    "qwen2": "model_type qwen2, Qwen2ForCausalLM",
    "gemma": "model_type gemma, GemmaForCausalLM",
    "gemma2": "model_type gemma2, Gemma2ForCausalLM",
    "gpt2": "model_type gpt2, GPT2LMHeadModel",
}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_another_architecture_is_named_in_one_line(cli: Cli, tmp_path: Path, kind: str) -> None:
    src = tiny(kind, tmp_path / "src")
    code, out, _ = cli("detect", src)
    assert code == 1 and len(out.splitlines()) == 1, out
    assert out.startswith(f"{src}: no shipped rule reads this source ({ARCHITECTURES[kind]}"), out
    for to in ([], ["--to", "phi3"], ["--to", "llama"]):
        code, _, err = cli("apply", "--source", src, *to, "--out", tmp_path / "out")
        assert code == 1 and len(err.splitlines()) == 1, err
        assert f"no shipped rule reads this source ({ARCHITECTURES[kind]}" in err, err
        assert "refused" not in err and "use the rule for that type" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_rule_for_another_model_type_is_not_its_answer(cli: Cli, tmp_path: Path) -> None:
    """A Gemma has Llama's tensor names: llama-to-phi3 reads them and refuses the model type. That is not the
    answer: no rule reads a Gemma."""
    src = tiny("gemma", tmp_path / "src")
    code, out, _ = cli("detect", src, "--to", "phi3")
    assert code == 1 and "no shipped rule reads this source" in out, out
    assert out.strip().endswith(
        "the closest is llama-to-phi3: every tensor name matches, but it reads the llama layout, not model_type gemma"
    ), out
    code, out, _ = cli("detect", src, "--json")
    answer = json.loads(out)["answer"]
    assert code == 1 and len(answer) == 1 and "no shipped rule reads this source" in answer[0]


@pytest.mark.parametrize("problem", ["not-json", "not-an-object", "missing"])
@pytest.mark.parametrize("command", ["detect", "apply", "plan"])
def test_a_bad_config_is_one_line_naming_it(cli: Cli, tmp_path: Path, problem: str, command: str) -> None:
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    config = src / "config.json"
    if problem == "missing":
        config.unlink()
    else:
        config.write_text("{not json" if problem == "not-json" else "[1, 2]")
    args = {"detect": ["detect", src], "apply": ["apply", "--source", src, "--to", "llama", "--out", tmp_path / "o"]}
    code, out, err = cli(*args.get(command, ["plan", "--source", src, "--to", "llama"]))
    lines = (out + err).strip().splitlines()
    assert code == 1 and len(lines) == 1, out + err
    assert str(config) in lines[0], lines
    if problem == "missing":
        assert f"{config}: not found: rule " in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_a_named_rule_on_a_source_without_its_config_says_so(cli: Cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    (src / "config.json").unlink()
    code, _, err = cli("apply", ROOT / "rules" / "phi3" / "llama.yaml", "--source", src, "--out", tmp_path / "o")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(err.splitlines()) <= 3, err  # the notes on what the folder lacks, and the error
    assert errors == [line for line in errors if line.startswith(f"error: {src / 'config.json'}: not found: ")]
    assert len(errors) == 1 and "rule phi3-to-llama" in errors[0], err


def suggested(text: str) -> list[list[str]]:
    """Every ``phi-rules …`` command in a text, as argument lists (a command runs to the end of its line or
    to a closing parenthesis, a semicolon or a comma)."""
    found = []
    for line in text.splitlines():
        for part in line.split("phi-rules ")[1:]:
            command = part.split("  (")[0].split(";")[0].split(",")[0].rstrip(")")
            found.append(shlex.split(command))
    return found


def runs(cli: Cli, command: list[str]) -> None:
    code, out, err = cli(*command)
    assert code in (0, 1), (command, out, err)
    assert "unrecognized arguments" not in err and "Traceback" not in err, (command, err)
    if command[0] == "apply":
        assert code == 0, (command, err)


def test_every_command_detect_suggests_runs(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sources = {
        "phi-4": save(phi3_model(FAMILY["phi-4"]), tmp_path / "phi 4"),  # two targets, and a space in the path
        "phi-3-mini-4k": save(phi3_model(FAMILY["phi-3-mini-4k"]), tmp_path / "mini"),  # one refused
    }
    commands = []
    for src in sources.values():
        code, out, _ = cli("detect", src)
        assert code == 0 and len(out.splitlines()) <= 10, out
        commands += suggested(out)
    assert commands and all(c[0] == "apply" for c in commands), commands
    for command in commands:
        runs(cli, command)
    converted = next(p for p in tmp_path.iterdir() if p.name.endswith("-llama"))
    code, out, _ = cli("detect", converted)  # a Llama: to phi3
    assert code == 0 and out.splitlines()[-1].startswith("run: phi-rules apply --source"), out
    for command in suggested(out):
        runs(cli, command)
    code, out, _ = cli("apply", "--source", sources["phi-4"], "--to", "phi3", "--out", "today")
    code, out, _ = cli("detect", "today")  # today's layout: nothing to do, or back


def test_every_command_an_error_suggests_runs(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    errors = []
    for args in (
        ["apply", "--source", src, "--out", "o1"],  # two targets: pick one
        ["plan", "--source", src, "--to", "lama"],  # a typo
        ["apply", "--source", tmp_path, "--out", "o2"],  # no weights
    ):
        code, _, err = cli(*args)
        assert code == 1, err
        errors.append(err)
    assert "--rules FILE" not in "".join(errors)
    for command in [c for err in errors for c in suggested(err)]:
        runs(cli, command)


def test_detect_rules_takes_one_file_per_flag_and_the_source_anywhere(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"version: 1\nname: mine\nextends: {ROOT / 'rules' / 'phi3' / 'llama.yaml'}\n")
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(f"version: 1\nname: theirs\nextends: {ROOT / 'rules' / 'phi3' / 'mistral.yaml'}\n")
    for args in (["--rules", mine, src], [src, "--rules", mine], ["--rules", mine, "--rules", theirs, src]):
        code, out, err = cli("detect", *args, "--all")
        assert code in (0, 1) and "unrecognized" not in err, err
        rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
        assert "yes, yours" in rows["mine"], out
    code, out, _ = cli("detect", "--rules", mine, src)
    assert code == 0 and f"{src}: your rule mine fits" in out, out
    (command,) = suggested(out)
    assert str(mine) in command
    runs(cli, command)


def test_detect_help_says_what_the_exit_status_is(cli: Cli, tmp_path: Path) -> None:
    """Two fitting rules (one per target) exit 0, as the help says."""
    _, out, _ = cli("detect", "--help")
    flat = " ".join(out.split())
    assert "Exit 0 when there is one command to run (one rule fits, or one per target" in flat, flat
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    code, out, _ = cli("detect", src)
    assert code == 0 and sum(" fits" in line for line in out.splitlines()) == 2, out


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        (r"model\.layers\.(?P<i>\d+)\.mlp", "model.layers."),
        (r"lm_head(?P<_under>(?:\.[^.]+)*)", "lm_head"),
        (r"a\.b|c", ""),  # alternatives at the top level: nothing common
        (r"ab(c|d)", "ab"),
        (r"[a|b]x", ""),
        (r"abc?d", "ab"),  # c is optional
        (r"abc*", "ab"),
        (r"abc{0,2}", "ab"),
        (r"ab+c", "ab"),  # b at least once, then anything
        (r"a\d", "a"),
        (r".*\.inv_freq", ""),
    ],
)
def test_literal_prefix(pattern: str, prefix: str) -> None:
    from phi_rules.language.regex import literal_prefix

    assert literal_prefix(pattern) == prefix


def test_ruling_out_changes_no_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules detection rules out without planning them, or plans on the names they may read, get the
    verdict their whole plan would give."""
    from phi_rules import detect as detection
    from phi_rules.options import Options, SourceOptions

    sources = [save(phi3_model(FAMILY["phi-4"]), tmp_path / "phi-4"), tiny("qwen2", tmp_path / "qwen2")]
    sources.append(tiny("gpt2", tmp_path / "gpt2"))  # transformer.h.N: phi-msft's prefixes, planned in part
    for src in sources:
        options = Options(source=SourceOptions(src))
        quick = detection.detect(src, options).fits
        monkeypatch.setattr(detection, "may_read", lambda rules, names: None)  # every rule planned on every name
        planned = detection.detect(src, options).fits
        monkeypatch.undo()
        assert any(f.plan is None for f in quick)  # some were ruled out, and not those that read the source
        assert [f.rules.name for f in quick if f.fits] == (
            ["phi3-to-llama", "phi3-to-mistral"] if src.name == "phi-4" else []
        )
        assert [(f.rules.name, f.reason, f.reads, f.unconsumed) for f in quick] == [
            (f.rules.name, f.reason, f.reads, f.unconsumed) for f in planned
        ]


def test_a_rule_is_planned_on_the_names_its_steps_and_values_read() -> None:
    """The names a rule may read are those its steps' patterns can match and those its dim()/max_index()
    read (a value planned without them would differ); a name neither reaches is left out of its plan."""
    from phi_rules.detect import may_read
    from phi_rules.language.rules import load_ref

    rule = load_ref("phi-msft-adapter")
    step = "base_model.model.transformer.h.0.mixer.Wqkv.lora_A.weight"
    value = "elsewhere.fc1.lora_B.weight"  # read by intermediate_size's dim(), by no step
    assert may_read(rule, sorted([step, value, "unrelated.weight"])) == {step, value}
    assert may_read(rule, ["unrelated.weight", value]) == set()  # no step reads any: ruled out


def test_apply_reads_and_plans_the_source_once(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection resolves the source and plans each candidate; the conversion it picks reuses both, unless
    --dtype (or --set) changes the plan."""
    from safetensors import safe_open

    from phi_rules import detect as detection
    from phi_rules import pipeline

    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    entered: list[object] = []
    real = detection.detect
    monkeypatch.setattr(detection, "detect", lambda *a, **k: entered.append(a) or real(*a, **k))

    def resolve_again(*_: object) -> None:
        raise AssertionError("the source was resolved again")

    monkeypatch.setattr(pipeline, "resolve", resolve_again)
    monkeypatch.setattr(pipeline, "make_plan", resolve_again)
    code, _, err = cli("apply", "--source", src, "--to", "llama", "--out", tmp_path / "out", "--quiet")
    assert code == 0 and len(entered) == 1, err
    monkeypatch.undo()
    code, _, err = cli("apply", "--source", src, "--to", "llama", "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}  # noqa: SIM118 - no iteration


def test_detect_to_a_target_no_rule_writes(cli: Cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    code, out, err = cli("detect", src, "--to", "lama")
    assert code == 1 and out == "" and err.startswith("error: --to lama: no rule writes that; did you mean 'llama'?")
