"""MingTok: the continuous unified visual tokenizer of Ming-UniVision, in three stages.

    images (B, 3, H, W) in [-1, 1]
      -> low-level encoder: ViT over patches, class token appended at the END, head
         LayerNorm -> GELU -> Linear(width -> 32) plus a channel-group-average shortcut,
         fixed shift/scale normalisation                         -> latents (B, N, 32)
      -> semantic decoder: Linear(32 -> D) plus a channel-repeat shortcut, causal
         transformer with a key/value cache (one latent at a time if needed)
                                                                 -> features (B, N, D)
      -> pixel decoder: Linear(D -> 4 * W), rearranged to 4x the tokens (2x2 per patch),
         bidirectional transformer, head to patch pixels, unpatchify, clamp
                                                                 -> images (B, 3, H, W)

Because the class token comes last and the semantic decoder is causal, no patch feature
ever attends to it: dropping the class token from the semantic decoder's output is the
same as never feeding it, so the public API carries patch tokens only.

The transformer blocks, the key/value cache and the position helpers are the shared ones
(models/blocks.py); this file keeps the three stages and the latent normalisation.

Shape legend: B batch, N patch tokens (grid h x w), T sequence length, C width, D semantic
width, P patch size, L latent dim (32).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.models.blocks import (
    Block,
    KVCache,
    PatchEmbed,
    resize_pos_embed,
    sincos_2d,
    square_grid,
    unpatchify,
)
from uniloom.models.mingtok_config import MingTokConfig

__all__ = ["MingTok", "MingTokConfig"]


# ---------------------------------------------------------------------------- the three stages


class LowLevelEncoder(nn.Module):
    """ViT: patches (+ a class token at the end) -> raw 32-d latents (B, N + 1, L)."""

    def __init__(self, cfg: MingTokConfig):
        super().__init__()
        C = cfg.enc_width
        self.cfg = cfg
        self.patch_embed = PatchEmbed(3, C, cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, C))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))  # its position is part of it
        self.mask_token = nn.Parameter(torch.zeros(1, 1, C))
        self.blocks = nn.ModuleList(Block(C, cfg.enc_heads, cfg.mlp_ratio) for _ in range(cfg.enc_depth))
        self.head_norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.latent_dim)

    def hidden(self, images, mask=None):  # images (B, 3, H, W); mask (B, N) bool, True = masked
        """The transformer's output before the head: (B, N + 1, C), class token last."""
        x, (h, w) = self.patch_embed(images)  # (B, N, C)
        B = x.shape[0]
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = x + resize_pos_embed(self.pos_embed, self.cfg.grid, (h, w))
        x = torch.cat([x, self.cls_token.expand(B, -1, -1)], dim=1)  # (B, N + 1, C): class token last
        for block in self.blocks:
            x = block(x, causal=self.cfg.enc_causal)
        return x

    def head_out(self, x):  # (B, T, C) -> raw latents (B, T, L)
        B, T, C = x.shape
        # Shortcut: average groups of C / L channels, so the head only learns a residual.
        shortcut = x.view(B, T, self.cfg.latent_dim, C // self.cfg.latent_dim).mean(-1)  # (B, T, L)
        return self.head(F.gelu(self.head_norm(x))) + shortcut

    def forward(self, images, mask=None):
        return self.head_out(self.hidden(images, mask))  # (B, N + 1, L)


class SemanticDecoder(nn.Module):
    """Causal transformer: raw latents (B, T, L) -> semantic features (B, T, D), where
    position t only sees latents 0..t, so a key/value cache decodes one latent at a time."""

    def __init__(self, cfg: MingTokConfig):
        super().__init__()
        D = cfg.sem_width
        self.cfg = cfg
        self.proj = nn.Linear(cfg.latent_dim, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, D))  # patches, then class
        self.blocks = nn.ModuleList(Block(D, cfg.sem_heads, cfg.mlp_ratio) for _ in range(cfg.sem_depth))
        self.norm = nn.LayerNorm(D)

    def positions(self, start: int, count: int, total: int) -> torch.Tensor:
        """Position embeddings (1, count, D) for positions start.. of a `total`-token image."""
        n = self.cfg.num_tokens
        if total == n:
            pos = self.pos_embed
        else:  # another resolution: resize the patch part, keep the class slot
            side = square_grid(total)
            pos = torch.cat([resize_pos_embed(self.pos_embed[:, :n], self.cfg.grid, (side, side)),
                             self.pos_embed[:, n:]], dim=1)  # fmt: skip
        if start + count > total + 1:
            raise ValueError(f"positions {start}..{start + count - 1} exceed {total} patch tokens + class")
        return pos[:, start : start + count]

    def forward(self, z, cache: KVCache | None = None, total: int | None = None):  # z (B, T, L)
        B, T, L = z.shape
        start = cache.length if cache is not None else 0
        # Shortcut: repeat the latent's channels up to D, so the projection learns a residual.
        x = self.proj(z) + z.repeat_interleave(self.cfg.sem_width // L, dim=-1)  # (B, T, D)
        x = x + self.positions(start, T, total or self.cfg.num_tokens)
        if cache is not None:  # every latent stays visible to the ones after it
            cache.extend_mask(torch.ones(B, T, dtype=torch.bool, device=z.device))
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, cache=cache, layer=i)
        return self.norm(x)  # (B, T, D)


