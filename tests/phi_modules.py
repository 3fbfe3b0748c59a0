"""The original Phi architecture as torch modules named like the 2023 remote code, for PEFT to wrap.

PEFT injects LoRA by module name, so adapters "trained on the original layout" need modules named
``transformer.h.N.mixer.Wqkv`` (phi-msft) or ``layers.N.mixer.Wqkv`` (MixFormer-sequential). The
computation is phi_reference's, written with nn.Linear layers; a test checks the two agree.
"""

from __future__ import annotations

import math

import torch
from phi_reference import MsftConfig, _gelu_new, _rotary
from torch import nn


class Mixer(nn.Module):
    def __init__(self, cfg: MsftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.Wqkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cfg, t = self.cfg, h.shape[0]
        qkv = self.Wqkv(h).view(t, 3, cfg.n_head, cfg.head_dim)
        q, k, v = _rotary(qkv[:, 0], cfg.rotary_dim), _rotary(qkv[:, 1], cfg.rotary_dim), qkv[:, 2]
        mask = torch.full((t, t), float("-inf")).triu(1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(cfg.head_dim) + mask
        return self.out_proj(torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, cfg.n_embd))


class MLP(nn.Module):
    def __init__(self, cfg: MsftConfig) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.fc1, self.fc2 = nn.Linear(cfg.n_embd, inner), nn.Linear(inner, cfg.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(_gelu_new(self.fc1(h)))


class Block(nn.Module):
    def __init__(self, cfg: MsftConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mixer, self.mlp = Mixer(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.mixer(h) + self.mlp(h)


class Embedding(nn.Module):
    def __init__(self, cfg: MsftConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)


class Head(nn.Module):
    def __init__(self, cfg: MsftConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.linear = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.ln(x))


class Transformer(nn.Module):
    def __init__(self, cfg: MsftConfig) -> None:
        super().__init__()
        self.embd = Embedding(cfg)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))


class PhiMsft(nn.Module):
    """phi-msft: transformer.embd.wte, transformer.h.N, lm_head.{ln,linear}."""

    def __init__(self, cfg: MsftConfig) -> None:
        super().__init__()
        self.transformer, self.lm_head = Transformer(cfg), Head(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer.embd(ids)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(x)


class MixFormerSequential(nn.Module):
    """MixFormer-sequential: layers.0 embeddings, layers.1..N blocks, layers.N+1 head."""

    def __init__(self, cfg: MsftConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(Embedding(cfg), *(Block(cfg) for _ in range(cfg.n_layer)), Head(cfg))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layers(ids)


def from_mixformer(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """MixFormer-sequential names back to phi-msft names (the inverse of phi_reference.to_mixformer)."""
    out = {}
    for k, v in state.items():
        index, rest = k.removeprefix("layers.").split(".", 1)
        if index == "0":
            out[f"transformer.embd.{rest}"] = v
        elif int(index) == n_layer + 1:
            out[f"lm_head.{rest}"] = v
        else:
            out[f"transformer.h.{int(index) - 1}.{rest}"] = v
    return out
