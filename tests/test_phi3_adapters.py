"""Adapters of the Phi-3 family between fused (qkv_proj, gate_up_proj) and split (q/k/v, gate/up) names (#19),
proven by function against PEFT itself.

PEFT writes each adapter (random B, DoRA magnitudes moved away from their init) on a tiny grouped-query
model; base and adapter are converted with the CLI; ``PeftModel(converted base, converted adapter)`` gives
``PeftModel(base, adapter)``'s logits, and so does its ``merge_and_unload``. Every tensor written is one
PEFT loads (PEFT ignores names a model lacks, without an error), and ``verify --base`` agrees.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.llama import configuration_llama, modeling_llama
from transformers.models.phi3 import configuration_phi3, modeling_phi3
from transformers.utils import logging as transformers_logging

peft = pytest.importorskip("peft", reason="adapters need the peft extra")
transformers_logging.disable_progress_bar()

Cli = Callable[..., tuple[int, str, str]]
SIZES = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query: k and v have half q's rows
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
IDS = torch.tensor([[5, 17, 3, 44, 9, 81, 2, 60, 33, 12]])
PHI3_ALL = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# name, the architecture the adapter was trained on, LoraConfig settings, whether --base is passed
CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    ("phi3-lora-all-four", "phi3", {"target_modules": PHI3_ALL}, False),
    ("phi3-dora-fused", "phi3", {"target_modules": ["qkv_proj", "gate_up_proj"], "use_dora": True}, False),
    (
        "phi3-rslora-patterns",
        "phi3",
        {
            "target_modules": ["qkv_proj", "o_proj"],
            "use_rslora": True,
            "rank_pattern": {"qkv_proj": 6},
            "alpha_pattern": {"o_proj": 3},
        },
        False,
    ),
    ("phi3-regex", "phi3", {"target_modules": r".*\.(qkv_proj|down_proj)"}, False),
    ("phi3-to-mistral", "phi3", {"target_modules": PHI3_ALL, "use_dora": True}, False),
    ("llama-rslora-q-v", "llama", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}, False),
    ("llama-lora-gate-up-k", "llama", {"target_modules": ["gate_proj", "up_proj", "k_proj"]}, False),
    ("llama-lora-q-gate-with-base", "llama", {"target_modules": ["q_proj", "gate_proj", "o_proj"]}, True),
    (
        "llama-dora-every-part",
        "llama",
        {"target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "use_dora": True},
        False,
    ),
    ("llama-regex", "llama", {"target_modules": r".*\.(v_proj|up_proj|down_proj)", "lora_alpha": 5}, False),
]


def base_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "phi3":
            model: torch.nn.Module = modeling_phi3.Phi3ForCausalLM(configuration_phi3.Phi3Config(**SIZES))
        else:
            model = modeling_llama.LlamaForCausalLM(configuration_llama.LlamaConfig(**SIZES))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def trained(arch: str, settings: dict[str, Any], folder: Path, seed: int = 0) -> tuple[Any, torch.Tensor]:
    """A PEFT model as training leaves it (B random, DoRA magnitudes moved), saved with its base; its logits."""
    model = base_model(arch, seed)
    model.save_pretrained(folder / "base")
    lora = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **settings})
    adapted = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    adapted.save_pretrained(folder / "adapter")
    with torch.no_grad():
        return adapted, adapted(IDS).logits


def load_adapted(base: Path, adapter: Path) -> Any:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # the class its config.json names
    return peft.PeftModel.from_pretrained(loaded, adapter).eval()


@pytest.mark.parametrize(("arch", "settings", "with_base"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_adapter_converts_by_function(
    cli: Cli, tmp_path: Path, request: pytest.FixtureRequest, arch: str, settings: dict[str, Any], with_base: bool
) -> None:
    to = ("mistral" if "mistral" in request.node.name else "llama") if arch == "phi3" else "phi3"
    original, expected = trained(arch, settings, tmp_path)
    plain = base_model(arch)
    with torch.no_grad():
        assert (plain(IDS).logits - expected).abs().max() > 1e-2  # the adapter matters
    code, _, err = cli("apply", "--source", tmp_path / "base", "--to", to, "--out", tmp_path / f"{to}-base", "--quiet")
    assert code == 0, err
    base_arg = ["--base", tmp_path / "base"] if with_base else []
    out = tmp_path / f"{to}-adapter"
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--to", to, "--out", out, *base_arg)
    assert code == 0, err

    adapted = load_adapted(tmp_path / f"{to}-base", out)
    written = load_file(out / "adapter_model.safetensors")
    loaded = peft.get_peft_model_state_dict(adapted)
    assert sorted(loaded) == sorted(written)  # every tensor written was loaded, and PEFT expects no other
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor), name
    fused_or_split = {"qkv_proj", "gate_up_proj"} if to == "phi3" else {"q_proj", "k_proj", "v_proj"}
    assert any(part in name for name in written for part in fused_or_split)
    with torch.no_grad():
        assert (adapted(IDS).logits - expected).abs().max().item() <= 1e-5
        merged = adapted.merge_and_unload()
        assert (merged(IDS).logits - original.merge_and_unload()(IDS).logits).abs().max().item() <= 1e-5

    verify = ["verify", "--source", tmp_path / "adapter", out, "--base", tmp_path / "base", tmp_path / f"{to}-base"]
    code, _, err = cli(*verify)
    assert code == 0, err


def test_fusing_counts_rank_and_alpha(cli: Cli, tmp_path: Path) -> None:
    """The fused rank is parts * r and alpha keeps the scale: * parts for LoRA, * sqrt(parts) for rsLoRA."""
    for rslora in (False, True):
        folder = tmp_path / str(rslora)
        trained("llama", {"target_modules": ["q_proj", "k_proj", "up_proj"], "use_rslora": rslora}, folder)
        code, _, err = cli("apply", "--source", folder / "adapter", "--to", "phi3", "--out", folder / "out")
        assert code == 0, err
        config = json.loads((folder / "out" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8)
        assert sorted(config["target_modules"]) == ["gate_up_proj", "qkv_proj"]
        assert config["rank_pattern"] == {"qkv_proj": 12, "gate_up_proj": 8}
        scale = math.sqrt if rslora else float
        assert config["alpha_pattern"] == pytest.approx({"qkv_proj": 8 * scale(3), "gate_up_proj": 8 * scale(2)})


def test_fusing_q_alone_needs_the_base(cli: Cli, tmp_path: Path) -> None:
    trained("llama", {"target_modules": ["q_proj"]}, tmp_path)
    out = tmp_path / "out"
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--to", "phi3", "--out", out)
    assert code == 1 and not out.exists() and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "refused: the adapter targets q_proj but neither k_proj nor v_proj" in line and "pass --base BASE" in line
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--to", "phi3", "--out", out, "--base", tmp_path)
    assert code == 1 and f"--base {tmp_path}: no config.json there" in err


def test_a_rank_pattern_on_one_part_is_refused(cli: Cli, tmp_path: Path) -> None:
    """q with rank 8 beside k and v with rank 4 cannot share one fused module's rank: said, not guessed."""
    trained("llama", {"target_modules": ["q_proj", "k_proj", "v_proj"], "rank_pattern": {"q_proj": 8}}, tmp_path)
    out = tmp_path / "out"
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--to", "phi3", "--out", out)
    assert code == 1 and not out.exists()
    assert "rank_pattern: 'q_proj' sets model.layers.0.self_attn.q_proj apart from the other parts" in err


