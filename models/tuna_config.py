"""TUNA's configuration, apart from the model so that loading a config does not import
torch. `uniloom.models.tuna` re-exports it.

The defaults are a tiny size for CPU tests: 32 px images, an 8 x 8 x 8 latent grid, 4 x 4
representation tokens. `TunaConfig.paper()` is the article's cascade: a VAE with 16x
spatial downsampling to 48 channels (Wan 2.2's), a representation encoder the size of
SigLIP-2 so400m (1152 wide, 16 heads) over 1 x 1 patches of the latent grid with its
features taken from the second-to-last of its 27 layers (so 26 layers here), and a
connector into the unified backbone: in uniloom every kind shares Ling-lite's (2048 wide,
../shared/design/MODEL_SPEC.md), not TUNA's Qwen2.5-7B (3584), and the workflow sets
llm_width to model.hidden (pipelines/config.py DERIVED). The
article's VAE is convolutional and pretrained; here it is a ViT of our own choosing
(768 wide, 12 deep), trained first and then frozen. The velocity head's 10 layers are the
released code's `num_diffusion_layers`; its 16 heads give head dim 128 at 2048, as Qwen2.5's
28 do at 3584.
See ../shared/design/MODEL_SPEC.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TunaConfig:
    image_size: int = 32
    vae_patch_size: int = 4  # the VAE's spatial downsampling: a latent position per patch
    latent_channels: int = 8
    vae_width: int = 64
    vae_depth: int = 2
    vae_heads: int = 2
    rep_patch_size: int = 2  # the representation encoder's patch over the latent grid
    rep_width: int = 64
    rep_depth: int = 2
    rep_heads: int = 2
    llm_width: int = 64  # the connector's output: the backbone's hidden size
    head_depth: int = 2  # velocity head: time-modulated transformer blocks at llm_width
    head_heads: int = 2
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * width (same parameters as a GELU MLP)
    # VAE loss = MSE(reconstruction) + kl_weight * KL, both means over elements.
    kl_weight: float = 1e-3
    # The flow runs on normalised latents (raw - shift) / scale, which decode undoes.
    latent_shift: float = 0.0
    latent_scale: float = 1.0

    @classmethod
    def paper(cls) -> TunaConfig:
        return cls(image_size=512, vae_patch_size=16, latent_channels=48, vae_width=768, vae_depth=12,
                   vae_heads=12, rep_patch_size=1, rep_width=1152, rep_depth=26, rep_heads=16,
                   llm_width=2048, head_depth=10, head_heads=16)  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("image_size", "vae_patch_size", "latent_channels", "rep_patch_size",
                     "vae_depth", "rep_depth", "head_depth"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of vae_patch_size * rep_patch_size "
                f"= {self.downsample}"
            )
        for name in ("vae", "rep", "llm"):
            width = getattr(self, f"{name}_width")
            heads = getattr(self, "head_heads" if name == "llm" else f"{name}_heads")
            if width % heads:
                raise ValueError(f"{name}_width {width} is not divisible by its {heads} heads")
        if self.kl_weight < 0:
            raise ValueError("kl_weight must be non-negative")
        if self.latent_scale <= 0:
            raise ValueError("latent_scale must be positive")

    @property
    def downsample(self) -> int:
        """Pixels per representation token along a side."""
        return self.vae_patch_size * self.rep_patch_size

    @property
    def latent_grid(self) -> int:
        """Side of the VAE's latent grid at image_size."""
        return self.image_size // self.vae_patch_size

    @property
    def token_grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        """N: image tokens the backbone sees per image (the time token not counted)."""
        return self.token_grid**2

    @property
    def velocity_dim(self) -> int:
        """Velocity values per token: its rep_patch_size^2 latent positions' channels."""
        return self.rep_patch_size**2 * self.latent_channels