class PixelDecoder(nn.Module):
    """Semantic features (B, N, D) -> 4N tokens of width W -> pixels (B, 3, H, W)."""

    def __init__(self, cfg: MingTokConfig):
        super().__init__()
        W = cfg.pix_width
        self.cfg = cfg
        self.proj = nn.Linear(cfg.sem_width, 4 * W)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4 * cfg.num_tokens, W))
        self.blocks = nn.ModuleList(Block(W, cfg.pix_heads, cfg.mlp_ratio) for _ in range(cfg.pix_depth))
        self.norm = nn.LayerNorm(W)
        self.head = nn.Linear(W, 3 * cfg.pix_patch_size**2)

    def forward(self, features, clamp: bool = True):  # (B, N, D)
        B, N, _ = features.shape
        h = w = square_grid(N)
        W, P = self.cfg.pix_width, self.cfg.pix_patch_size
        x = self.proj(features).view(B, h, w, 2, 2, W)  # each token -> its 2x2 sub-tokens
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, 4 * N, W)  # (B, 2h * 2w, W) in raster order
        x = x + resize_pos_embed(self.pos_embed, 2 * self.cfg.grid, (2 * h, 2 * w))
        for block in self.blocks:
            x = block(x)
        images = unpatchify(self.head(self.norm(x)), (2 * h, 2 * w), P)  # (B, 3, H, W)
        return images.clamp(-1, 1) if clamp else images


# ---------------------------------------------------------------------------- the tokenizer


class MingTok(nn.Module):
    def __init__(self, cfg: MingTokConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = LowLevelEncoder(cfg)
        self.semantic_decoder = SemanticDecoder(cfg)
        self.pixel_decoder = PixelDecoder(cfg)
        # Buffers, not config: training may calibrate them to the latents' statistics and
        # the exported weights carry them to every stage that consumes latents.
        self.register_buffer("latent_shift", torch.tensor(float(cfg.latent_shift)))
        self.register_buffer("latent_scale", torch.tensor(float(cfg.latent_scale)))
        self.apply(self._init_weights)
        # Learned position embeddings start from a 2D sin-cos layout (as in MAE): training
        # begins with neighbours already near each other instead of at random places.
        g = cfg.grid
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_2d(g, cfg.enc_width))
            self.semantic_decoder.pos_embed[:, :-1].copy_(sincos_2d(g, cfg.sem_width))
            self.pixel_decoder.pos_embed.copy_(sincos_2d(2 * g, cfg.pix_width))
        nn.init.trunc_normal_(self.semantic_decoder.pos_embed[:, -1:], std=0.02)  # the class slot
        nn.init.trunc_normal_(self.encoder.cls_token, std=0.02)
        nn.init.trunc_normal_(self.encoder.mask_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def normalize(self, raw):  # (..., L) -> what the language model sees
        return (raw - self.latent_shift) / self.latent_scale

    def denormalize(self, z):
        return z * self.latent_scale + self.latent_shift

    def encode_all(self, images, mask=None):
        """Normalised latents with the class token: (B, N + 1, L), class last."""
        return self.normalize(self.encoder(images, mask))

    def encode(self, images, mask=None):
        """images (B, 3, H, W) in [-1, 1], mask (B, N) bool -> latents (B, N, L)."""
        return self.encode_all(images, mask)[:, :-1]

    def new_semantic_cache(self, batch_size: int) -> KVCache:
        """An empty cache for incremental semantic decoding (batch size is implied by use)."""
        del batch_size  # keys/values take their batch size from the first latents appended
        return KVCache(self.cfg.sem_depth)

    def decode_semantic(self, latents, cache: KVCache | None = None, total: int | None = None):
        """latents (B, n, L) -> features (B, n, D). With a cache the latents continue the
        sequence it holds; `total` is the image's patch count when it differs from the
        preset's (another resolution)."""
        return self.semantic_decoder(self.denormalize(latents), cache=cache, total=total)

    def slot_features(self, latents_PC):
        """Semantic features (P, D) of a batch's image slots (P, L): each run of num_tokens
        latents is one image, decoded causally in full (the unified model's input rows)."""
        P, C = latents_PC.shape
        N = self.cfg.num_tokens
        if P % N:
            raise ValueError(f"{P} image slots are not whole images of {N} tokens")
        return self.decode_semantic(latents_PC.view(P // N, N, C)).reshape(P, -1)

    def decode_pixels(self, features, clamp: bool = True):
        """features (B, N, D) -> images (B, 3, H, W) in [-1, 1] (unclamped for training)."""
        return self.pixel_decoder(features, clamp=clamp)

    def reconstruct(self, images):
        latents = self.encode(images)
        return self.decode_pixels(self.decode_semantic(latents, total=latents.shape[1]))

    def stage_parameters(self) -> dict[str, int]:
        return {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "semantic_decoder": sum(p.numel() for p in self.semantic_decoder.parameters()),
            "pixel_decoder": sum(p.numel() for p in self.pixel_decoder.parameters()),
        }
