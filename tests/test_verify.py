"""`phi-rules verify`: a good conversion verifies; each way a wrong rule breaks an output is caught
and pinned to the right layer and tensors; `apply --verify` publishes nothing that fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from phi_reference import MsftConfig, random_state, write_checkpoint
from safetensors.torch import load_file, save_file
from test_layouts import mixformer, transformers_436

PHI2 = ROOT / "rules" / "phi-2.yaml"
CFG = MsftConfig(vocab_size=80, n_embd=160, n_layer=2, n_head=2, rotary_dim=32, n_inner=160)  # head_dim 80


@pytest.fixture
def converted(cli, tmp_path: Path) -> tuple[Path, Path]:
    src = write_checkpoint(tmp_path / "src", random_state(CFG, seed=5), CFG)
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    return src, tmp_path / "out"


def tamper(out: Path, change) -> None:  # type: ignore[no-untyped-def]
    state = load_file(out / "model.safetensors")
    change(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def test_good_conversion_verifies(cli, converted: tuple[Path, Path]) -> None:
    src, out = converted
    code, stdout, err = cli("verify", "--source", src, out)
    assert code == 0, err
    assert stdout.splitlines()[0].split() == ["part", "max|Δ|", "tolerance"]
    assert [line.split()[0] for line in stdout.splitlines()[1:-3]] == [
        "embeddings",
        "layer",
        "layer",
        "final",
        "logits",
    ]
    assert stdout.splitlines()[-3] == "probed 16 tokens: every part, teacher-forced; the logits end to end"
    assert stdout.splitlines()[-2] == "dtypes: source float32, output float32"
    assert f"{out}: computes the original function" in stdout
    code, stdout, _ = cli("verify", "--source", src, out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["ok"] and report["rule"] == "phi-2" and len(report["parts"]) == 2 + 3 * 2 + 1
    assert report["lengths"] == [16] and report["dtypes"]["output"] == "float32" and report["function_checked"]


def swap(a: str, b: str):  # type: ignore[no-untyped-def]
    def change(state: dict[str, torch.Tensor]) -> None:
        state[a], state[b] = state[b].clone(), state[a].clone()

    return change


def leave_interleave(state: dict[str, torch.Tensor]) -> None:
    """q/k/v split from the seed's per-head order, as a rule that forgot to undo it would."""
    for p in ("weight", "bias"):
        names = [f"model.layers.0.self_attn.{x}_proj.{p}" for x in "qkv"]
        fused = torch.cat([state[n] for n in names])
        shape = (3, CFG.n_head, -1, CFG.n_embd) if p == "weight" else (3, CFG.n_head, -1)
        mixed = fused.view(*shape).transpose(0, 1).reshape(fused.shape)
        for n, part in zip(names, mixed.split(CFG.n_embd), strict=True):
            state[n] = part.contiguous()


def wrong_final_norm(state: dict[str, torch.Tensor]) -> None:
    state["model.final_layernorm.weight"] = state["model.layers.0.input_layernorm.weight"].clone()


ATTENTION = "check q_proj/k_proj/v_proj/dense of model.layers.0.self_attn"
TAMPERED = [
    (
        "k-v-swapped",
        swap("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"),
        "layer 0 attention diverges",
        ATTENTION,
    ),
    ("interleave-left-in", leave_interleave, "layer 0 attention diverges", ATTENTION),
    (
        "fc-biases-swapped",
        swap("model.layers.1.mlp.fc1.bias", "model.layers.1.mlp.fc2.bias"),
        "layer 1 mlp diverges",
        "check fc1/fc2 of model.layers.1.mlp",
    ),
    ("final-norm-from-wrong-tensor", wrong_final_norm, "final norm diverges", "check model.final_layernorm"),
]


