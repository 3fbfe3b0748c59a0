"""The original Phi (phi-msft) architecture, written from its description, and random checkpoints.

Nothing here comes from phi_rules or transformers: it is the independent side of the logits tests.
Block: one LayerNorm, then attention and MLP in parallel, both added to the residual. Attention
uses a fused ``Wqkv`` whose rows are [all q; all k; all v] (heads inside each; with ``n_head_kv``, fewer
key/value heads, each serving consecutive query heads) and rotary
embeddings (rotate-half, base 10000) on the first ``rotary_dim`` dims of each head. Head:
``lm_head.ln`` then ``lm_head.linear`` with bias.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass(frozen=True)
class MsftConfig:
    vocab_size: int = 96
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    rotary_dim: int = 8
    n_inner: int | None = None
    n_head_kv: int | None = None  # grouped-query attention: fewer key/value heads than query heads
    n_positions: int = 64
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head_kv or self.n_head

    def to_json(self) -> dict[str, object]:
        """A config.json as the original repos shipped it (model_type phi-msft)."""
        return {
            "model_type": "phi-msft",
            "architectures": ["PhiForCausalLM"],
            "activation_function": "gelu_new",
            "vocab_size": self.vocab_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_head_kv": self.n_head_kv,
            "n_inner": self.n_inner,
            "rotary_dim": self.rotary_dim,
            "n_positions": self.n_positions,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": False,
        }


def random_state(
    cfg: MsftConfig, dtype: torch.dtype = torch.float32, *, inv_freq: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random phi-msft state dict; ``inv_freq`` adds the rotary buffers old .bin files carry."""
    g = torch.Generator().manual_seed(seed)
    inner = cfg.n_inner or 4 * cfg.n_embd
    e = cfg.n_embd
    qkv = e + 2 * cfg.kv_heads * cfg.head_dim

    def r(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    state = {"transformer.embd.wte.weight": r(cfg.vocab_size, e, scale=1.0)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        state |= {
            p + "ln.weight": 1 + r(e, scale=0.1),
            p + "ln.bias": r(e, scale=0.1),
            p + "mixer.Wqkv.weight": r(qkv, e),
            p + "mixer.Wqkv.bias": r(qkv, scale=0.1),
            p + "mixer.out_proj.weight": r(e, e),
            p + "mixer.out_proj.bias": r(e, scale=0.1),
            p + "mlp.fc1.weight": r(inner, e),
            p + "mlp.fc1.bias": r(inner, scale=0.1),
            p + "mlp.fc2.weight": r(e, inner, scale=0.1),
            p + "mlp.fc2.bias": r(e, scale=0.1),
        }
        if inv_freq:
            state[p + "mixer.rotary_emb.inv_freq"] = 1.0 / 10000 ** (
                torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float32) / cfg.rotary_dim
            )
    state |= {
        "lm_head.ln.weight": 1 + r(e, scale=0.1),
        "lm_head.ln.bias": r(e, scale=0.1),
        "lm_head.linear.weight": r(cfg.vocab_size, e),
        "lm_head.linear.bias": r(cfg.vocab_size, scale=0.1),
    }
    return state


def to_mixformer(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """The same weights under MixFormer-sequential names: layers.0 embeddings, blocks 1..N, head N+1."""
    out = {}
    for k, v in state.items():
        if k.startswith("transformer.embd."):
            out["layers.0." + k.removeprefix("transformer.embd.")] = v
        elif k.startswith("transformer.h."):
            i, rest = k.removeprefix("transformer.h.").split(".", 1)
            out[f"layers.{int(i) + 1}.{rest}"] = v
        else:
            out[f"layers.{n_layer + 1}." + k.removeprefix("lm_head.")] = v
    return out


def write_checkpoint(
    folder: Path, state: dict[str, torch.Tensor], cfg: MsftConfig | None, fmt: str = "safetensors", shards: int = 1
) -> Path:
    """Save like the original repos: safetensors (optionally sharded, with an index) or pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = list(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[s * per : (s + 1) * per]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# The seed's mapping and convert_weights, as in transformers' old convert_phi_weights_to_hf.py: what
# transformers 4.35/4.36 then saved for every Phi fine-tune (the third legacy layout).
PHI_MAPPING = {
    "transformer.embd.wte.weight": "model.embed_tokens.weight",
    "lm_head.linear": "lm_head",
    "lm_head.ln": "model.final_layernorm",
    "layers": "model.layers",
    "transformer": "model",
    ".h.": ".layers.",
    "ln": "input_layernorm",
    "mixer": "self_attn",
    "Wqkv": "query_key_value",
    "out_proj": "dense",
}


class SeedConfig:
    def __init__(self, num_attention_heads: int, hidden_size: int) -> None:
        self.num_attention_heads, self.hidden_size = num_attention_heads, hidden_size


def seed_convert_weights(original_weights, mapping, config):
    converted_weights = {}
    original_weights_keys = sorted(original_weights.keys())
    for original_weights_key in original_weights_keys:
        new_key = original_weights_key
        if "rotary_emb" in new_key:
            continue
        if "Wqkv" in new_key:
            if "weight" in new_key:
                weight = original_weights[new_key]
                weights_shape = weight.shape
                weight = (
                    weight.view(3, config.num_attention_heads, -1, config.hidden_size)
                    .transpose(0, 1)
                    .reshape(*weights_shape)
                )
                original_weights[new_key] = weight
            elif "bias" in new_key:
                bias = original_weights[new_key]
                bias_shape = bias.shape
                bias = bias.view(3, config.num_attention_heads, -1).transpose(0, 1).reshape(*bias_shape)
                original_weights[new_key] = bias
        for k, v in mapping.items():
            if k in new_key:
                new_key = new_key.replace(k, v)
        converted_weights[new_key] = original_weights.pop(original_weights_key)
    return converted_weights


def to_transformers_436(state: dict[str, torch.Tensor], cfg: MsftConfig) -> dict[str, torch.Tensor]:
    """The same weights in the transformers 4.36 layout, exactly as the seed converted them."""
    return seed_convert_weights(
        {k: v.clone() for k, v in state.items()}, PHI_MAPPING, SeedConfig(cfg.n_head, cfg.n_embd)
    )


def config_436(cfg: MsftConfig) -> dict[str, object]:
    """A config.json as transformers 4.36 saved it: model_type phi, partial_rotary_factor, no KV heads."""
    return {
        "model_type": "phi",
        "architectures": ["PhiForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.n_inner or 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "hidden_act": "gelu_new",
        "max_position_embeddings": cfg.n_positions,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_epsilon,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim,
        "qk_layernorm": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
    }


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rotary(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x: [T, H, D]; rotate-half on the first ``rotary_dim`` dims of each head, base 10000."""
    t = x.shape[0]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)  # [T, rotary_dim/2]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    rot, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, keep], dim=-1)


def reference_logits(state: dict[str, torch.Tensor], cfg: MsftConfig, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of the original architecture for one sequence, computed in float32."""
    s = {k: v.float() for k, v in state.items()}
    h_dim, n_head, eps = cfg.head_dim, cfg.n_head, cfg.layer_norm_epsilon
    x = s["transformer.embd.wte.weight"][ids]
    t = ids.shape[0]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = _layer_norm(x, s[p + "ln.weight"], s[p + "ln.bias"], eps)
        qkv = h @ s[p + "mixer.Wqkv.weight"].T + s[p + "mixer.Wqkv.bias"]
        kv = cfg.kv_heads * h_dim
        q = _rotary(qkv[:, : cfg.n_embd].view(t, n_head, h_dim), cfg.rotary_dim)
        k = _rotary(qkv[:, cfg.n_embd : cfg.n_embd + kv].view(t, cfg.kv_heads, h_dim), cfg.rotary_dim)
        v = qkv[:, cfg.n_embd + kv :].view(t, cfg.kv_heads, h_dim)
        # Each key/value head serves n_head / kv_heads consecutive query heads (the remote code's repeat_interleave).
        k, v = (x.repeat_interleave(n_head // cfg.kv_heads, dim=1) for x in (k, v))
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(h_dim) + mask
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, cfg.n_embd)
        attn = attn @ s[p + "mixer.out_proj.weight"].T + s[p + "mixer.out_proj.bias"]
        mlp = _gelu_new(h @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"]) @ s[p + "mlp.fc2.weight"].T
        x = x + attn + mlp + s[p + "mlp.fc2.bias"]
    x = _layer_norm(x, s["lm_head.ln.weight"], s["lm_head.ln.bias"], eps)
    return x @ s["lm_head.linear.weight"].T + s["lm_head.linear.bias"]


def converted_logits(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """Logits of the converted folder through AutoModelForCausalLM, in float32, and its loading info."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model(ids[None]).logits[0], info


IDS = torch.tensor([3, 17, 5, 42, 8, 61, 0, 77, 12, 9, 33, 50])


def file_keys(folder: Path) -> list[str]:
    """Every tensor name in the written files, counted by us (transformers ignores stray keys)."""
    keys: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            keys += list(fh.keys())
    if (folder / "pytorch_model.bin").exists():
        keys += list(torch.load(folder / "pytorch_model.bin", weights_only=True))
    return keys


def assert_same_function(out: Path, state: dict[str, torch.Tensor], cfg: MsftConfig) -> None:
    from transformers import AutoModelForCausalLM

    got, info = converted_logits(out, IDS)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    model_keys = set(AutoModelForCausalLM.from_pretrained(out).state_dict())
    keys = file_keys(out)
    assert len(keys) == len(set(keys)) and set(keys) == model_keys, set(keys) ^ model_keys
    ref = reference_logits(state, cfg, IDS)
    assert ref.std() > 0.1  # logits that vary, so that a wrong conversion cannot pass by accident
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5, diff