def test_dora_fuse_needs_every_part(cli: Cli, tmp_path: Path) -> None:
    """A part without DoRA would need its base rows' norms as magnitude: refused, not zero-filled."""
    trained("llama", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}, tmp_path)
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--to", "phi3", "--out", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert "refused: the DoRA adapter targets some parts of a fused module and not the others" in err


def test_verify_fails_on_a_lost_fused_alpha(cli: Cli, tmp_path: Path) -> None:
    trained("llama", {"target_modules": ["q_proj", "k_proj", "v_proj"]}, tmp_path)
    for src, out in (("base", "phi3-base"), ("adapter", "phi3-adapter")):
        assert cli("apply", "--source", tmp_path / src, "--to", "phi3", "--out", tmp_path / out, "--quiet")[0] == 0
    verify = ["verify", "--source", tmp_path / "adapter", tmp_path / "phi3-adapter"]
    base = ["--base", tmp_path / "base", tmp_path / "phi3-base"]
    assert cli(*verify, *base)[0] == 0
    config_file = tmp_path / "phi3-adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["alpha_pattern"] = {}  # qkv_proj scaled by alpha / (3r): a third of the update
    config_file.write_text(json.dumps(config))
    code, _, err = cli(*verify, *base)
    assert code == 1 and "layer 0 diverges" in err, err


