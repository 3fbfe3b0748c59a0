"""Every legacy layout converts with no rule named: detection picks the rule, and the output computes
the original function. Checkpoints are random, in each layout, made by tests/phi_reference.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from phi_reference import (
    MsftConfig,
    assert_same_function,
    config_436,
    random_state,
    to_mixformer,
    to_transformers_436,
    write_checkpoint,
)
from safetensors.torch import load_file

import phi_rules

HEAD64 = MsftConfig(vocab_size=80, n_embd=128, n_layer=2, n_head=2, rotary_dim=32)
HEAD80 = MsftConfig(vocab_size=80, n_embd=160, n_layer=2, n_head=2, rotary_dim=32, n_inner=200)


def msft(folder: Path, state: dict[str, torch.Tensor], cfg: MsftConfig, fmt: str, shards: int) -> Path:
    return write_checkpoint(folder, state, cfg, fmt, shards)


def mixformer(folder: Path, state: dict[str, torch.Tensor], cfg: MsftConfig, fmt: str, shards: int) -> Path:
    return write_checkpoint(folder, to_mixformer(state, cfg.n_layer), cfg, fmt, shards)


def transformers_436(folder: Path, state: dict[str, torch.Tensor], cfg: MsftConfig, fmt: str, shards: int) -> Path:
    write_checkpoint(folder, to_transformers_436(state, cfg), None, fmt, shards)
    (folder / "config.json").write_text(json.dumps(config_436(cfg), indent=2))
    return folder


CANDIDATES = 25  # 3 legacy layouts and back to each, 3 legacy adapter layouts and back to 2, today's Phi and
# today's Phi adapters, Phi3 to and from Llama/Mistral, 2024 Phi3, Phi3 adapters to Llama's and Mistral's names and back
# and Phi-4-multimodal (text, native and back) and Phi-3/3.5-vision


def table(out: str) -> list[str]:
    """The rows of detect's table (between its header and the blank line)."""
    return out.split("\n\n")[0].splitlines()[1:]


Writer = Callable[[Path, dict[str, torch.Tensor], MsftConfig, str, int], Path]
LAYOUTS: dict[str, tuple[Writer, str]] = {
    "phi-msft": (msft, "phi-2"),
    "mixformer-sequential": (mixformer, "phi-1_5-mixformer-sequential"),
    "transformers-4.36": (transformers_436, "phi-transformers-4.36"),
}
CASES = [
    ("bin-fp32-head64", HEAD64, torch.float32, "bin", 1),
    ("safetensors-fp16-head80", HEAD80, torch.float16, "safetensors", 1),
    ("sharded-bf16-head80", HEAD80, torch.bfloat16, "safetensors", 3),
    ("sharded-fp32-head64", HEAD64, torch.float32, "safetensors", 2),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("cfg", "dtype", "fmt", "shards"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_converts_with_no_rule_named(
    cli, tmp_path: Path, layout: str, cfg: MsftConfig, dtype: torch.dtype, fmt: str, shards: int
) -> None:
    write, rule = LAYOUTS[layout]
    state = random_state(cfg, dtype, inv_freq=fmt == "bin", seed=3)
    src = write(tmp_path / "src", state, cfg, fmt, shards)
    code, out, err = cli("detect", src, "--all")
    assert code == 0, out + err
    assert [row.split()[0] for row in table(out) if row.split()[3:4] == ["yes"]] == [rule]
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert_same_function(tmp_path / "out", state, cfg)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["partial_rotary_factor"] == pytest.approx(cfg.rotary_dim / cfg.head_dim)


def test_plan_without_a_rule(cli, tmp_path: Path) -> None:
    src = mixformer(tmp_path / "src", random_state(HEAD64, seed=1), HEAD64, "safetensors", 1)
    code, out, err = cli("plan", "--source", src, "--json")
    assert code == 0, err
    assert json.loads(out)["rule"] == "phi-1_5-mixformer-sequential"


def test_seed_round_trip_is_bit_identical_to_the_direct_conversion(cli, tmp_path: Path) -> None:
    """original -> the 4.36 layout, as the seed wrote it -> 4.36 rule == original -> phi-2 rule."""
    state = random_state(HEAD80, torch.float16, inv_freq=True, seed=21)
    src = msft(tmp_path / "src", state, HEAD80, "bin", 1)
    to_436 = ["--to", "transformers-4.36", "--out", tmp_path / "seed", "--quiet"]
    assert cli("apply", "--source", src, *to_436)[0] == 0
    assert cli("apply", "--source", tmp_path / "seed", "--out", tmp_path / "back", "--quiet")[0] == 0
    assert cli("apply", ROOT / "rules" / "phi-2.yaml", "--source", src, "--out", tmp_path / "direct")[0] == 0
    back, direct = (
        load_file(tmp_path / "back" / "model.safetensors"),
        load_file(tmp_path / "direct" / "model.safetensors"),
    )
    assert sorted(back) == sorted(direct)
    for name, tensor in direct.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8))


