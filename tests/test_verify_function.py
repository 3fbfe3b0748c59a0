"""`verify` on today's architectures sees what it checks (#30): probes past every length where a config
changes the function (a sliding window the output dropped shows only there), judges each layer by its own
contribution with bounds from both sides' dtypes (a k/v swap in a bfloat16 output of a float32 source is
caught, the correct bfloat16 output passes), runs the output end to end, and catches a layer-count mismatch
and NaN. A rule for a layout verify has no reference for is run by the source's own transformers class, or
says that no function check is possible (#34). Progress shows layer by layer on a terminal only (#32)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from transformers.models.phi3 import configuration_phi3, modeling_phi3
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()

Cli = Callable[..., tuple[int, str, str]]
LLAMA = ROOT / "rules" / "phi3" / "llama.yaml"


def phi3(folder: Path, seed: int, dtype: torch.dtype = torch.float32, **shape: Any) -> Path:
    """A Phi3 with hidden 32, 4 heads, 2 kv heads, 2 layers, initialised as transformers does (seeded)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = configuration_phi3.Phi3Config(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **shape,
        )
    model = modeling_phi3.Phi3ForCausalLM(config)
    model.to(dtype).save_pretrained(folder)
    return folder


def converted(cli: Cli, src: Path, out: Path, target: str, *extra: object) -> Path:
    code, _, err = cli("apply", "--source", src, "--to", target, "--out", out, "--quiet", *extra)
    assert code == 0, err
    return out


def edit_config(out: Path, **fields: Any) -> None:
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **fields}))


