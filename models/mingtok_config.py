"""MingTok's configuration, apart from the model so that loading a config (every CLI
command does) does not import torch. `uniloom.models.mingtok` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MingTokConfig:
    image_size: int = 64
    patch_size: int = 8  # encoder patch: the spatial downsampling factor
    latent_dim: int = 32
    enc_width: int = 128
    enc_depth: int = 3
    enc_heads: int = 4
    sem_width: int = 128
    sem_depth: int = 3
    sem_heads: int = 4
    pix_width: int = 128
    pix_depth: int = 3
    pix_heads: int = 4
    pix_patch_size: int = 4  # half the encoder patch: the pixel decoder has 4x the tokens
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * width (same parameters as a GELU MLP)
    # Causal (raster-order) attention in the low-level encoder: latent i then sees patches
    # 0..i only, so a token carries nothing about patches an autoregressive model has yet
    # to draw. The paper's encoder is bidirectional (False).
    enc_causal: bool = False
    latent_shift: float = 0.0  # normalised latent = (raw - shift) / scale (paper: 1.468, 8.094)
    latent_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.pix_patch_size * 2 != self.patch_size:
            raise ValueError(f"pix_patch_size must be patch_size / 2, got {self.pix_patch_size}")
        for name in ("enc", "sem", "pix"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads:
                raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        for name in ("enc_width", "sem_width"):
            if getattr(self, name) % self.latent_dim:
                raise ValueError(f"{name} must be a multiple of latent_dim {self.latent_dim}")
        if self.latent_scale <= 0:
            raise ValueError("latent_scale must be positive")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """N: patch tokens per image (the class token is internal)."""
        return self.grid**2

    @property
    def semantic_dim(self) -> int:
        """D: width of the semantic features the unified model consumes."""
        return self.sem_width
