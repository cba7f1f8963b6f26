"""Size presets for the HOPE benchmark and the parameter-matched Transformer++.

cpu-tiny   two CPU cores, ~1 minute for 200 steps: the CI / README comparison.
cpu-mqar   the MQAR recall recipe (vocab 64, 6 pairs, T = 48): HOPE must recall, and lose
           the recall with its writes off. AdamW's peak lr is 1e-3 here: at the general 3e-3,
           runs that differ only in float32 rounding or the seed either learned recall or
           stalled at loss ≈ 3.3 (3 of 6); at 1e-3 seeds 0, 1 and 2 all learned it.
gpu-small  a few minutes on one GPU.
gpu-125m   GPT-2-small scale (D = 768, 12 layers, ~125M parameters with CMS); micro-batches
           of 8 with gradient accumulation and activation checkpointing, to fit 70 GB
           (`train --plan`).

CMS periods: the paper gives none for its LM runs; docs/math.md §8 suggests (16, 64, 256) tokens,
used by the GPU presets. cpu-tiny trains on 128-token windows, where a 256-token level
would never write, so it keeps (16, 64).
"""

from __future__ import annotations

import torch

from .model import Hope, HopeConfig
from .transformer import Transformer, TransformerConfig

PRESETS = {
    "cpu-tiny": dict(
        model=dict(d_model=64, n_layers=2, n_heads=2, mem_hidden=32, chunk_size=16,
                   cms_periods=(16, 64), cms_hidden=128),
        train=dict(batch=8, seq_len=128, steps=200, warmup=20, val_batches=64, log_every=5),  # 64 KiB val
    ),
    "cpu-mqar": dict(
        model=dict(d_model=64, n_layers=2, n_heads=2, mem_hidden=32, chunk_size=16,
                   cms_periods=(16, 64), cms_hidden=128),
        train=dict(batch=32, seq_len=48, steps=1000, warmup=50, val_batches=8, log_every=10,
                   mqar_vocab=64, mqar_pairs=6, lr=dict(adamw=1e-3)),
    ),
    "gpu-small": dict(
        model=dict(d_model=256, n_layers=4, n_heads=4, mem_hidden=64, chunk_size=16,
                   cms_periods=(16, 64, 256), cms_hidden=512),
        train=dict(batch=16, seq_len=512, steps=2000, warmup=100, val_batches=16, log_every=10),
    ),
    "gpu-125m": dict(
        model=dict(d_model=768, n_layers=12, n_heads=12, mem_hidden=64, chunk_size=64,
                   cms_periods=(16, 64, 256), cms_hidden=1024),
        train=dict(batch=16, seq_len=1024, steps=5000, warmup=250, val_batches=32, log_every=10,
                   micro_batch=8, checkpoint=True),
    ),
}

# Peak learning rates per optimizer name: the usual starting points for small byte-level LMs,
# used when a run gives no --lr (benchmarks.hope.compare sweeps around them).
DEFAULT_LR = {"adamw": 3e-3, "sgd": 0.1, "muon": 0.02, "dmgd": 0.02}


def hope_config(preset: str, vocab_size: int, **overrides) -> HopeConfig:
    kw = dict(PRESETS[preset]["model"], vocab_size=vocab_size)
    kw.update(overrides)
    return HopeConfig(**kw)


def matched_transformer_config(hope_cfg: HopeConfig) -> TransformerConfig:
    """Same width, depth, heads and vocab as the HOPE model; SwiGLU width set to match params.

    Transformer++ params = V·D (tied) + D (final norm) + L·(4D² + 3·D·h + 2D); solve for h
    (rounded to a multiple of 8).
    """
    with torch.device("meta"):  # count only: no memory, no init cost at 125M
        target = Hope(hope_cfg).num_params()
    V, D, L = hope_cfg.vocab_size, hope_cfg.d_model, hope_cfg.n_layers
    h = (target - V * D - D - L * (4 * D * D + 2 * D)) / (3 * D * L)
    h = max(8, int(round(h / 8)) * 8)
    return TransformerConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=hope_cfg.n_heads, ffn_hidden=h)


def build_model(kind: str, preset: str, vocab_size: int, **overrides):
    """-> (model, config dataclass) for kind "hope" or "transformer" (parameter-matched).

    overrides: HopeConfig fields; the Transformer++ is matched to the overridden HOPE.
    """
    hcfg = hope_config(preset, vocab_size, **overrides)
    if kind == "hope":
        return Hope(hcfg), hcfg
    if kind == "transformer":
        tcfg = matched_transformer_config(hcfg)
        return Transformer(tcfg), tcfg
    raise ValueError(f"unknown model {kind!r}: hope | transformer")
