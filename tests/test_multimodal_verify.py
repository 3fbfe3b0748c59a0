"""``phi-rules verify`` on the Phi-4-multimodal conversions (#31): the remote layout's text decoder run by
transformers' own Phi4MultimodalForCausalLM, and each LoRA against PEFT's merge of its adapter folder.

The tiny checkpoints are test_multimodal's (the native class written back into the remote layout); each
broken output is a correct one with one thing changed, and verify must name the part that changed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_multimodal import LORAS, native_model, remote_checkpoint

Cli = Callable[..., tuple[int, str, str]]
REFERENCE = "(Phi4MultimodalForCausalLM's text model reference"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The remote checkpoint and its two correct conversions, made once."""
    from phi_rules.cli import main

    root = tmp_path_factory.mktemp("phi4mm-verify")
    remote_checkpoint(native_model(), root / "remote")
    for to in ("phi3", "phi4-multimodal"):
        assert main(["apply", "--source", str(root / "remote"), "--to", to, "--out", str(root / to), "--quiet"]) == 0
    return root


def _copy(folders: Path, to: str, tmp_path: Path) -> Path:
    out = tmp_path / to
    shutil.copytree(folders / to, out)
    return out


def _edit(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(file)
    change(state)
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("to", ["phi3", "phi4-multimodal"])
def test_verify_proves_each_conversion_text_and_loras(cli: Cli, folders: Path, to: str) -> None:
    code, out, err = cli("verify", "--source", folders / "remote", folders / to, "--quiet")
    assert code == 0, err
    assert f"{folders / to}: computes the original function {REFERENCE}, 9 parts)" in out, out
    assert "probed 24 tokens: past original_max_position_embeddings 16 (longrope)" in out, out
    for part in ("layer 0 at 24 tokens", "logits end to end", "vision-lora", "speech-lora"):
        assert any(line.startswith(part + " ") and line.endswith("ok") for line in out.splitlines()), (part, out)
    assert "no function check" not in err


def test_verify_proves_the_native_folder_back_in_the_remote_layout(cli: Cli, folders: Path, tmp_path: Path) -> None:
    code, _, err = cli("apply", "--source", folders / "phi4-multimodal", "--to", "phi4mm", "--out", tmp_path / "back")
    assert code == 0, err
    code, out, err = cli("verify", "--source", folders / "phi4-multimodal", tmp_path / "back", "--quiet")
    assert code == 0 and f"computes the original function {REFERENCE}, 9 parts)" in out, out + err
    _edit(
        tmp_path / "back" / "model.safetensors",
        lambda s: s["model.layers.0.self_attn.o_proj.lora_B.vision.weight"].mul_(2),
    )
    code, _, err = cli("verify", "--source", folders / "phi4-multimodal", tmp_path / "back", "--quiet")
    assert code == 1 and "vision-lora diverges" in err and "model.layers.0.self_attn.o_proj.weight" in err, err


def _swap_k_rows(state: dict[str, torch.Tensor]) -> None:
    """Layer 0's and layer 1's k rows of qkv_proj swapped (q: 4 heads x 8, k: 2 heads x 8)."""
    a, b = (state[f"model.layers.{i}.self_attn.qkv_proj.weight"] for i in (0, 1))
    k = slice(32, 48)
    a[k], b[k] = b[k].clone(), a[k].clone()


def _no_original_length(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    config.pop("original_max_position_embeddings", None)
    config["rope_parameters"].pop("original_max_position_embeddings")
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("to", "change", "said"),
    [
        (
            "phi3",
            lambda out: _edit(out / "model.safetensors", _swap_k_rows),
            ": layer 0 diverges",
        ),
        (
            "phi4-multimodal",
            lambda out: _edit(out / "model.safetensors", _swap_k_rows),
            ": layer 0 diverges",
        ),
        ("phi3", _no_original_length, ": layer 0 diverges"),  # longrope's attention factor moves too
        (
            "phi4-multimodal",
            lambda out: shutil.rmtree(out / "vision-lora"),
            "vision-lora diverges (max|Δ| inf > 0.00e+00) from the original: the source has the vision LoRA and the "
            "output lacks it",
        ),
    ],
    ids=["k-rows-swapped-phi3", "k-rows-swapped-native", "no-original-length", "no-vision-folder"],
)
def test_verify_names_the_broken_part(cli: Cli, folders: Path, tmp_path: Path, to: str, change: Any, said: str) -> None:
    out = _copy(folders, to, tmp_path)
    change(out)
    code, _, err = cli("verify", "--source", folders / "remote", out, "--quiet")
    assert code == 1 and said in err and "Traceback" not in err, err


def test_scaled_lora_names_its_module(cli: Cli, folders: Path, tmp_path: Path) -> None:
    out = _copy(folders, "phi3", tmp_path)
    _edit(
        out / "speech-lora" / "adapter_model.safetensors",
        lambda s: s["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].mul_(1.5),
    )
    code, _, err = cli("verify", "--source", folders / "remote", out, "--quiet")
    assert code == 1 and f"check model.layers.1.mlp.down_proj.weight of {out}/speech-lora/" in err, err


def test_a_lora_neither_side_has_is_said_in_one_line(cli: Cli, tmp_path: Path) -> None:
    remote_checkpoint(native_model(), tmp_path / "remote", loras={"vision": LORAS["vision"]})
    assert cli("apply", "--source", tmp_path / "remote", "--to", "phi3", "--out", tmp_path / "out")[0] == 0
    code, out, err = cli("verify", "--source", tmp_path / "remote", tmp_path / "out", "--quiet")
    assert code == 0, err
    said = [line for line in out.splitlines() if "speech" in line]
    assert said == ["speech-lora: the source has no speech LoRA, and the output none either: nothing to check"], out
    (tmp_path / "out" / "vision-lora").rename(tmp_path / "out" / "speech-lora")  # a LoRA the source lacks
    code, _, err = cli("verify", "--source", tmp_path / "remote", tmp_path / "out", "--quiet")
    assert code == 1 and "vision-lora diverges" in err, err


@pytest.mark.parametrize("to", ["phi3", "phi4-multimodal"])
def test_apply_verify_proves_the_conversion(cli: Cli, folders: Path, tmp_path: Path, to: str) -> None:
    code, _, err = cli("apply", "--source", folders / "remote", "--to", to, "--out", tmp_path / "out", "--verify")
    assert code == 0 and "no function check" not in err, err
    assert (tmp_path / "out" / "vision-lora" / "adapter_model.safetensors").is_file()


def test_without_original_length_the_long_probe_diverges_too(cli: Cli, folders: Path, tmp_path: Path) -> None:
    out = _copy(folders, "phi3", tmp_path)
    _no_original_length(out)
    code, report, err = cli("verify", "--source", folders / "remote", out, "--quiet", "--json")
    assert code == 1, err
    parts = {p["part"]: p["ok"] for p in json.loads(report)["parts"]}
    assert parts["layer 0 at 24 tokens"] is False and parts["embeddings"] is True, parts
