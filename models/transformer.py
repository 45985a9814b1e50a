"""The decoder block of the unified model's backbone: RMSNorm, grouped-query attention
with rotary positions and a key/value cache (models/blocks.py), then the mixture of experts
(models/moe.py).

Attention masks are boolean, True = may attend, built once per forward by
`blocks.attention_mask` (causality over cache slots, a key mask, document ids), so one
code path serves training, packing and guided generation.

Shape legend: B batch, T new tokens, H hidden.
"""

from __future__ import annotations

import torch.nn as nn

from uniloom.models.blocks import Attention, KVCache, RMSNorm
from uniloom.models.moe import MoE
from uniloom.models.univision_config import UniVisionConfig


class DecoderBlock(nn.Module):
    """x + attention(norm(x)), then x + MoE(norm(x)); the MoE routes image positions
    through its own gate and only the valid (B, T) tokens (models/moe.py: padding takes no
    expert slot)."""

    def __init__(self, cfg: UniVisionConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels=cfg.kernels)
        self.attn = Attention(cfg.hidden, cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                              bias=False, fused=False)  # fmt: skip
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels=cfg.kernels)
        self.moe = MoE(cfg)

    def forward(
        self, x, cos, sin, mask, image_mask=None, cache: KVCache | None = None, layer: int = 0, valid=None
    ):  # (B, T, H)
        x = x + self.attn(self.attn_norm(x), mask=mask, rope=(cos, sin), cache=cache, layer=layer)
        y, stats = self.moe(self.ffn_norm(x), image_mask, valid)
        return x + y, stats
