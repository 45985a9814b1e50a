"""UniTok's training objective: the training-only text head and the losses.

    pixel_l1, pixel_l2  between the decoder's (unclamped) output and the image
    vq                  the quantizer's codebook + commitment loss (models/unitok.py)
    text                mean-pooled post-quantization tokens -> LayerNorm -> Linear ->
                        contrastive against the locked embeddings of every caption of the
                        corpus (models/contrastive.py), as MingTok's text term

The paper weighs 0.2 L1 + 1.0 L2 + 1.0 LPIPS + 1.0 VQ + 1.0 contrastive + an adaptive GAN
term; LPIPS (pretrained VGG features) and the GAN are not part of this objective.

The result also carries what a pipeline logs and needs after the optimizer step: per
sub-codebook usage and perplexity, and the features that dead-code restarts draw from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from uniloom.models.contrastive import INITIAL_LOGIT_SCALE, caption_contrastive
from uniloom.models.unitok import UniTok


@dataclass
class LossWeights:
    pixel_l1: float = 0.2
    pixel_l2: float = 1.0
    vq: float = 1.0
    text: float = 1.0


class UniTokObjective(nn.Module):
    def __init__(self, model: UniTok, text_dim: int):
        super().__init__()
        width = model.cfg.dec_width
        self.text_norm = nn.LayerNorm(width)
        self.text_proj = nn.Linear(width, text_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))

    def forward(
        self,
        model: UniTok,
        images: torch.Tensor,  # (B, 3, H, W) in [-1, 1]
        text_table: torch.Tensor,  # (U, E) embeddings of every caption
        caption: torch.Tensor,  # (B,) index of each image's caption in text_table
        weights: LossWeights,
    ) -> dict[str, torch.Tensor]:
        out = model(images)
        recon = out.recon.float()  # fp32 under autocast too
        error = recon - images
        losses = {"pixel_l1": error.abs().mean(), "pixel_l2": error.pow(2).mean(), "vq": out.quant.loss}
        pooled = self.text_norm(out.tokens.mean(dim=1))  # (B, W)
        losses["text"] = caption_contrastive(self.text_proj(pooled), text_table, caption, self.logit_scale)
        losses["total"] = sum(getattr(weights, name) * value for name, value in losses.items())
        losses["recon"] = recon.detach()
        losses["usage"] = out.quant.usage  # (K,)
        losses["perplexity"] = out.quant.perplexity  # (K,)
        losses["features"] = out.features.detach()  # for model.restart_dead_codes after the step
        return losses