def test_already_converted_folder(cli, tmp_path: Path) -> None:
    src = msft(tmp_path / "src", random_state(HEAD64, seed=2), HEAD64, "safetensors", 1)
    assert cli("apply", "--source", src, "--out", tmp_path / "converted", "--quiet")[0] == 0
    code, out, _ = cli("detect", tmp_path / "converted")
    assert code == 0 and "already in today's layout" in out
    code, _, err = cli("apply", "--source", tmp_path / "converted", "--out", tmp_path / "again")
    assert code == 1 and not (tmp_path / "again").exists()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {tmp_path / 'converted'}: already in transformers' PhiForCausalLM layout: it needs no conversion; "
        "load it with from_pretrained (or --to mixformer-sequential, phi-msft, transformers-4.36 for the layouts it "
        "converts to)"
    ]


def test_unrelated_tensors_fit_nothing(cli, tmp_path: Path) -> None:
    """No rule reads the source: one line that says so and what the source looks like, from every command."""
    from safetensors.torch import save_file

    (tmp_path / "src").mkdir()
    save_file(
        {"encoder.block.0.weight": torch.zeros(2, 2), "decoder.head": torch.zeros(3)},
        tmp_path / "src" / "model.safetensors",
    )
    said = (
        f"{tmp_path / 'src'}: no shipped rule reads this source (no config.json; tensors no rule consumes: "
        "decoder.head, encoder.block.0.weight); no rule consumes any of its 2 tensor(s)"
    )
    code, out, _ = cli("detect", tmp_path / "src")
    assert (code, out) == (1, said + "\n")
    code, out, _ = cli("detect", tmp_path / "src", "--all")
    rows = table(out)
    assert len(rows) == CANDIDATES and all(" no " in r and "no step consumes, first:" in r for r in rows), rows
    code, _, err = cli("apply", "--source", tmp_path / "src", "--out", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert err == f"error: {said}\n"
    code, out, _ = cli("detect", tmp_path / "src", "--json")
    assert code == 1 and not any(f["fits"] for f in json.loads(out)["fits"])
    assert json.loads(out)["answer"] == [said]


def test_detect_reads_no_bytes_and_imports_no_torch(tmp_path: Path) -> None:
    src = transformers_436(tmp_path / "src", random_state(HEAD64, seed=4), HEAD64, "safetensors", 2)
    program = (
        "import sys; from phi_rules.cli import main; code = main(['detect', sys.argv[1]]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))); sys.exit(code)"
    )
    run = subprocess.run([sys.executable, "-c", program, str(src)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]"
    assert "phi-transformers-4.36" in run.stdout


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name, tensor in a.items():
        assert b[name].dtype == tensor.dtype and b[name].shape == tensor.shape, name
        assert torch.equal(b[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_436_round_trips_bit_for_bit(cli, tmp_path: Path, dtype: torch.dtype) -> None:
    """4.36 -> today -> 4.36 (the derived rule phi-to-transformers-4.36) gives back every tensor, bit for bit,
    and the config values the rule maps; today -> 4.36 -> today as well."""
    src = transformers_436(tmp_path / "src", random_state(HEAD80, dtype, seed=23), HEAD80, "safetensors", 1)
    assert cli("apply", "--source", src, "--out", tmp_path / "today", "--quiet")[0] == 0
    code, _, err = cli("apply", "--source", tmp_path / "today", "--to", "transformers-4.36", "--out", tmp_path / "back")
    assert code == 0, err
    _same_bytes(load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors"))
    source, back = (json.loads((f / "config.json").read_text()) for f in (src, tmp_path / "back"))
    mapped = ["hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "partial_rotary_factor"]
    assert {k: back[k] for k in mapped} == {k: source[k] for k in mapped}
    assert cli("apply", "--source", tmp_path / "back", "--out", tmp_path / "today-again", "--quiet")[0] == 0
    _same_bytes(
        load_file(tmp_path / "today" / "model.safetensors"), load_file(tmp_path / "today-again" / "model.safetensors")
    )


@pytest.mark.parametrize(
    "cfg", [HEAD80, MsftConfig(vocab_size=80, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, rotary_dim=16)]
)
def test_phi_msft_round_trips_bit_for_bit(cli, tmp_path: Path, cfg: MsftConfig) -> None:
    """phi-msft -> today -> phi-msft (phi-to-phi-msft, derived from phi-2) gives back every tensor bit for bit and
    the remote-code config.json's values; and the phi-2 rule converts the result again to the same folder."""
    src = msft(tmp_path / "src", random_state(cfg, torch.float16, seed=24), cfg, "safetensors", 1)
    assert cli("apply", "--source", src, "--out", tmp_path / "today", "--quiet")[0] == 0
    code, _, err = cli("apply", "--source", tmp_path / "today", "--to", "phi-msft", "--out", tmp_path / "back")
    assert code == 0, err
    _same_bytes(load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors"))
    source, back = (json.loads((f / "config.json").read_text()) for f in (src, tmp_path / "back"))
    assert {k: back.get(k) for k in source} == source  # bos/eos ids the source lacks come from the rule's defaults
    assert cli("apply", "--source", tmp_path / "back", "--out", tmp_path / "again", "--quiet")[0] == 0
    _same_bytes(
        load_file(tmp_path / "today" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    )


def test_to_phi_msft_keeps_the_source_auto_map(cli, tmp_path: Path) -> None:
    """The remote-code layout loads through config.json's auto_map (trust_remote_code): where the source names
    the remote code's classes, --to phi-msft keeps them; where it names none, none is written."""
    src = msft(tmp_path / "src", random_state(HEAD80, torch.float16, seed=26), HEAD80, "safetensors", 1)
    assert cli("apply", "--source", src, "--out", tmp_path / "today", "--quiet")[0] == 0
    auto_map = {"AutoConfig": "configuration_phi.PhiConfig", "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"}
    for given in (None, auto_map):
        config = json.loads((tmp_path / "today" / "config.json").read_text())
        (tmp_path / "today" / "config.json").write_text(json.dumps({**config, "auto_map": given}))
        out = tmp_path / f"back-{given is not None}"
        code, _, err = cli("apply", "--source", tmp_path / "today", "--to", "phi-msft", "--out", out, "--quiet")
        assert code == 0, err
        back = json.loads((out / "config.json").read_text())
        assert back.get("auto_map", "absent") == (given or "absent") and back["model_type"] == "phi-msft"


def test_mixformer_round_trips_bit_for_bit(cli, tmp_path: Path) -> None:
    """MixFormer-sequential -> today -> MixFormer-sequential (phi-to-mixformer-sequential): blocks shift back up by
    one, and the head returns to layers.N+1 (the backward of `when: i == num_hidden_layers + 1`)."""
    src = mixformer(tmp_path / "src", random_state(HEAD64, torch.bfloat16, seed=25), HEAD64, "safetensors", 1)
    assert cli("apply", "--source", src, "--out", tmp_path / "today", "--quiet")[0] == 0
    to_mixformer = ["--to", "mixformer-sequential", "--out", tmp_path / "back"]
    code, _, err = cli("apply", "--source", tmp_path / "today", *to_mixformer)
    assert code == 0, err
    _same_bytes(load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors"))
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["model_type"] == "mixformer-sequential" and back["n_layer"] == HEAD64.n_layer
    assert cli("apply", "--source", tmp_path / "back", "--out", tmp_path / "again", "--quiet")[0] == 0
    _same_bytes(
        load_file(tmp_path / "today" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    )


def test_a_transform_runs_on_each_tensor_of_a_module_and_view_keeps_the_rest(cli, tmp_path: Path) -> None:
    """Short-form transform names are modules (Wqkv: its weight and its bias, one step), and `...` last in a
    view is the input's dimensions after its first: [-1, 2, ...] pairs the rows of the weight ([n, 2, hidden])
    and of the bias ([n, 2]) alike. The rule's derived backward undoes it, bit for bit."""
    cfg = HEAD64
    src = msft(tmp_path / "src", random_state(cfg, torch.float32, seed=26), cfg, "safetensors", 1)
    rule = tmp_path / "paired.yaml"
    rule.write_text(
        f"version: 1\nname: paired\nextends: {ROOT / 'rules' / 'phi-2.yaml'}\n"
        """edit_steps:
  - name: swap-row-pairs
    before: split-qkv
    transform:
      from: transformer.h.{i}.mixer.Wqkv
      ops: [{view: [-1, 2, ...]}, {transpose: [0, 1]}, {reshape: input}]
      to: transformer.h.{i}.mixer.Wqkv
"""
    )
    code, _, err = cli("apply", rule, "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for p in ("weight", "bias"):
        wqkv = before[f"transformer.h.1.mixer.Wqkv.{p}"]
        paired = wqkv.view(-1, 2, *wqkv.shape[1:]).transpose(0, 1).reshape(wqkv.shape)
        assert torch.equal(after[f"model.layers.1.self_attn.q_proj.{p}"], paired[: cfg.n_embd])
        assert not torch.equal(paired, wqkv)
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=tmp_path / "out"))
    phi_rules.convert(phi_rules.load_rules(rule, backward=True), tmp_path / "back", options)
    _same_bytes(before, load_file(tmp_path / "back" / "model.safetensors"))


SHARED = """version: 1
name: share
source:
  fields: [hidden_size]
target:
  architecture: PhiForCausalLM
  check: false
  config: {}
steps:
  - name: share-a
    transform:
      from: a.{i}
      ops: [{repeat: 2}]
      to:
        - b.{i}
        - c.{i}
reverse:
  name: share-back
  architecture: PhiForCausalLM
"""


def test_repeat_runs_backward_as_take_one_of_equal_copies(tmp_path: Path) -> None:
    """repeat's inverse takes one of copies that must be equal: the way back gives the tensors bit for bit, and
    copies that differ (an A matrix that is not shared) stop the conversion with one line, nothing written."""
    from safetensors.torch import save_file

    rule = tmp_path / "share.yaml"
    rule.write_text(SHARED)
    (tmp_path / "src").mkdir()
    state = {"a.0.weight": torch.randn(4, 3), "a.1.weight": torch.randn(4, 3), "a.1.bias": torch.randn(4)}
    save_file(state, tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text('{"hidden_size": 3}')

    def convert(rules: phi_rules.Rule, src: Path, out: Path) -> None:
        phi_rules.convert(rules, out, phi_rules.Options(source=phi_rules.SourceOptions(source=src)))

    convert(phi_rules.load_rules(rule), tmp_path / "src", tmp_path / "out")
    copies = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(copies) == sorted(f"{m}.{k.split('.', 1)[1]}" for m in "bc" for k in state)
    backward = phi_rules.load_rules(rule, backward=True)
    assert [op.name for op in backward.steps[0].ops] == ["take_one"]  # type: ignore[union-attr]
    convert(backward, tmp_path / "out", tmp_path / "back")
    _same_bytes(state, load_file(tmp_path / "back" / "model.safetensors"))
    copies["c.1.weight"][0, 0] += 1
    save_file(copies, tmp_path / "out" / "model.safetensors")
    with pytest.raises(phi_rules.PhiRulesError) as stopped:
        convert(backward, tmp_path / "out", tmp_path / "again")
    assert "step 'share-a': take_one(2): the 2 copies differ" in str(stopped.value)
    assert not (tmp_path / "again").exists()
