"""MingTok's masked-image-modeling objective: the training-only heads and the four losses.

    (a) latent:   encoder latents at masked positions -> MLP -> teacher image features
    (b) semantic: semantic features at masked positions -> MLP -> text-aligned teacher features
    (c) pixel:    L1 between the pixel decoder's output and the image, for masked and
                  unmasked inputs alike (a sample whose mask row is all False is unmasked);
                  optional beside it: L2, and L1 over the band of pixels near the image's
                  colour edges (object outlines: where a blurred or bumpy reconstruction
                  changes an object's shape, which an image-wide mean hardly sees)
    (d) text:     pooled semantic features -> Linear -> contrastive against the locked
                  embeddings of every caption of the corpus (the image's own caption is the
                  positive; all others, including near misses like "a red square" for "a red
                  circle", are negatives, which a batch alone rarely holds)

Teachers live outside (pipelines/tokenizer/teachers.py): this module takes their features
as tensors, so any teacher whose features form a patch grid fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.models.contrastive import INITIAL_LOGIT_SCALE, caption_contrastive
from uniloom.models.mingtok import MingTok


@dataclass
class LossWeights:
    pixel: float = 1.0
    pixel_l2: float = 0.0  # optional MSE beside the L1 (PSNR is an L2 figure)
    pixel_edge: float = 0.0  # optional L1 over the edge band (edge_band)
    latent: float = 0.1
    semantic: float = 0.1
    text: float = 0.1


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


@torch.no_grad()
def edge_band(images: torch.Tensor, radius: int = 2, contrast: float = 0.25) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a pixel is within `radius` of a colour edge of `images`
    (B, 3, H, W) in [-1, 1]: some channel ranges over more than `contrast` in its window."""
    k = 2 * radius + 1
    high = F.max_pool2d(images, k, stride=1, padding=radius)
    low = -F.max_pool2d(-images, k, stride=1, padding=radius)
    return ((high - low).amax(dim=1, keepdim=True) > contrast).float()


def regression(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 to layer-normalised targets: the scale of any teacher's features drops out."""
    target = F.layer_norm(target.float(), target.shape[-1:])
    return F.smooth_l1_loss(pred.float(), target)


class MIMObjective(nn.Module):
    def __init__(self, model: MingTok, latent_teacher_dim: int, semantic_teacher_dim: int, text_dim: int):
        super().__init__()
        cfg = model.cfg
        self.latent_head = mlp(cfg.latent_dim, cfg.enc_width, latent_teacher_dim)
        self.semantic_head = mlp(cfg.semantic_dim, cfg.semantic_dim, semantic_teacher_dim)
        self.text_proj = nn.Linear(cfg.semantic_dim, text_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))

    def contrastive(self, pooled: torch.Tensor, text_table: torch.Tensor, caption: torch.Tensor):
        """pooled (B, D), text_table (U, E) locked caption embeddings, caption (B,) indices."""
        return caption_contrastive(self.text_proj(pooled), text_table, caption, self.logit_scale)

    def forward(
        self,
        model: MingTok,
        images: torch.Tensor,  # (B, 3, H, W) in [-1, 1]
        mask: torch.Tensor,  # (B, N) bool, True = masked at the encoder input
        latent_targets: torch.Tensor | None,  # (M, N, Ta) teacher image features of the M masked rows
        semantic_targets: torch.Tensor | None,  # (M, N, Tb) text-aligned ones; None when M = 0
        text_table: torch.Tensor,  # (U, E) embeddings of every caption
        caption: torch.Tensor,  # (B,) index of each image's caption in text_table
        weights: LossWeights,
    ) -> dict[str, torch.Tensor]:
        latents = model.encode_all(images, mask)  # (B, N + 1, L), class token last
        features = model.decode_semantic(latents[:, :-1])  # (B, N, D): causal, so the class adds nothing
        recon = model.decode_pixels(features, clamp=False).float()  # (B, 3, H, W), fp32 under autocast too
        error = (recon - images).abs()
        losses = {"pixel": error.mean()}
        if weights.pixel_l2:
            losses["pixel_l2"] = error.pow(2).mean()
        if weights.pixel_edge:
            band = edge_band(images)  # (B, 1, H, W)
            losses["pixel_edge"] = (error * band).sum() / (band.sum() * images.shape[1]).clamp(min=1)
        if mask.any():
            rows = mask[mask.any(dim=1)]  # (M, N): the targets' rows
            losses["latent"] = regression(self.latent_head(latents[:, :-1][mask]), latent_targets[rows])
            losses["semantic"] = regression(self.semantic_head(features[mask]), semantic_targets[rows])
        else:  # keep every parameter in the graph, so DDP sees the same ones each step
            losses["latent"] = 0.0 * sum(p.sum() for p in self.latent_head.parameters())
            losses["semantic"] = 0.0 * sum(p.sum() for p in self.semantic_head.parameters())
        losses["text"] = self.contrastive(features.mean(dim=1), text_table, caption)
        losses["total"] = sum(getattr(weights, name) * value for name, value in losses.items())
        losses["recon"] = recon.detach()
        return losses