def tamper(out: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(out / "model.safetensors")
    change(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


WINDOWS = [(32, torch.float32), (32, torch.bfloat16), (20, torch.float32), (50, torch.bfloat16)]


@pytest.mark.parametrize(("window", "dtype"), WINDOWS, ids=[f"{w}-{str(d)[6:]}" for w, d in WINDOWS])
@pytest.mark.parametrize("wrong", [None, "null", "smaller", "larger"])
def test_a_window_past_the_everyday_probe_is_proven(
    cli: Cli, tmp_path: Path, window: int, dtype: torch.dtype, wrong: str | None
) -> None:
    """The window only matters past `window` tokens: verify probes there, and only there, on layer 0."""
    src = phi3(tmp_path / "src", seed=window, dtype=dtype, sliding_window=window)
    out = converted(cli, src, tmp_path / "out", "mistral")
    changed = {"null": None, "smaller": window // 2, "larger": window + 5}
    if wrong is not None:
        edit_config(out, sliding_window=changed[wrong])
    code, stdout, err = cli("verify", "--source", src, out)
    longest = max(window, window + 5 if wrong == "larger" else window)
    probes = [f"probed {longest + 8} tokens: past sliding_window {longest}"]
    if wrong == "smaller" and window // 2 >= 16:
        probes.append(f"probed {window // 2 + 8} tokens: past sliding_window {window // 2}")
    elif wrong == "smaller":  # within the everyday probe already
        probes.append(
            f"probed 16 tokens: every layer, teacher-forced and end to end; past sliding_window {window // 2}"
        )
    if wrong is None:
        assert code == 0, stdout + err
        assert "layer 0 at" in stdout and "layer 1 at" not in stdout  # one layer of each kind at the long length
    else:
        first = min(window, changed[wrong] or window)  # the shortest probe that sees the two windows differ
        at = f" at {first + 8} tokens" if first >= 16 else ""
        assert code == 1 and f"error: {out}: layer 0{at} diverges" in err, stdout + err
    assert all(p in stdout for p in probes), stdout


SWAPS: dict[str, tuple[str, str]] = {
    "k-v-layer-0": ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"),
    "k-v-layer-1": ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"),
    "o-proj-of-layers-1-0": ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"),
}  # not gate and up: silu(g)·u and silu(u)·g differ by about |g - u|/2 relative, near rounding at init scale


@pytest.mark.parametrize("narrow", ["bfloat16", "float16"])
@pytest.mark.parametrize("big_channel", [False, True], ids=["plain", "large-embedding-channel"])
@pytest.mark.parametrize("swap", [None, *SWAPS], ids=["correct", *SWAPS])
def test_a_narrower_output_does_not_widen_the_bound_past_a_swap(
    cli: Cli, tmp_path: Path, narrow: str, big_channel: bool, swap: str | None
) -> None:
    """float32 source, --dtype bfloat16/float16 output: rounding passes, a swap of two same-shaped tensors
    fails at its layer, also where one embedding channel is 100x the others (a residual-scaled bound let
    that through with 19x to spare)."""
    src = phi3(tmp_path / "src", seed=3)
    if big_channel:

        def louder(state: dict[str, torch.Tensor]) -> None:
            state["model.embed_tokens.weight"][:, 5] *= 100

        tamper(src, louder)
    out = converted(cli, src, tmp_path / "out", "llama", "--dtype", narrow)
    if swap is not None:
        a, b = SWAPS[swap]

        def exchange(state: dict[str, torch.Tensor]) -> None:
            state[a], state[b] = state[b].clone(), state[a].clone()

        tamper(out, exchange)
    code, stdout, err = cli("verify", "--source", src, out)
    if swap is None:
        assert code == 0, stdout + err
    else:
        layer = swap[-1] if swap.startswith("k-v") else "0"
        assert code == 1 and f"error: {out}: layer {layer} diverges" in err, stdout + err
    assert f"dtypes: source float32, output {narrow}: tolerances 16x {narrow}'s rounding" in stdout


def test_the_json_report_says_lengths_and_dtypes(cli: Cli, tmp_path: Path) -> None:
    src = phi3(tmp_path / "src", seed=4, sliding_window=24)
    out = converted(cli, src, tmp_path / "out", "mistral", "--dtype", "bfloat16")
    code, stdout, err = cli("verify", "--source", src, out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["ok"], err
    assert report["lengths"] == [16, 32] and report["probes"][1]["why"] == "past sliding_window 24"
    assert report["dtypes"] == {"source": "float32", "output": "bfloat16", "relative_tolerance": 16 * 2.0**-8}
    parts = [p["part"] for p in report["parts"]]
    assert parts == [
        "embeddings",
        *(f"layer {i}{part}" for i in (0, 1) for part in ("", " attention", " mlp")),
        "final norm",
        "logits",
        "logits end to end",
        "layer 0 at 32 tokens",
        "layer 0 attention at 32 tokens",
        "layer 0 mlp at 32 tokens",
    ]


def test_a_layer_count_mismatch_is_named(cli: Cli, tmp_path: Path) -> None:
    src = phi3(tmp_path / "src", seed=5)
    out = converted(cli, src, tmp_path / "out", "llama")

    def drop_last(state: dict[str, torch.Tensor]) -> None:
        for name in [n for n in state if n.startswith("model.layers.1.")]:
            del state[name]

    tamper(out, drop_last)
    edit_config(out, num_hidden_layers=1)
    code, _, err = cli("verify", "--source", src, out)
    assert code == 1 and err.strip().endswith("the source has 2 layers, the output 1"), err


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("model.layers.1.mlp.down_proj.weight", "layer 1 diverges (max|Δ| inf"),
        ("model.norm.weight", "final norm diverges (max|Δ| inf"),
        ("lm_head.weight", "logits diverges (max|Δ| inf"),
    ],
)
def test_nan_in_the_output_is_never_within_tolerance(cli: Cli, tmp_path: Path, where: str, says: str) -> None:
    src = phi3(tmp_path / "src", seed=6)
    out = converted(cli, src, tmp_path / "out", "llama")

    def poison(state: dict[str, torch.Tensor]) -> None:
        state[where].view(-1)[0] = float("nan")

    tamper(out, poison)
    code, stdout, err = cli("verify", "--source", src, out)
    assert code == 1 and says in err, stdout + err


def own_rule(tmp_path: Path, swapped: bool) -> Path:
    """A user's rule for a layout of their own name: phi3-to-llama, or with k and v exchanged."""
    rule = tmp_path / ("swapped.yaml" if swapped else "mine.yaml")
    text = f"version: 1\nname: mine\nlayout: mine\nextends: {LLAMA}\n"
    if swapped:
        text += (
            "edit_steps:\n  - name: split-qkv\n    transform:\n      from: model.layers.{i}.self_attn.qkv_proj\n"
            "      ops: [{split: {dim: 0, sizes: [hidden_size, kv_size, kv_size]}}]\n"
            "      to:\n        - model.layers.{i}.self_attn.q_proj\n        - model.layers.{i}.self_attn.v_proj\n"
            "        - model.layers.{i}.self_attn.k_proj\n"
        )
    rule.write_text(text)
    return rule


@pytest.mark.parametrize("swapped", [False, True])
def test_a_layout_of_ones_own_is_run_by_the_class_its_source_names(cli: Cli, tmp_path: Path, swapped: bool) -> None:
    src = phi3(tmp_path / "src", seed=7)
    rule = own_rule(tmp_path, swapped)
    code, _, err = cli("apply", rule, "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    code, stdout, err = cli("verify", "--rules", rule, "--source", src, tmp_path / "out")
    if swapped:
        assert code == 1 and "layer 0 diverges" in err, stdout + err
    else:
        assert code == 0 and "(Phi3ForCausalLM reference" in stdout, stdout + err


def test_a_source_no_class_runs_says_that_no_function_check_is_possible(cli: Cli, tmp_path: Path) -> None:
    src = phi3(tmp_path / "src", seed=8)
    edit_config(src, architectures=["PackForCausalLM"])
    rule = own_rule(tmp_path, swapped=False)
    out = tmp_path / "out"
    assert cli("apply", rule, "--source", src, "--out", out, "--quiet")[0] == 0
    code, stdout, err = cli("verify", "--rules", rule, "--source", src, out)
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if "function check" in line]
    assert line.startswith(f"warning: {out}: no function check is possible: verify has no reference for layout 'mine'")
    assert line.endswith(
        "checked instead: every tensor of the output by name and shape against LlamaForCausalLM (21 tensors)"
    )
    assert stdout.strip().endswith("has every tensor LlamaForCausalLM needs, by name and shape (no function check)")

    def shrink(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1].clone()

    tamper(out, shrink)
    code, _, err = cli("verify", "--rules", rule, "--source", src, out)
    assert (
        code == 1 and "shapes diverges" in err and "up_proj.weight is [63, 32], LlamaForCausalLM needs [64, 32]" in err
    )


class Terminal:
    """stderr as a terminal: what the user sees while verify runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import sys

        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


@pytest.mark.parametrize("terminal", [True, False])
@pytest.mark.parametrize("quiet", [False, True])
def test_progress_layer_by_layer_on_a_terminal_only(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool, quiet: bool
) -> None:
    src = phi3(tmp_path / "src", seed=9, sliding_window=20)
    out = converted(cli, src, tmp_path / "out", "mistral")
    if terminal:
        Terminal(monkeypatch)
    code, _, err = cli("verify", "--source", src, out, *(["--quiet"] if quiet else []))
    assert code == 0
    if terminal and not quiet:
        assert "verify: 100%" in err and "3/3 [" in err and "layer/s]" in err, err  # 2 layers, then 1 at 28 tokens
    else:
        assert err == "", err
