"""The unified model's configuration, apart from the model so that loading a config (every
CLI command does) does not import torch. `uniloom.models.univision` re-exports it.

Defaults are the `paper` shapes: Ling-lite ("BailingMoE") as released with Ming-UniVision,
plus the MAR-style rectified-flow head of the released code (width 3072, 12 blocks,
SwiGLU at 4x). See ../shared/design/MODEL_SPEC.md.

`image_kind` chooses the visual tokenizer the backbone reads and writes: mingtok (the
fields under "Vision in/out"), unitok (the fields under "UniTok") or tuna (TUNA's cascade
is the tokenizer's own module, models/tuna.py, so it needs no field here; its paper
weights the losses flow 1.0, next-token 0.2: set text_loss_weight to 0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from uniloom.kernels import check_mode

IMAGE_KINDS = ("mingtok", "unitok", "tuna")


@dataclass
class UniVisionConfig:
    # Backbone (decoder-only, every layer MoE)
    vocab_size: int = 126464  # must equal the text tokenizer's vocabulary (the pipeline's BPE)
    hidden: int = 2048
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 128
    rope_theta: float = 600000.0
    rms_eps: float = 1e-5
    init_std: float = 0.006
    # Mixture of experts
    num_experts: int = 64
    experts_per_token: int = 6
    expert_ffn: int = 1408
    num_shared_experts: int = 2
    multi_gate: bool = True  # a separate router for image positions
    # Visual tokenizer: mingtok | unitok | tuna
    image_kind: str = "mingtok"
    # Vision in/out: MingTok's latent width and semantic feature width (MingTokConfig.sem_width)
    latent_dim: int = 32
    semantic_dim: int = 1024
    flow_width: int = 3072
    flow_depth: int = 12
    flow_mlp_mult: float = 4.0
    flow_batch_mul: int = 4  # flow-loss samples (t, noise) per image token, as MAR's diffusion_batch_mul
    # Image starts aligned to multiples of this many positions (0: off, positions count the
    # tokens). Each turn's image then sits a whole number of strides after the one before,
    # so an edit's target patch j is one fixed RoPE offset from its source's patch j
    # whatever the instruction's length: copying what the edit leaves is one relative
    # pattern. Needs stride >= an image's tokens plus the text between two images.
    image_stride: int = 0
    # MingTok hybrid tokens (as HART pairs discrete tokens with a residual diffusion): a
    # softmax head predicts which of `coarse_codes` k-means centres of the training latents
    # the next latent is nearest, and the flow head, conditioned on that code, draws the
    # latent. The cross-entropy gives an object's first patch (where its colour and shape
    # are decided) a loss that the flow-matching MSE, dominated by where objects start,
    # does not. 0: off, the flow head alone as in the paper.
    coarse_codes: int = 0
    # UniTok: a position's codes, one per sub-codebook (UniTokConfig num_codebooks and
    # codebook_size), and the depth transformer that predicts them (our sizes: the paper
    # gives none)
    num_codebooks: int = 8
    codebook_size: int = 4096
    depth_width: int = 1024
    depth_layers: int = 4
    depth_heads: int = 16
    # Losses
    text_loss_weight: float = 1.0
    flow_loss_weight: float = 1.0  # MingTok's and TUNA's flow matching
    code_loss_weight: float = 1.0  # UniTok's code cross-entropy, and MingTok's coarse codes'
    aux_loss_weight: float = 0.01
    # Sampling
    flow_steps: int = 16
    temperature: float = 1.0
    coarse_temperature: float = 1.0  # the coarse code's softmax temperature (coarse_codes); 0: greedy
    cfg_text_uncond_scale: float = 1.1  # s_t in v = v_u + s_t (v_tu - v_u) + s_c (v_c - v_tu)
    cfg_cond_scale: float = 3.0  # s_c
    # Fused ops (kernels/): auto = Triton on CUDA, the PyTorch references elsewhere
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token must be in 1..num_experts ({self.num_experts})")
        check_mode(self.kernels)
        if self.image_kind not in IMAGE_KINDS:
            raise ValueError(f"image_kind must be one of {', '.join(IMAGE_KINDS)}, got {self.image_kind!r}")
        if self.num_codebooks < 1 or self.codebook_size < 2:
            raise ValueError("num_codebooks must be at least 1 and codebook_size at least 2")
        if self.depth_width % self.depth_heads:
            raise ValueError(
                f"depth_width {self.depth_width} is not divisible by depth_heads {self.depth_heads}"
            )
        if self.coarse_codes and (self.coarse_codes < 2 or self.image_kind != "mingtok"):
            raise ValueError("coarse_codes needs image_kind mingtok and at least 2 codes (0: off)")
        if self.image_stride < 0:
            raise ValueError("image_stride must be >= 0 (0: off)")
        if self.flow_batch_mul < 1 or self.flow_steps < 1:
            raise ValueError("flow_batch_mul and flow_steps must be at least 1")