@pytest.mark.parametrize(("change", "part", "hint"), [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_tampered_output_fails_at_the_right_part(
    cli, converted: tuple[Path, Path], change, part: str, hint: str
) -> None:
    src, out = converted
    tamper(out, change)
    code, stdout, err = cli("verify", "--source", src, out)
    assert code == 1 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {out}: {part} (max|Δ| ") and line.endswith(
        hint + ("" if "attention" not in part else ", and partial_rotary_factor in config.json")
    ), line
    assert "DIVERGES" in stdout


def test_wrong_rotary_fraction_in_config_fails_in_attention(cli, converted: tuple[Path, Path]) -> None:
    src, out = converted
    config = json.loads((out / "config.json").read_text())
    config["partial_rotary_factor"] = config["rope_parameters"]["partial_rotary_factor"] = 0.5
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = cli("verify", "--source", src, out)
    assert code == 1 and "layer 0 attention diverges" in err and "partial_rotary_factor" in err


@pytest.mark.parametrize("layout", ["mixformer", "transformers-4.36"])
def test_other_layouts_verify_by_their_own_names(cli, tmp_path: Path, layout: str) -> None:
    write = mixformer if layout == "mixformer" else transformers_436
    src = write(tmp_path / "src", random_state(CFG, torch.float16, seed=6), CFG, "safetensors", 2)
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out", "--verify", "--quiet")
    assert code == 0, err
    assert cli("verify", "--source", src, tmp_path / "out")[0] == 0


def test_apply_verify_publishes_nothing_that_fails(cli, tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", random_state(CFG, seed=7), CFG)
    wrong = tmp_path / "wrong.yaml"  # a plausible rule with k and v exchanged: names and shapes all check out
    wrong.write_text(
        f"version: 1\nname: wrong\nextends: {PHI2}\nedit_steps:\n"
        "  - name: split-qkv\n    transform:\n"
        "      match: 'transformer\\.h\\.(?P<i>\\d+)\\.mixer\\.Wqkv\\.(?P<p>weight|bias)'\n"
        "      ops: [{split: {dim: 0, sizes: [hidden_size, kv_size, kv_size]}}]\n"
        "      to: ['model.layers.{i}.self_attn.q_proj.\\g<p>', 'model.layers.{i}.self_attn.v_proj.\\g<p>',\n"
        "           'model.layers.{i}.self_attn.k_proj.\\g<p>']\n"
    )
    assert cli("plan", wrong, "--source", src)[0] == 0  # every check by name and shape passes
    code, _, err = cli("apply", wrong, "--source", src, "--out", tmp_path / "out", "--verify", "--quiet")
    assert code == 1 and "layer 0 attention diverges" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--verify", "--quiet")
    assert code == 0, err


@pytest.mark.parametrize(
    ("extra", "source_dtype"), [(["--dtype", "bfloat16"], torch.float16), (["--format", "bin"], torch.float32)]
)
def test_apply_verify_proves_a_correct_bfloat16_or_bin_output(
    cli, tmp_path: Path, extra: list[str], source_dtype: torch.dtype
) -> None:
    """A float16 source written as bfloat16 differs by rounding only; a .bin output is read like safetensors."""
    src = write_checkpoint(tmp_path / "src", random_state(CFG, source_dtype, seed=5), CFG)
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--verify", "--quiet", *extra)
    assert code == 0, err


def test_a_wrong_bfloat16_output_still_diverges(cli, tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", random_state(CFG, torch.float16, seed=5), CFG)
    out = tmp_path / "out"
    assert cli("apply", PHI2, "--source", src, "--out", out, "--dtype", "bfloat16", "--quiet")[0] == 0
    state = load_file(out / "model.safetensors")
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    state[k], state[v] = state[v], state[k]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli("verify", "--source", src, out)
    assert code == 1 and "layer 0 attention diverges" in err, err


def test_grouped_query_conversion_verifies_and_swapped_kv_heads_do_not(cli, tmp_path: Path) -> None:
    """n_head_kv: the reference repeats each key/value head for its query heads, as the remote code did."""
    gqa = MsftConfig(vocab_size=80, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, rotary_dim=16)
    src = write_checkpoint(tmp_path / "src", random_state(gqa, seed=6), gqa)
    out = tmp_path / "out"
    assert cli("apply", PHI2, "--source", src, "--out", out, "--quiet")[0] == 0
    assert cli("verify", "--source", src, out)[0] == 0

    def swap_kv_heads(state: dict[str, torch.Tensor]) -> None:  # the two key heads of layer 1 exchanged
        k = state["model.layers.1.self_attn.k_proj.weight"]
        state["model.layers.1.self_attn.k_proj.weight"] = torch.cat([k[32:], k[:32]])

    tamper(out, swap_kv_heads)
    code, _, err = cli("verify", "--source", src, out)
    assert code == 1 and "layer 1 attention diverges" in err, err
