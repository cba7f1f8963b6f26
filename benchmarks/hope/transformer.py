"""Transformer++ baseline: RoPE, SwiGLU, RMSNorm, PyTorch SDPA, tied embeddings (nanoGPT shape).

The reference point of the HOPE benchmark's throughput and quality comparisons. Sized by
`presets.matched_transformer` to the HOPE model's parameter count (same width, depth and
heads; the SwiGLU hidden width absorbs the difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_hidden: int = 176     # SwiGLU hidden width (≈ 8/3 · D in LLaMA; here set to match HOPE)
    rope_base: float = 10000.0  # RoFormer (Su et al., 2021) default


# -----------------------------------------------------------------------------
# Rotary position embedding


def rope_tables(T, head_dim, base, device, dtype):
    """cos, sin tables (T, head_dim/2) for RoPE (Su et al., arXiv 2104.09864, eq. 34)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, d); cos, sin: (T, d/2). Rotates the pairs (x[:d/2], x[d/2:]) (GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# -----------------------------------------------------------------------------
# Block


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):  # x: (B, T, D); cos, sin: (T, d/2)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """W_down (SiLU(W_gate x) ⊙ W_up x) (Shazeer, arXiv 2002.05202)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):  # x: (B, T, D)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin):  # x: (B, T, D)
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


# -----------------------------------------------------------------------------
# Language model


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0 and (cfg.d_model // cfg.n_heads) % 2 == 0
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT
        for name, p in self.named_parameters():  # GPT-2 init; residual outputs scaled by depth
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("proj.weight", "w_down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids; targets: (B, T) or None (−100 = ignore) -> logits (B, T, V), loss."""
        x = self.wte(idx)
        cos, sin = rope_tables(idx.shape[1], self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            flat = logits.flatten(0, 1)
            flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
            loss = F.cross_entropy(flat, targets.flatten(), ignore_index=-100)
        return logits, loss
