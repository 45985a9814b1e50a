"""What training updates: the unified model plus MingTok, whose semantic decoder turns the
shards' stored latents into the features the model reads (and which stage 2 fine-tunes).

The encoder and pixel decoder ride along frozen: the export carries one consistent
tokenizer, and the pixel decoder renders the sample images at evaluation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.sequence import Batch
from uniloom.models.univision import Losses, UniVision, UniVisionConfig, image_features
from uniloom.pipelines.errors import UniloomError


class Trainee(nn.Module):
    def __init__(self, model_cfg: UniVisionConfig, mingtok_cfg: MingTokConfig):
        super().__init__()
        if model_cfg.semantic_dim != mingtok_cfg.sem_width or model_cfg.latent_dim != mingtok_cfg.latent_dim:
            raise UniloomError(
                f"model.semantic_dim/latent_dim ({model_cfg.semantic_dim}/{model_cfg.latent_dim}) must equal "
                f"mingtok.sem_width/latent_dim ({mingtok_cfg.sem_width}/{mingtok_cfg.latent_dim})"
            )
        self.model = UniVision(model_cfg)
        self.tokenizer = MingTok(mingtok_cfg)
        self.tokens_per_image = mingtok_cfg.num_tokens

    def parts(self) -> dict[str, list[nn.Module]]:
        """The recipe's vocabulary of trainable parts (train/config.py PARTS)."""
        m = self.model
        return {
            "projector": [m.projector],
            "flow_head": [m.vis_head, m.flow_head],
            "llm": [m.embed, m.layers, m.norm, m.lm_head],
            "semantic_decoder": [self.tokenizer.semantic_decoder],
        }

    def set_trainable(self, names: list[str]) -> None:
        self.requires_grad_(False)
        parts = self.parts()
        for name in names:
            for module in parts[name]:
                module.requires_grad_(True)

    def features(self, latents_PC):
        """MingTok semantic features (P, D) of the batch's image slots; without a graph
        when the semantic decoder is frozen (the latents are data)."""
        if latents_PC.shape[0] == 0:
            return None
        dtype = self.tokenizer.semantic_decoder.proj.weight.dtype
        frozen = not any(p.requires_grad for p in self.tokenizer.semantic_decoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return image_features(self.tokenizer, latents_PC.to(dtype), self.tokens_per_image)

    def forward(self, batch: Batch) -> Losses:
        return self.model.loss(batch, self.features(batch.image_latents))
