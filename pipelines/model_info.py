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
    """(UniVision, the tokenizer of tokenizer.kind) of `cfg` with every tensor on the meta device."""
    from uniloom.models.univision import UniVision
    from uniloom.pipelines.tokenizer.kinds import kind_of

    kind = kind_of(cfg)
    with torch.device("meta"):
        return UniVision(cfg.model), kind.build(kind.config(cfg))


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
    `backbone_total`, the vision heads' to `vision_total`, the tokenizer's stages to
    `<kind>_total` (`mingtok_total`; TUNA's holds the cascade and velocity head the
    unified model trains)."""
    model, tok = build_on_meta(cfg)
    kind = cfg.model.image_kind
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
        **{f"{kind}_{name}": n for name, n in tok.stage_parameters().items()},
    }
    return {
        "preset": cfg.preset,
        "total": counts["total"],  # the unified model: backbone + vision heads
        "active_per_tok": counts["backbone_active"],
        "backbone_total": counts["backbone_total"],
        "vision_total": counts["vision_total"],
        f"{kind}_total": numel(tok),
        **{f"part.{name}": n for name, n in parts.items()},
    }
