"""Phi-3, Phi-3.5 and Phi-4 to and from Llama/Mistral (#23), proven by function.

Tiny random ``Phi3ForCausalLM`` models shaped like each family member are written by transformers' own
``save_pretrained``, converted with the CLI (no rule named: the layout is detected, ``--to`` picks the
target), loaded strictly as the target class and compared by logits with the source model at lengths on
both sides of ``original_max_position_embeddings``. Refused targets: exit 1, one line, nothing at --out,
and a variant rule with the refusal switched off shows that the output really would compute otherwise.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from transformers.models.llama import configuration_llama, modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.phi3 import configuration_phi3, modeling_phi3
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()  # save_pretrained's bar would land in the CLI's captured stderr

Cli = Callable[..., tuple[int, str, str]]
LLAMA_RULE = ROOT / "rules" / "phi3" / "llama.yaml"
CLASSES = {
    "llama": modeling_llama.LlamaForCausalLM,
    "mistral": modeling_mistral.MistralForCausalLM,
    "phi3": modeling_phi3.Phi3ForCausalLM,
}
BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + 0.3 * i for i in range(8)],
    "original_max_position_embeddings": 16,
}
# Each family member's shape, in small: what makes it different is kept.
FAMILY: dict[str, dict[str, Any]] = {
    "phi-3-mini-4k": {"num_key_value_heads": 4, "sliding_window": 12},
    "phi-3-mini-128k": {"num_key_value_heads": 4, "rope_parameters": LONGROPE, "original_max_position_embeddings": 16},
    "phi-3-medium": {"num_key_value_heads": 1},
    "phi-4": {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0}},
    "phi-4-mini": {
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    },
}
LENGTHS = (10, 40)  # both sides of original_max_position_embeddings (16)


def phi3_model(shape: dict[str, Any], seed: int = 0) -> modeling_phi3.Phi3ForCausalLM:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = configuration_phi3.Phi3Config(**{**BASE, **shape})
    model = modeling_phi3.Phi3ForCausalLM(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def save(model: torch.nn.Module, folder: Path, dtype: torch.dtype = torch.float32, shard: str = "5GB") -> Path:
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    model.float()
    return folder


def logits(model: torch.nn.Module, n: int) -> torch.Tensor:
    ids = torch.randint(0, BASE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        return model(ids).logits.float()


def load_strictly(folder: Path, target: str) -> torch.nn.Module:
    model, info = CLASSES[target].from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert json.loads((folder / "config.json").read_text())["architectures"] == [CLASSES[target].__name__]
    return model.eval()


def assert_same_function(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for n in LENGTHS:
        delta = (logits(a, n) - logits(b, n)).abs().max().item()
        assert delta <= 1e-5, (n, delta)


def converts(cli: Cli, src: Path, out: Path, target: str, *extra: object) -> None:
    code, _, err = cli("apply", "--source", src, "--to", target, "--out", out, "--quiet", *extra)
    assert code == 0, err


EXACT = [
    ("phi-3-mini-4k", "mistral"),
    ("phi-3-mini-128k", "llama"),
    ("phi-3-mini-128k", "mistral"),
    ("phi-3-medium", "llama"),
    ("phi-4", "llama"),
    ("phi-4", "mistral"),
]


@pytest.mark.parametrize(("member", "target"), EXACT, ids=[f"{m}-to-{t}" for m, t in EXACT])
def test_family_member_converts_exactly(cli: Cli, tmp_path: Path, member: str, target: str) -> None:
    model = phi3_model(FAMILY[member])
    src = save(model, tmp_path / "src")
    converts(cli, src, tmp_path / "out", target)
    assert_same_function(model, load_strictly(tmp_path / "out", target))
    stored = load_file(tmp_path / "out" / "model.safetensors")
    split = 3 + 2  # q, k, v, gate, up for each fused pair
    assert len(stored) == len(model.state_dict()) + BASE["num_hidden_layers"] * (split - 2)


REFUSED = [
    ("phi-3-mini-4k", "llama", "sliding window", "use --to mistral"),
    ("phi-4-mini", "llama", "rotates part of each head", "keep Phi3"),
    ("phi-4-mini", "mistral", "rotates part of each head", "keep Phi3"),
]


@pytest.mark.parametrize(("member", "target", "says", "way_out"), REFUSED, ids=[f"{m}-to-{t}" for m, t, *_ in REFUSED])
def test_inexact_targets_are_refused(
    cli: Cli, tmp_path: Path, member: str, target: str, says: str, way_out: str
) -> None:
    src = save(phi3_model(FAMILY[member]), tmp_path / "src")
    for command in (["plan"], ["apply", "--out", tmp_path / "out"]):
        code, _, err = cli(*command, "--source", src, "--to", target)
        assert code == 1 and says in err and way_out in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no lock, no partial folder


@pytest.mark.parametrize(
    ("member", "target", "refusal"),
    [("phi-3-mini-4k", "llama", "sliding-window"), ("phi-4-mini", "llama", "partial-rotary")],
)
def test_each_refusal_guards_a_real_difference(
    cli: Cli, tmp_path: Path, member: str, target: str, refusal: str
) -> None:
    """The refusal switched off in a rule that extends the shipped one: the output loads, and computes otherwise."""
    model = phi3_model(FAMILY[member])
    src = save(model, tmp_path / "src")
    variant = tmp_path / "no-refusal.yaml"
    variant.write_text(
        f"version: 1\nname: no-refusal\nextends: {LLAMA_RULE}\nrefuse:\n  {refusal}: {{when: 'false'}}\n"
    )
    code, _, err = cli("apply", variant, "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    got = load_strictly(tmp_path / "out", target)
    assert (logits(model, 40) - logits(got, 40)).abs().max().item() > 1e-3


def test_detect_lists_every_target_and_why_not(cli: Cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-3-mini-4k"]), tmp_path / "src")
    code, out, _ = cli("detect", src, "--all")
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("phi3-to", "llama-to"))}
    assert rows["phi3-to-mistral"].split()[3] == "yes"
    assert rows["phi3-to-llama"].split()[3] == "no" and "sliding window" in rows["phi3-to-llama"]
    assert "--to mistral" in out.splitlines()[-1]
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err  # one target fits here, and no --to is needed for it: mistral
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_several_targets_ask_for_to(cli: Cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out")
    assert code == 1 and "converts to llama, mistral: pick one with --to llama" in err, err
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out", "--to", "lama")
    assert code == 1 and "did you mean 'llama'" in err, err
    assert not (tmp_path / "out").exists()


def test_to_beside_a_named_rule_is_used_or_refused(cli: Cli, tmp_path: Path) -> None:
    """A named rule writes its own target: --to that names it is used, any other is refused in one line."""
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    for command, rule, to in (
        ("apply", LLAMA_RULE, "mistral"),
        ("plan", LLAMA_RULE, "mistral"),
        ("apply", "phi3-to-llama", "phi-msft"),
    ):
        out = ("--out", tmp_path / "out") if command == "apply" else ()
        code, stdout, err = cli(command, rule, "--source", src, "--to", to, *out)
        assert code == 1 and stdout == "" and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: --to {to}: rule phi3-to-llama (") and "writes llama, not" in err, err
        assert not (tmp_path / "out").exists()
    code, _, err = cli("apply", LLAMA_RULE, "--source", src, "--to", "llama", "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("target", ["llama", "mistral"])  # every shipped rule that runs backward
def test_phi3_forward_and_back_is_bit_identical(cli: Cli, tmp_path: Path, target: str) -> None:
    """bf16, sharded by transformers, tied embeddings off: back to the very same bytes and config values."""
    model = phi3_model(FAMILY["phi-3-mini-128k"])
    src = save(model, tmp_path / "src", torch.bfloat16, shard="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    converts(cli, src, tmp_path / "there", target)
    converts(cli, tmp_path / "there", tmp_path / "back", "phi3")
    original: dict[str, torch.Tensor] = {}
    for f in src.glob("*.safetensors"):
        original |= load_file(f)
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name].view(torch.int16), tensor.view(torch.int16))
    before, after = (json.loads((f / "config.json").read_text()) for f in (src, tmp_path / "back"))
    for key in ("hidden_size", "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings"):
        assert after[key] == before[key], key
    for key, value in LONGROPE.items():
        assert after["rope_parameters"][key] == value, key
    # the source as transformers loads it: the model in memory holds rotary buffers rounded to bfloat16
    assert_same_function(load_strictly(src, "phi3"), load_strictly(tmp_path / "back", "phi3"))


def test_mistral_back_to_phi3_keeps_the_sliding_window(cli: Cli, tmp_path: Path) -> None:
    model = phi3_model(FAMILY["phi-3-mini-4k"])
    converts(cli, save(model, tmp_path / "src"), tmp_path / "mistral", "mistral")
    converts(cli, tmp_path / "mistral", tmp_path / "back", "phi3")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["sliding_window"] == 12
    assert_same_function(model, load_strictly(tmp_path / "back", "phi3"))


def test_a_plain_llama_converts_to_phi3_exactly(cli: Cli, tmp_path: Path) -> None:
    torch.manual_seed(3)
    config = configuration_llama.LlamaConfig(**BASE, num_key_value_heads=2, rope_parameters=dict(LONGROPE))
    llama = modeling_llama.LlamaForCausalLM(config).eval()
    for p in llama.parameters():
        torch.nn.init.normal_(p, std=0.2)
    src = save(llama, tmp_path / "src")
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out", "--quiet")  # only one target fits
    assert code == 0, err
    assert_same_function(llama, load_strictly(tmp_path / "out", "phi3"))


def test_the_2024_su_config_converts(cli: Cli, tmp_path: Path) -> None:
    """Phi-3-*-128k configs written before mid-2024: rope_scaling type su, original_max_position_embeddings at
    the top. The tensors are a Phi3's; the config is read by every name a field has had."""
    model = phi3_model(FAMILY["phi-3-mini-128k"])
    src = save(model, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config |= {
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
        "original_max_position_embeddings": 16,
    }
    (src / "config.json").write_text(json.dumps(config))
    for target in ("llama", "phi3"):  # --to phi3: today's config, the same tensors
        converts(cli, src, tmp_path / target, target)
        assert_same_function(model, load_strictly(tmp_path / target, target))
    today = json.loads((tmp_path / "phi3" / "config.json").read_text())
    assert today["rope_parameters"]["rope_type"] == "longrope" and today["original_max_position_embeddings"] == 16
    code, _, err = cli("apply", "--source", tmp_path / "phi3", "--to", "phi3", "--out", tmp_path / "again")
    assert code == 1 and "not in the 2024 form" in err, err  # today's form: nothing to convert


@pytest.mark.parametrize(("member", "target"), [("phi-3-mini-128k", "llama"), ("phi-3-mini-4k", "mistral")])
def test_verify_runs_the_source_through_its_own_class(cli: Cli, tmp_path: Path, member: str, target: str) -> None:
    src = save(phi3_model(FAMILY[member]), tmp_path / "src")
    converts(cli, src, tmp_path / "out", target, "--verify")
    code, out, err = cli("verify", "--source", src, tmp_path / "out")
    assert code == 0, out + err
    if member == "phi-3-mini-128k":  # probed on both sides of original_max_position_embeddings
        assert "layer 0 at 24 tokens" in out and "computes the original function" in out
        assert "probed 24 tokens: past original_max_position_embeddings 16 (longrope)" in out


@pytest.mark.parametrize(
    ("breakage", "says"),
    [
        ("swap-k-v", "layer 0 diverges"),
        ("drop-window", "layer 0 diverges"),
        ("long-factors-lost", "layer 0 at 24 tokens diverges"),  # only past original_max_position_embeddings
    ],
)
def test_verify_catches_a_wrong_output(cli: Cli, tmp_path: Path, breakage: str, says: str) -> None:
    from safetensors.torch import save_file

    shape = FAMILY["phi-3-mini-4k"] if breakage == "drop-window" else FAMILY["phi-3-mini-128k"]
    target = "mistral" if breakage == "drop-window" else "llama"
    src = save(phi3_model(shape), tmp_path / "src")
    out = tmp_path / "out"
    converts(cli, src, out, target)
    config = json.loads((out / "config.json").read_text())
    if breakage == "swap-k-v":
        state = load_file(out / "model.safetensors")
        k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
        state[k], state[v] = state[v], state[k]
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    elif breakage == "drop-window":
        config["sliding_window"] = None
    else:
        for rope in (config["rope_parameters"], config["rope_scaling"]):  # the copy older readers get too
            rope["long_factor"] = rope["short_factor"]
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = cli("verify", "--source", src, out)
    assert code == 1 and says in err, err


@pytest.mark.parametrize(
    ("member", "target"),
    [("phi-3-mini-128k", "llama"), ("phi-4", "llama"), ("phi-3-mini-4k", "mistral")],
)
def test_transformers_4_reads_the_output_as_the_source_computes(
    cli: Cli, tmp_path: Path, member: str, target: str
) -> None:
    """transformers 4.57 reads rope_theta, rope_scaling and original_max_position_embeddings at the top level:
    the same logits as the Phi3 source, on both sides of original_max_position_embeddings."""
    from test_interop import _tool, tf4_forward

    python = _tool("PHI_RULES_TF4_PYTHON", "a virtualenv with transformers==4.57.6")
    model = phi3_model(FAMILY[member])
    converts(cli, save(model, tmp_path / "src"), tmp_path / "out", target)
    for n in LENGTHS:
        ids = torch.randint(0, BASE["vocab_size"], (n,), generator=torch.Generator().manual_seed(n))
        result = tf4_forward(python, tmp_path / "out", ids.tolist())
        with torch.no_grad():
            want = model(ids[None]).logits[0]
        assert (torch.tensor(result["logits"]) - want).abs().max().item() <= 1e-4, n


def test_every_tensor_is_a_byte_copy(cli: Cli, tmp_path: Path) -> None:
    """Splits along dim 0 and concatenations: plan shows every output as source bytes, both ways."""
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src", torch.bfloat16)
    code, out, err = cli("plan", "--source", src, "--to", "llama", "--json")
    assert code == 0, err
    assert {t["bytes"] for t in json.loads(out)["tensors"]} == {"copy"}
    converts(cli, src, tmp_path / "llama", "llama")
    code, out, err = cli("plan", "--source", tmp_path / "llama", "--to", "phi3", "--json")
    assert code == 0, err
    assert {t["bytes"] for t in json.loads(out)["tensors"]} == {"copy"}
    code, out, _ = cli("plan", "--source", src, "--to", "llama", "--dtype", "float16")
    assert " cast " in out.splitlines()[1]


LLAMA_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def test_llama_cpp_converts_a_llamafied_phi4(cli: Cli, tmp_path: Path) -> None:
    """llama.cpp's own converter reads the Llama output of a Phi-4-shaped model: rope_theta 250000 and the
    grouped-query head counts arrive, and every tensor llama.cpp does not permute arrives bit for bit."""
    from test_interop import _tool, gguf_of

    llama_cpp = _tool("PHI_RULES_LLAMA_CPP", "llama.cpp's convert_hf_to_gguf.py and gguf-py")
    model = phi3_model({**FAMILY["phi-4"], "vocab_size": 50304})  # room for the GPT-2 tokenizer's ids
    src = save(model, tmp_path / "src")
    tokenizer = ROOT / "rules" / "examples" / "tiny-phi-2"
    converts(cli, src, tmp_path / "out", "llama", "--tokenizer", tokenizer)
    reader = gguf_of(llama_cpp, tmp_path / "out", tmp_path / "phi-4.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.rope.freq_base"].contents() == 250000.0
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}

    def gguf_name(name: str) -> str:
        module, param = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            layer, rest = module.removeprefix("model.layers.").split(".", 1)
            return f"blk.{layer}.{LLAMA_GGUF[rest]}.{param}"
        return f"{LLAMA_GGUF[module]}.{param}"

    assert set(theirs) == {gguf_name(n) for n in ours}
    for name, tensor in ours.items():
        if "q_proj" not in name and "k_proj" not in name:  # llama.cpp permutes q and k rows for its rotary
            assert torch.equal(theirs[gguf_name(name)].reshape(tensor.shape), tensor), name


