"""UniTok's configuration, apart from the model so that loading a config does not import
torch. `uniloom.models.unitok` re-exports it.

The defaults are a tiny size for CPU tests; `UniTokConfig.paper()` is the paper's: 256 px
images, 16 x 16 tokens, an attention projection to a 64-d code space split into 8
sub-codebooks of 4,096 entries of 8 dims. The paper's encoder is ViTamin-L (convolutional
stages, then a ViT-L); here both encoder and decoder are plain ViT-L/16-sized transformers
(1024 wide, 24 deep, 16 heads), see ../shared/design/MODEL_SPEC.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UniTokConfig:
    image_size: int = 32
    patch_size: int = 8  # the spatial downsampling factor: a token per patch
    enc_width: int = 64
    enc_depth: int = 2
    enc_heads: int = 2
    dec_width: int = 64
    dec_depth: int = 2
    dec_heads: int = 2
    proj_heads: int = 2  # the attention projections into and out of the code space
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * width (same parameters as a GELU MLP)
    # Multi-codebook quantization: the code_dim-d token is split into num_codebooks chunks,
    # each matched (cosine) against its own codebook of codebook_size entries.
    code_dim: int = 64
    num_codebooks: int = 8
    codebook_size: int = 64
    commitment: float = 0.25  # loss = codebook + commitment * commitment term
    # An entry not chosen in this many training batches is restarted from a batch feature.
    restart_after: int = 20

    @classmethod
    def paper(cls) -> UniTokConfig:
        return cls(image_size=256, patch_size=16, enc_width=1024, enc_depth=24, enc_heads=16,
                   dec_width=1024, dec_depth=24, dec_heads=16, proj_heads=16, code_dim=64,
                   num_codebooks=8, codebook_size=4096)  # fmt: skip

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for name in ("enc", "dec"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads:
                raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
            inner = max(width, self.code_dim)  # the projection attends at the wider side
            if inner % self.proj_heads:
                raise ValueError(f"proj_heads {self.proj_heads} does not divide the projection width {inner}")
        if self.code_dim % self.num_codebooks:
            raise ValueError(
                f"code_dim {self.code_dim} is not divisible by num_codebooks {self.num_codebooks}"
            )
        if self.codebook_size < 2:
            raise ValueError("codebook_size must be at least 2")
        if self.commitment < 0:
            raise ValueError("commitment must be non-negative")
        if self.restart_after < 1:
            raise ValueError("restart_after must be at least 1")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """N: tokens (positions) per image; each holds num_codebooks codes."""
        return self.grid**2

    @property
    def codebook_dim(self) -> int:
        """Dims of one chunk: code_dim / num_codebooks (8 in the paper)."""
        return self.code_dim // self.num_codebooks