KINDS: list[tuple[str, dict[str, Any]]] = [
    ("lora", {}),
    ("rslora", {"use_rslora": True}),
    ("dora", {"use_dora": True}),
    ("rank-and-alpha-patterns", {"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"qkv_proj": 3, "down_proj": 20}}),
    ("layer-patterns", {"rank_pattern": {"model.layers.1.self_attn.qkv_proj": 6}, "lora_alpha": 5}),
]


@pytest.mark.parametrize("settings", [k[1] for k in KINDS], ids=[k[0] for k in KINDS])
def test_verify_merges_as_peft_does(tmp_path: Path, settings: dict[str, Any]) -> None:
    """verify's own merge equals PEFT's merge_and_unload weight for weight (and its scales are not 1)."""
    from phi_rules.source.checkpoint import Checkpoint
    from phi_rules.verify.common import Adapter

    original, _ = trained("phi3", {"target_modules": PHI3_ALL, **settings}, tmp_path)
    base = load_file(tmp_path / "base" / "model.safetensors")
    merged = original.merge_and_unload().state_dict()
    with ExitStack() as stack:
        adapter = Adapter(tmp_path / "adapter", stack)
        assert all(
            adapter.scale(m) != 1.0 for m in ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj")
        )
        compared = 0
        with Checkpoint([tmp_path / "base" / "model.safetensors"]) as ckpt:
            for name in base:
                got = adapter.apply(name, ckpt.load(ckpt.tensors[name]).float())
                assert (got - merged[name]).abs().max().item() <= 1e-6, name
                compared += any(m in name for m in PHI3_ALL)
        assert compared == 4 * SIZES["num_hidden_layers"]


def test_verify_catches_swapped_blocks(cli: Cli, tmp_path: Path) -> None:
    trained("phi3", {"target_modules": ["qkv_proj"]}, tmp_path)
    for src, out in (("base", "llama-base"), ("adapter", "llama-adapter")):
        assert cli("apply", "--source", tmp_path / src, "--to", "llama", "--out", tmp_path / out, "--quiet")[0] == 0
    file = tmp_path / "llama-adapter" / "adapter_model.safetensors"
    written = load_file(file)
    k, v = (f"base_model.model.model.layers.1.self_attn.{p}_proj.lora_B.weight" for p in "kv")
    written[k], written[v] = written[v].clone(), written[k].clone()
    save_file(written, file, metadata={"format": "pt"})
    verify = ["verify", "--source", tmp_path / "adapter", tmp_path / "llama-adapter"]
    code, _, err = cli(*verify, "--base", tmp_path / "base", tmp_path / "llama-base")
    assert code == 1 and "layer 1 diverges" in err, err


def test_a_converted_adapter_never_loads_onto_the_model_it_left(cli: Cli, tmp_path: Path) -> None:
    """PEFT writes the base's folder into adapter_config.json; the converted adapter does not fit that model
    (AutoPeftModelForCausalLM would load Phi3 and attach the few names that exist there). So it names no base
    and says how to name one, or names the converted base that --set gives, and then loads there exactly."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from phi_rules.planning.adapter import NAMES_THE_BASE

    base_model("phi3").save_pretrained(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    torch.manual_seed(3)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PHI3_ALL, init_lora_weights=False, task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(loaded, lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = adapted(IDS).logits
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )  # as PEFT writes it, and AutoPeftModelForCausalLM reads it
    llama = tmp_path / "llama-base"
    assert cli("apply", "--source", tmp_path / "base", "--to", "llama", "--out", llama, "--quiet")[0] == 0

    code, _, err = cli(
        "apply", "--source", tmp_path / "adapter", "--to", "llama", "--out", tmp_path / "plain", "--quiet"
    )
    assert code == 0, err
    (said,) = err.splitlines()
    assert said.startswith(f"warning: {tmp_path / 'plain'}: adapter_config.json names no base model")
    assert "--set base_model_name_or_path=" in said
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert [config[k] for k in NAMES_THE_BASE] == [None] * len(NAMES_THE_BASE)
    assert peft.PeftConfig.from_pretrained(tmp_path / "plain").base_model_name_or_path is None  # no model to load

    named = tmp_path / "named"
    code, _, err = cli(
        "apply", "--source", tmp_path / "adapter", "--to", "llama", "--out", named, "--quiet",
        "--set", f"base_model_name_or_path={llama}",
    )  # fmt: skip
    assert code == 0 and err == "", err
    auto = AutoPeftModelForCausalLM.from_pretrained(named, dtype=torch.float32).eval()
    assert type(auto.get_base_model()).__name__ == "LlamaForCausalLM"
    written = load_file(named / "adapter_model.safetensors")
    assert sorted(peft.get_peft_model_state_dict(auto)) == sorted(written)
    with torch.no_grad():
        assert (auto(IDS).logits - expected).abs().max().item() <= 1e-5
