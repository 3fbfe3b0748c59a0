"""Phi-4-multimodal and the Phi vision models (#31), proven by function.

Tiny random models are made by transformers' own ``Phi4MultimodalForCausalLM`` and written back into the
original remote-code layout (``Phi4MMForCausalLM``: every decoder linear wrapped by PEFT, ``base_layer`` beside
``lora_A.vision`` …) by the inverse of the table in transformers' ``convert_phi4_multimodal_weights_to_hf.py``,
with LoRA ranks other than Microsoft's. The CLI converts them; the text model is compared with the native
class's text logits on both sides of ``original_max_position_embeddings``, and each adapter, loaded by PEFT on
the text model, with the text weights with that LoRA merged at the checkpoint's own r and alpha.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.phi3 import modeling_phi3
from transformers.models.phi4_multimodal import configuration_phi4_multimodal, modeling_phi4_multimodal
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()

Cli = Callable[..., tuple[int, str, str]]
LENGTHS = (10, 24)  # both sides of original_max_position_embeddings (16)
ROTARY = 6  # head_dim 8 x partial_rotary_factor 0.75
TEXT = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": True,
    "sliding_window": 262144,
}
SHORT = [1.0 + 0.1 * i for i in range(ROTARY // 2)]
LONG = [2.0 + 0.3 * i for i in range(ROTARY // 2)]
# Ranks and alphas other than Microsoft's (256/512 and 320/640), so a hard-coded adapter_config shows.
LORAS = {  # each section as config.json has it (its layer regex as the release writes it)
    "vision": {
        "dp": 0.0,
        "lora_alpha": 12,
        "r": 6,
        "layer": r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))",
    },
    "speech": {
        "dp": 0.01,
        "lora_alpha": 10,
        "r": 5,
        "layer": r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))",
    },
}
# The inverse of transformers' STATE_DICT_MAPPING (original name -> native name): native -> original.
AUDIO, IMAGE = r"model\.embed_tokens_extend\.audio_embed", r"model\.embed_tokens_extend\.image_embed"
ENCODER_NAMES = [
    (rf"^({AUDIO}\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.gate_up_proj", r"\1.net.0.linear"),
    (rf"^({AUDIO}\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.down_proj", r"\1.net.2"),
    (rf"^({AUDIO}\.encoder\.encoders\.\d+\.self_attn)\.(q|k|v)_proj", r"\1.linear_\2"),
    (rf"^({AUDIO}\.encoder\.encoders\.\d+\.self_attn)\.o_proj", r"\1.linear_out"),
    (rf"^({IMAGE})\.img_projection_up", r"\1.img_projection.0"),
    (rf"^({IMAGE})\.img_projection_down", r"\1.img_projection.2"),
    (rf"^({IMAGE})\.global_img_feature_extensor", r"\1.glb_GN"),
    (rf"^({IMAGE})\.sub_img_feature_extensor", r"\1.sub_GN"),
    (rf"^({AUDIO})\.up_proj_for_speech", r"\1.audio_projection.speech.0"),
    (rf"^({AUDIO})\.down_proj_for_speech", r"\1.audio_projection.speech.2"),
    (rf"^({AUDIO})\.up_proj_for_vision_speech", r"\1.audio_projection.vision.0"),
    (rf"^({AUDIO})\.down_proj_for_vision_speech", r"\1.audio_projection.vision.2"),
]
WRAPPED = re.compile(r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)\.weight")


# The audio section of config.json, as transformers' script reads it (attention_dim is its hidden_size …).
AUDIO_CONFIG = {
    "attention_dim": 16,
    "attention_heads": 2,
    "linear_units": 24,
    "num_blocks": 1,
    "ext_pw_out_channel": 16,
    "depthwise_separable_out_channel": 16,
    "input_size": 8,
    "nemo_conv_settings": {"conv_channels": 16},
    "relative_attention_bias_args": {"t5_bias_max_distance": 1000, "type": "t5"},
    "activation": "swish",
    "time_reduction": 8,
    "kernel_size": 3,
}


def native_model(seed: int = 0) -> modeling_phi4_multimodal.Phi4MultimodalForCausalLM:
    """A tiny random Phi-4-multimodal: Phi-4-mini's text shape (partial rotary, longrope, tied embeddings)."""
    torch.manual_seed(seed)
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": SHORT,
        "long_factor": LONG,
        "original_max_position_embeddings": 16,
        "partial_rotary_factor": 0.75,
    }
    vision = {  # SigLIP's head count (16): the remote code's config.json does not say it, no shape shows it
        "hidden_size": 32,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 16,
        "image_size": 28,
        "patch_size": 14,
        "crop_size": 28,
        "image_token_id": 90,
    }
    audio = {
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_blocks": 1,
        "num_attention_heads": 2,
        "ext_pw_out_channel": 16,
        "depthwise_separable_out_channel": 16,
        "nemo_conv_channels": 16,
        "input_size": 8,
        "audio_token_id": 91,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = configuration_phi4_multimodal.Phi4MultimodalConfig(
            **TEXT, rope_parameters=rope, original_max_position_embeddings=16, vision_config=vision, audio_config=audio
        )
    model = modeling_phi4_multimodal.Phi4MultimodalForCausalLM(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def remote_config(loras: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """config.json as Phi-4-multimodal-instruct's remote code has it (model_type phi4mm, 4.x rope fields)."""
    return {
        **TEXT,
        "architectures": ["Phi4MMForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM"},
        "model_type": "phi4mm",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 16,
        "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
        "rope_theta": 10000.0,
        "embd_layer": {
            "embedding_cls": "image_audio",
            "image_embd_layer": {"crop_size": 28, "hd_transform_order": "sub_glb", "use_hd_transform": True},
            "audio_embd_layer": {"downsample_rate": 1, "embedding_cls": "audio"},
        },
        "audio_processor": {"name": "cascades", "config": AUDIO_CONFIG},
        "img_processor": None,
        **{f"{name}_lora": section for name, section in loras.items()},
    }


def remote_checkpoint(
    model: modeling_phi4_multimodal.Phi4MultimodalForCausalLM,
    folder: Path,
    loras: dict[str, dict[str, Any]] = LORAS,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """The model written back in the original layout, with random LoRAs of the given ranks on every decoder
    linear; returns the state dict written."""
    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: the original checkpoint does not hold it
            continue
        for pattern, original in ENCODER_NAMES:
            name = re.sub(pattern, original, name)
        if WRAPPED.fullmatch(name):
            module = name.removesuffix(".weight")
            state[f"{module}.base_layer.weight"] = tensor.clone()
            for lora, section in loras.items():
                state[f"{module}.lora_A.{lora}.weight"] = torch.randn(section["r"], tensor.shape[1]) * 0.3
                state[f"{module}.lora_B.{lora}.weight"] = torch.randn(tensor.shape[0], section["r"]) * 0.3
        else:
            state[name] = tensor.clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(remote_config(loras), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return state


def logits(model: torch.nn.Module, length: int) -> torch.Tensor:
    ids = torch.arange(length).remainder(90).unsqueeze(0) + 3
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged(text: modeling_phi3.Phi3ForCausalLM, state: dict[str, torch.Tensor], lora: str) -> torch.nn.Module:
    """The text model with one LoRA merged into its weights at the checkpoint's own scale, alpha / r."""
    section = LORAS[lora]
    scale = section["lora_alpha"] / section["r"]
    weights = {k: v.clone() for k, v in text.state_dict().items()}
    for name in weights:
        if WRAPPED.fullmatch(name):
            module = name.removesuffix(".weight")
            weights[name] += scale * state[f"{module}.lora_B.{lora}.weight"] @ state[f"{module}.lora_A.{lora}.weight"]
    result = modeling_phi3.Phi3ForCausalLM(text.config).eval()
    result.load_state_dict(weights, strict=False)
    result.tie_weights()
    return result


def load_strict(folder: Path) -> modeling_phi3.Phi3ForCausalLM:
    model, info = modeling_phi3.Phi3ForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def peft_on(text: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """PEFT's own model with the adapter folder loaded; every tensor of the file is one PEFT expects."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    settings = json.loads((adapter / "adapter_config.json").read_text())
    wanted = set(
        get_peft_model_state_dict(
            get_peft_model(
                _copy(text),
                LoraConfig(
                    **{k: v for k, v in settings.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"}
                ),
            )
        )
    )
    assert set(load_file(adapter / "adapter_model.safetensors")) == wanted
    return PeftModel.from_pretrained(_copy(text), adapter).eval()


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor], Path, str]:
    from phi_rules.cli import main

    root = tmp_path_factory.mktemp("phi4mm")
    native = native_model()
    state = remote_checkpoint(native, root / "remote")
    out = root / "text"
    assert main(["apply", "--source", str(root / "remote"), "--to", "phi3", "--out", str(out), "--quiet"]) == 0
    return native, state, out, ""


@pytest.mark.parametrize("length", LENGTHS)
def test_text_model_gives_the_native_text_logits(converted: Any, length: int) -> None:
    native, _, out, _ = converted
    text = load_strict(out)
    delta = (logits(text, length) - logits(native, length)).abs().max().item()
    assert delta <= 1e-5


def test_text_model_config_and_side_files(converted: Any) -> None:
    _, _, out, _ = converted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["architectures"] == ["Phi3ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.75
    assert config["rope_parameters"]["original_max_position_embeddings"] == 16
    assert not {"vision_lora", "speech_lora", "embd_layer", "auto_map"} & set(config)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    assert (out / "tokenizer_config.json").exists()
    assert not [n for n in load_file(out / "model.safetensors") if "embed_tokens_extend" in n or "lora" in n]


@pytest.mark.parametrize("lora", ["vision", "speech"])
def test_adapters_equal_the_merged_lora(converted: Any, lora: str) -> None:
    _, state, out, _ = converted
    adapter = out / f"{lora}-lora"
    settings = json.loads((adapter / "adapter_config.json").read_text())
    section = LORAS[lora]
    assert (settings["r"], settings["lora_alpha"], settings["lora_dropout"]) == (
        section["r"],
        section["lora_alpha"],
        section["dp"],
    )
    text = load_strict(out)
    reference = merged(text, state, lora)
    for length in LENGTHS:
        got = logits(peft_on(text, adapter), length)
        assert (got - logits(reference, length)).abs().max().item() <= 1e-5
        assert (got - logits(text, length)).abs().max().item() > 1e-2  # the LoRA really changes the function


def test_a_fine_tune_without_the_speech_lora_converts_and_says_so(cli: Cli, tmp_path: Path) -> None:
    native = native_model()
    state = remote_checkpoint(native, tmp_path / "remote", loras={"vision": LORAS["vision"]})
    code, _, err = cli("apply", "--source", tmp_path / "remote", "--to", "phi3", "--out", tmp_path / "out")
    assert code == 0, err
    said = [line for line in err.splitlines() if "speech-lora" in line]
    assert len(said) == 1 and "speech-lora/ not written: the source has no speech LoRA" in said[0], err
    assert not (tmp_path / "out" / "speech-lora").exists()
    text = load_strict(tmp_path / "out")
    got = logits(peft_on(text, tmp_path / "out" / "vision-lora"), LENGTHS[1])
    assert (got - logits(merged(text, state, "vision"), LENGTHS[1])).abs().max().item() <= 1e-5


def _broken(folder: Path, change: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> Path:
    remote_checkpoint(native_model(), folder)
    state, config = load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())
    change(state, config)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            lambda s, c: s.pop("model.layers.1.mlp.down_proj.lora_B.speech.weight"),
            "refused: part speech-lora: base_model.model.model.layers.1.mlp.down_proj has lora_A but no lora_B",
        ),
        (
            lambda s, c: s.pop("model.layers.0.self_attn.o_proj.lora_A.vision.weight"),
            "refused: part vision-lora: base_model.model.model.layers.0.self_attn.o_proj has lora_B but no lora_A",
        ),
        (
            lambda s, c: c["vision_lora"].update(r=7),
            "refused: part vision-lora: base_model.model.model.layers.0.mlp.down_proj (and 15 more matrices) has "
            "rank 6 where the config's r is 7",
        ),
        (
            lambda s, c: c["vision_lora"].update(layer=r"layers.*self_attn\.(qkv_proj|o_proj)"),
            "target: part vision-lora, as PEFT reads it: the plan produces 8 tensor(s) Phi3ForCausalLM does not have: "
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
        ),
    ],
    ids=["speech-without-b", "vision-without-a", "rank-not-the-configs", "layer-regex-not-the-tensors"],
)
def test_a_broken_lora_is_refused_with_nothing_written(cli: Cli, tmp_path: Path, change: Any, said: str) -> None:
    source = _broken(tmp_path / "remote", change)
    code, _, err = cli("apply", "--source", source, "--to", "phi3", "--out", tmp_path / "out")
    assert code == 1 and said in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["remote"]  # no partial folder either


def test_force_replaces_an_output_with_its_adapter_folders_and_nothing_else(cli: Cli, tmp_path: Path) -> None:
    remote_checkpoint(native_model(), tmp_path / "remote")
    args = ("apply", "--source", tmp_path / "remote", "--to", "phi3", "--out", tmp_path / "out", "--force")
    assert cli(*args)[0] == 0 and cli(*args)[0] == 0
    (tmp_path / "out" / "vision-lora" / "notes.txt").write_text("mine")
    code, _, err = cli(*args)
    assert code == 1 and "(vision-lora/: it holds 'notes.txt', which phi-rules does not write)" in err
    assert (tmp_path / "out" / "vision-lora" / "notes.txt").read_text() == "mine"


def vision_checkpoint(folder: Path, seed: int = 0) -> modeling_phi3.Phi3ForCausalLM:
    """A Phi-3.5-vision-style checkpoint: a tiny Phi3 text model (longrope) and, under model.vision_embed_tokens,
    transformers' own CLIPVisionModel with the separators and projection of the remote code; config.json in
    the remote code's 2024 form (rope_scaling type su). Returns the text model, the reference."""
    from transformers.models.clip import configuration_clip, modeling_clip
    from transformers.models.phi3 import configuration_phi3

    torch.manual_seed(seed)
    text = {**TEXT, "num_key_value_heads": 4, "tie_word_embeddings": False}
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(4)],
        "long_factor": [2.0 + 0.3 * i for i in range(4)],
        "original_max_position_embeddings": 16,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = configuration_phi3.Phi3Config(**text, rope_parameters=rope, original_max_position_embeddings=16)
    model = modeling_phi3.Phi3ForCausalLM(config).eval()
    clip = modeling_clip.CLIPVisionModel(
        configuration_clip.CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
    )
    for p in [*model.parameters(), *clip.parameters()]:
        torch.nn.init.normal_(p, std=0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state |= {f"model.vision_embed_tokens.img_processor.{k}": v.clone() for k, v in clip.state_dict().items()}
    state |= {
        "model.vision_embed_tokens.glb_GN": torch.randn(1, 1, 64),
        "model.vision_embed_tokens.sub_GN": torch.randn(1, 1, 1, 64),
        "model.vision_embed_tokens.img_projection.0.weight": torch.randn(32, 64),
        "model.vision_embed_tokens.img_projection.0.bias": torch.randn(32),
        "model.vision_embed_tokens.img_projection.2.weight": torch.randn(32, 32),
        "model.vision_embed_tokens.img_projection.2.bias": torch.randn(32),
    }
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    remote = {
        **text,
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
        "original_max_position_embeddings": 16,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp"},
        "img_processor": {"image_dim_out": 16, "model_name": "openai/clip-vit-large-patch14-336", "num_img_tokens": 4},
    }
    (folder / "config.json").write_text(json.dumps(remote, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    return model


def test_a_phi35_vision_checkpoint_gives_the_phi3_text_logits(cli: Cli, tmp_path: Path) -> None:
    reference = vision_checkpoint(tmp_path / "remote")
    code, out, err = cli("detect", tmp_path / "remote")
    assert code == 0 and "phi3_v layout" in out and f"run: phi-rules apply --source {tmp_path / 'remote'}" in out, out
    code, _, err = cli("apply", "--source", tmp_path / "remote", "--to", "phi3", "--out", tmp_path / "out")
    assert code == 0, err
    text = load_strict(tmp_path / "out")
    for length in LENGTHS:
        assert (logits(text, length) - logits(reference, length)).abs().max().item() <= 1e-5
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, 5]


# transformers' STATE_DICT_MAPPING, original name -> native name (convert_phi4_multimodal_weights_to_hf.py).
AUDIO_AT, IMAGE_AT = "model.embed_tokens_extend.audio_embed", "model.embed_tokens_extend.image_embed"
TRANSFORMERS_TABLE = [
    (
        rf"^{AUDIO}\.encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.net\.0\.linear",
        rf"{AUDIO_AT}.encoder.encoders.\1.feed_forward_\2.gate_up_proj",
    ),
    (
        rf"^{AUDIO}\.encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.net\.2",
        rf"{AUDIO_AT}.encoder.encoders.\1.feed_forward_\2.down_proj",
    ),
    (
        rf"^{AUDIO}\.encoder\.encoders\.(\d+)\.self_attn\.linear_(q|k|v)",
        rf"{AUDIO_AT}.encoder.encoders.\1.self_attn.\2_proj",
    ),
    (
        rf"^{AUDIO}\.encoder\.encoders\.(\d+)\.self_attn\.linear_out",
        rf"{AUDIO_AT}.encoder.encoders.\1.self_attn.o_proj",
    ),
    (rf"^{IMAGE}\.img_projection\.0", f"{IMAGE_AT}.img_projection_up"),
    (rf"^{IMAGE}\.img_projection\.2", f"{IMAGE_AT}.img_projection_down"),
    (rf"^{IMAGE}\.glb_GN", f"{IMAGE_AT}.global_img_feature_extensor"),
    (rf"^{IMAGE}\.sub_GN", f"{IMAGE_AT}.sub_img_feature_extensor"),
    (rf"^{AUDIO}\.audio_projection\.speech\.0", f"{AUDIO_AT}.up_proj_for_speech"),
    (rf"^{AUDIO}\.audio_projection\.speech\.2", f"{AUDIO_AT}.down_proj_for_speech"),
    (rf"^{AUDIO}\.audio_projection\.vision\.0", f"{AUDIO_AT}.up_proj_for_vision_speech"),
    (rf"^{AUDIO}\.audio_projection\.vision\.2", f"{AUDIO_AT}.down_proj_for_vision_speech"),
]


def transformers_names(name: str) -> str | None:
    """Where transformers' script puts an original tensor: its table first, then LoRA tensors dropped and
    base_layer stripped, else the name as it is."""
    for pattern, to in TRANSFORMERS_TABLE:
        new, hits = re.subn(pattern, to, name)
        if hits:
            return new
    if "lora" in name:
        return None
    return name.replace("base_layer.", "")


def test_native_layout_is_transformers_table_and_loads_strictly(cli: Cli, tmp_path: Path) -> None:
    native = native_model()
    state = remote_checkpoint(native, tmp_path / "remote")
    code, _, err = cli("apply", "--source", tmp_path / "remote", "--to", "phi4-multimodal", "--out", tmp_path / "out")
    assert code == 0, err
    expected = {new: t for name, t in state.items() if (new := transformers_names(name)) is not None}
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], expected[k]) for k in expected)  # bit for bit
    model, info = modeling_phi4_multimodal.Phi4MultimodalForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for length in LENGTHS:
        assert (logits(model.eval(), length) - logits(native, length)).abs().max().item() <= 1e-5
    for lora, section in LORAS.items():  # the script's adapter tensors, under PEFT's own prefix
        adapter = load_file(tmp_path / "out" / f"{lora}-lora" / "adapter_model.safetensors")
        theirs = {
            "base_model.model." + k.replace(f"{lora}.", ""): t
            for k, t in state.items()
            if f"lora_A.{lora}" in k or f"lora_B.{lora}" in k
        }
        assert set(adapter) == set(theirs) and all(torch.equal(adapter[k], theirs[k]) for k in theirs)
        settings = json.loads((tmp_path / "out" / f"{lora}-lora" / "adapter_config.json").read_text())
        assert (settings["r"], settings["lora_alpha"]) == (section["r"], section["lora_alpha"])


def test_detect_names_the_layout_and_its_targets(cli: Cli, tmp_path: Path) -> None:
    remote_checkpoint(native_model(), tmp_path / "remote")
    code, out, _ = cli("detect", tmp_path / "remote", "--all")
    fits = sorted(line.split()[0] for line in out.splitlines() if " yes" in line)
    assert fits == ["phi4mm-to-phi3", "phi4mm-to-phi4-multimodal"], out
    code, _, err = cli("apply", "--source", tmp_path / "remote", "--out", tmp_path / "out")
    assert code == 1 and "converts to phi3, phi4-multimodal: pick one with --to phi3" in err, err
    assert not (tmp_path / "out").exists()


def test_plan_shows_each_part_with_its_tensors_and_config(cli: Cli, tmp_path: Path) -> None:
    remote_checkpoint(native_model(), tmp_path / "remote")
    code, out, err = cli("plan", "--source", tmp_path / "remote", "--to", "phi3", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["parts"]["speech-lora"]["r"] == LORAS["speech"]["r"]
    named = {t["name"]: t["sources"] for t in plan["tensors"]}
    assert named["vision-lora/base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] == [
        "model.layers.1.mlp.down_proj.lora_B.vision.weight"
    ]
    assert not (tmp_path / "out").exists()


def test_native_back_to_the_remote_layout_bit_for_bit(cli: Cli, tmp_path: Path) -> None:
    state = remote_checkpoint(native_model(), tmp_path / "remote")
    native = tmp_path / "native"
    assert cli("apply", "--source", tmp_path / "remote", "--to", "phi4-multimodal", "--out", native)[0] == 0
    # the native release's adapter keys lack PEFT's prefix: both forms read back
    speech = native / "speech-lora" / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(speech).items()}, speech)
    code, _, err = cli("apply", "--source", native, "--to", "phi4mm", "--out", tmp_path / "back")
    assert code == 0, err
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "phi4mm" and config["architectures"] == ["Phi4MMForCausalLM"]
    assert {k: config[f"{k}_lora"] for k in LORAS} == LORAS
    audio = config["audio_processor"]["config"]
    assert {k: audio[k] for k in AUDIO_CONFIG} == AUDIO_CONFIG
    assert config["rope_scaling"] == {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}
    assert config["partial_rotary_factor"] == 0.75 and "rope_parameters" not in config


def test_native_back_without_an_adapter_folder_is_refused(cli: Cli, tmp_path: Path) -> None:
    remote_checkpoint(native_model(), tmp_path / "remote")
    native = tmp_path / "native"
    assert cli("apply", "--source", tmp_path / "remote", "--to", "phi4-multimodal", "--out", native)[0] == 0
    for f in (native / "speech-lora").iterdir():
        f.unlink()
    (native / "speech-lora").rmdir()
    code, _, err = cli("apply", "--source", native, "--to", "phi4mm", "--out", tmp_path / "back")
    assert code == 1 and "Traceback" not in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            "--to phi4mm refused: the folder lacks vision-lora/ or speech-lora/ (adapter_model.safetensors and "
            "adapter_config.json): the original layout holds both LoRAs in its tensors and both sections in "
            "config.json, and none is made up (rule phi4-multimodal-to-phi4mm)"
        )
    ), err
    assert not (tmp_path / "back").exists()
