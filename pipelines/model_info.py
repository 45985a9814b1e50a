"""Parameter counts of a preset's models, built on the meta device (no memory, no
initialisation), so the `paper` preset's 17B parameters are counted in a second on any
machine: `uniloom model info --preset NAME`.

The totals and the active count per token are UniVision.parameter_counts' (the backbone
as Ling-lite's published 16.8B / 2.75B count it: embeddings and LM head included, k of E
routed experts and one of the two gates per token); the parts below split them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from uniloom.pipelines.config import UniloomConfig


def build_on_meta(cfg: UniloomConfig):
    """(UniVision, MingTok) of `cfg` with every tensor on the meta device."""
    from uniloom.models.mingtok import MingTok
    from uniloom.models.univision import UniVision

    with torch.device("meta"):
        return UniVision(cfg.model), MingTok(cfg.mingtok)


def numel(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def matmul_weights(*modules: nn.Module | None) -> int:
    """Weights that multiply activations: every nn.Linear's weight under `modules` (the
    FLOPs counted per parameter; biases, norms and position tables only add)."""
    return sum(
        m.weight.numel()
        for module in modules
        if module is not None
        for m in module.modules()
        if isinstance(m, nn.Linear)
    )


def parameter_counts(cfg: UniloomConfig) -> dict[str, Any]:
    """Totals, active per token, and per part: the backbone's parts sum to
    `backbone_total`, the vision heads' to `vision_total`, MingTok's to `mingtok_total`."""
    model, tok = build_on_meta(cfg)
    counts = model.parameter_counts()
    layers = list(model.layers)
    moes = [layer.moe for layer in layers]
    parts = {
        "embedding": numel(model.embed),
        "attention": numel(*(layer.attn for layer in layers)),
        "routed_experts": counts["routed_experts"],
        "shared_experts": numel(*(m.shared for m in moes)),
        "routers": numel(*(m.router for m in moes), *(m.image_router for m in moes)),
        "norms": numel(
            *(layer.attn_norm for layer in layers), *(layer.ffn_norm for layer in layers), model.norm
        ),
        "lm_head": numel(model.lm_head),
        **{name: numel(m) for name, m in model.vision_modules().items()},
        "mingtok_encoder": numel(tok.encoder),
        "mingtok_semantic_decoder": numel(tok.semantic_decoder),
        "mingtok_pixel_decoder": numel(tok.pixel_decoder),
    }
    return {
        "preset": cfg.preset,
        "total": counts["total"],  # the unified model: backbone + vision heads
        "active_per_tok": counts["backbone_active"],
        "backbone_total": counts["backbone_total"],
        "vision_total": counts["vision_total"],
        "mingtok_total": numel(tok),
        **{f"part.{name}": n for name, n in parts.items()},
    }