def test_a_llama_with_biases_is_refused_for_phi3(cli, tmp_path: Path) -> None:
    """Phi3 has no place for attention biases: one line, nothing written (not a plan that fails on names)."""
    torch.manual_seed(4)
    config = configuration_llama.LlamaConfig(**BASE, num_key_value_heads=2, attention_bias=True)
    src = save(modeling_llama.LlamaForCausalLM(config), tmp_path / "src")
    code, _, err = cli("apply", "--source", src, "--to", "phi3", "--out", tmp_path / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "refused: the source has attention or MLP biases, which Phi3 has no place for; keep it a Llama" in err
    assert not (tmp_path / "out").exists()


def test_a_float16_source_converts_exactly(cli: Cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-3-medium"]), tmp_path / "src", torch.float16)
    converts(cli, src, tmp_path / "out", "llama")
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert_same_function(load_strictly(src, "phi3"), load_strictly(tmp_path / "out", "llama"))


def test_a_llama_with_a_rope_phi3_does_not_compute_is_refused(cli, tmp_path: Path) -> None:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    config = configuration_llama.LlamaConfig(**BASE, rope_parameters={**rope, "original_max_position_embeddings": 16})
    src = save(modeling_llama.LlamaForCausalLM(config), tmp_path / "src")
    code, _, err = cli("apply", "--source", src, "--to", "phi3", "--out", tmp_path / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "Phi3 computes only those two" in err and "keep it a Llama" in err


def test_a_phi3_config_with_another_rope_type_is_refused(cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-4"]), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = cli("plan", "--source", src, "--to", "llama")
    assert code == 1 and "the two that Phi3 computes" in err, err


@pytest.mark.parametrize("head_stored", [False, True])
def test_tied_embeddings_with_or_without_the_stored_head(cli: Cli, tmp_path: Path, head_stored: bool) -> None:
    """transformers omits a tied head when it saves; other tools store it: both convert, both ways."""
    from safetensors.torch import save_file

    model = phi3_model({**FAMILY["phi-3-medium"], "tie_word_embeddings": True})
    src = save(model, tmp_path / "src")
    if head_stored:
        state = load_file(src / "model.safetensors")
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    converts(cli, src, tmp_path / "llama", "llama")
    assert_same_function(model, load_strictly(tmp_path / "llama", "llama"))
    converts(cli, tmp_path / "llama", tmp_path / "back", "phi3")
    assert_same_function(model, load_strictly(tmp_path / "back", "phi3"))
