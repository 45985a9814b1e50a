"""UniTok: a discrete unified visual tokenizer with multi-codebook quantization (MCQ).

    images (B, 3, H, W) in [-1, 1]
      -> encoder: ViT over patches (bidirectional), LayerNorm          -> (B, N, C)
      -> quant_proj: attention projection C -> code_dim (64)           -> z (B, N, 64)
      -> MCQ: z split into K chunks of d dims (8 x 8); each chunk L2-normalised and matched
         by cosine to the L2-normalised entries of its own codebook (V = 4096 each)
                                                                       -> codes (B, N, K)
         quantized = the chosen entries side by side, straight-through to z's chunks
      -> post_quant_proj: attention projection code_dim -> W          -> tokens (B, N, W)
      -> decoder: ViT, LayerNorm, head to patch pixels, unpatchify, clamp -> (B, 3, H, W)

A position's K codes are one token of the unified model. The contrastive alignment with
the caption embeddings (models/unitok_loss.py) pools the post-quantization tokens, so the
semantics it asks for must pass through the codes.

Quantization loss (VQ-VAE, on the normalised chunks): ||q - sg(z)||^2 moves the codebook
entries to the features, commitment * ||z - sg(q)||^2 the features to their entries;
the reconstruction's gradient reaches the encoder straight through (quantized = z + sg(q - z)
on the normalised chunks: the decoder sees unit-norm entries, the encoder gets their gradient).

Dead codes: an entry not chosen in `restart_after` consecutive training batches is dead
(small codebooks on small data collapse to a few entries). `restart_dead_codes(features)`,
called after the optimizer step (an in-place change of the codebooks inside a forward
would break the backward of any graph still holding them), replaces each dead entry with
a random chunk of the current batch's encoder outputs, so it starts where features are.
Under data parallelism every rank must count the codes of all ranks and restart with the
same features and generator; under an optimizer with fp32 master weights (DeepSpeed bf16,
ZeRO) the restart must reach the master copy.

Shape legend: B batch, N tokens (grid h x w), C encoder width, W decoder width, K
sub-codebooks, V entries each, d dims per chunk (code_dim = K * d), P patch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.models.blocks import (
    Attention,
    Block,
    PatchEmbed,
    SwiGLU,
    resize_pos_embed,
    sincos_2d,
    square_grid,
    swiglu_hidden,
    unpatchify,
)
from uniloom.models.unitok_config import UniTokConfig

__all__ = ["MultiCodebookQuantizer", "QuantizerOutput", "UniTok", "UniTokConfig", "UniTokOutput"]


# ---------------------------------------------------------------------------- quantization


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, N, K * d) chosen entries (unit-norm chunks), straight-through
    codes: torch.Tensor  # (B, N, K) long, entry index per sub-codebook
    loss: torch.Tensor  # () codebook + commitment * commitment term
    usage: torch.Tensor  # (K,) fraction of each sub-codebook's entries chosen in this batch
    perplexity: torch.Tensor  # (K,) exp(entropy) of each sub-codebook's codes in this batch


class MultiCodebookQuantizer(nn.Module):
    def __init__(self, num_codebooks: int, codebook_size: int, codebook_dim: int, commitment: float,
                 restart_after: int):  # fmt: skip
        super().__init__()
        self.K, self.V, self.d = num_codebooks, codebook_size, codebook_dim
        self.commitment, self.restart_after = commitment, restart_after
        # Gaussian entries: uniformly spread directions once normalised.
        self.codebooks = nn.Parameter(torch.randn(num_codebooks, codebook_size, codebook_dim))  # (K, V, d)
        # Training batches since each entry was last chosen (a buffer: checkpoints keep it).
        self.register_buffer("unused", torch.zeros(num_codebooks, codebook_size, dtype=torch.long))

    def chunks(self, z):  # (..., K * d) -> unit-norm chunks (..., K, d)
        return F.normalize(z.view(*z.shape[:-1], self.K, self.d), dim=-1)

    def entries(self, codes):  # (..., K) -> unit-norm entries (..., K, d)
        books = F.normalize(self.codebooks, dim=-1).reshape(self.K * self.V, self.d)
        offset = torch.arange(self.K, device=codes.device) * self.V  # codebook k's rows start at k * V
        return books[codes + offset]

    def lookup(self, codes):  # (B, N, K) -> (B, N, K * d), the quantized vectors of the codes
        return self.entries(codes).flatten(-2)

    def match(self, z_chunks):  # unit-norm (..., K, d) -> codes (..., K): highest cosine
        books = F.normalize(self.codebooks.detach(), dim=-1)  # (K, V, d)
        return torch.einsum("...kd,kvd->...kv", z_chunks.detach(), books).argmax(-1)

    def encode(self, z):  # (B, N, K * d) -> codes (B, N, K)
        return self.match(self.chunks(z))

    def forward(self, z) -> QuantizerOutput:  # z (B, N, K * d)
        z_chunks = self.chunks(z)  # (B, N, K, d)
        codes = self.match(z_chunks)  # (B, N, K)
        q = self.entries(codes)  # (B, N, K, d), differentiable in the codebooks
        loss = F.mse_loss(q, z_chunks.detach()) + self.commitment * F.mse_loss(z_chunks, q.detach())
        quantized = z_chunks + (q - z_chunks).detach()  # forward q, backward the identity to z_chunks
        counts = self.counts(codes)  # (K, V)
        if self.training:
            with torch.no_grad():
                self.unused.add_(1).masked_fill_(counts > 0, 0)
        return QuantizerOutput(quantized.flatten(-2), codes, loss, *code_statistics(counts))

    def counts(self, codes):  # (..., K) -> (K, V) how often each entry was chosen
        flat = (codes.reshape(-1, self.K) + torch.arange(self.K, device=codes.device) * self.V).flatten()
        return torch.bincount(flat, minlength=self.K * self.V).view(self.K, self.V)

    @torch.no_grad()
    def restart_dead_codes(self, z, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace every dead entry (unused for restart_after training batches) with a
        random chunk of the features z (..., K * d); returns the restarts per codebook (K,)."""
        dead = self.unused >= self.restart_after  # (K, V)
        z_MKd = self.chunks(z.detach()).reshape(-1, self.K, self.d)
        M = z_MKd.shape[0]
        for k in range(self.K):
            rows = dead[k].nonzero()[:, 0]
            n = rows.numel()
            if not n:
                continue
            # Distinct features where the batch has enough: two equal entries would split one feature.
            pick = (torch.randperm(M, generator=generator)[:n] if n <= M
                    else torch.randint(M, (n,), generator=generator))  # fmt: skip
            self.codebooks[k, rows] = z_MKd[pick.to(z_MKd.device), k].to(self.codebooks.dtype)
            self.unused[k, rows] = 0
        return dead.sum(-1)


def code_statistics(counts):
    """(K, V) counts -> usage (K,): fraction of entries chosen at least once, and
    perplexity (K,): exp of the entropy of the code distribution (V at best, 1 at worst)."""
    p = counts.float() / counts.sum(-1, keepdim=True).clamp(min=1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return (counts > 0).float().mean(-1), entropy.exp()


# ---------------------------------------------------------------------------- the stages


class AttentionProjection(nn.Module):
    """(B, N, Cin) -> (B, N, Cout): a linear shortcut plus attention that reads Cin and
    writes Cout (its heads at the wider of the two widths), then a SwiGLU MLP at Cout. The
    tokens look at each other on the way into (and out of) the narrow code space; UniTok
    averages the heads before its output layer, a special case of this learned one."""

    def __init__(self, in_width: int, out_width: int, heads: int, mlp_ratio: float):
        super().__init__()
        inner = max(in_width, out_width)
        self.norm1 = nn.LayerNorm(in_width)
        self.shortcut = nn.Linear(in_width, out_width)
        self.attn = Attention(in_width, heads, head_dim=inner // heads, out_width=out_width)
        self.norm2 = nn.LayerNorm(out_width)
        self.mlp = SwiGLU(out_width, swiglu_hidden(out_width, mlp_ratio))

    def forward(self, x):  # (B, N, Cin)
        h = self.norm1(x)
        x = self.shortcut(h) + self.attn(h)  # (B, N, Cout)
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """ViT: images (B, 3, H, W) -> features (B, N, C)."""

    def __init__(self, cfg: UniTokConfig):
        super().__init__()
        C = cfg.enc_width
        self.grid = cfg.grid
        self.patch_embed = PatchEmbed(3, C, cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, C))
        self.blocks = nn.ModuleList(Block(C, cfg.enc_heads, cfg.mlp_ratio) for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(C)

    def forward(self, images):
        x, hw = self.patch_embed(images)  # (B, N, C)
        x = x + resize_pos_embed(self.pos_embed, self.grid, hw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Decoder(nn.Module):
    """ViT: tokens (B, N, W) -> images (B, 3, H, W)."""

    def __init__(self, cfg: UniTokConfig):
        super().__init__()
        W = cfg.dec_width
        self.grid, self.patch_size = cfg.grid, cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, W))
        self.blocks = nn.ModuleList(Block(W, cfg.dec_heads, cfg.mlp_ratio) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(W)
        self.head = nn.Linear(W, 3 * cfg.patch_size**2)

    def forward(self, tokens, clamp: bool = True):
        side = square_grid(tokens.shape[1])
        x = tokens + resize_pos_embed(self.pos_embed, self.grid, (side, side))
        for block in self.blocks:
            x = block(x)
        images = unpatchify(self.head(self.norm(x)), (side, side), self.patch_size)  # (B, 3, H, W)
        return images.clamp(-1, 1) if clamp else images


# ---------------------------------------------------------------------------- the tokenizer


@dataclass
class UniTokOutput:
    recon: torch.Tensor  # (B, 3, H, W) unclamped reconstruction
    tokens: (
        torch.Tensor
    )  # (B, N, W) post-quantization tokens (what the decoder and the contrastive term read)
    features: torch.Tensor  # (B, N, code_dim) pre-quantization features (dead-code restarts draw from them)
    quant: QuantizerOutput


class UniTok(nn.Module):
    def __init__(self, cfg: UniTokConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_proj = AttentionProjection(cfg.enc_width, cfg.code_dim, cfg.proj_heads, cfg.mlp_ratio)
        self.quantizer = MultiCodebookQuantizer(cfg.num_codebooks, cfg.codebook_size, cfg.codebook_dim,
                                                cfg.commitment, cfg.restart_after)  # fmt: skip
        self.post_quant_proj = AttentionProjection(cfg.code_dim, cfg.dec_width, cfg.proj_heads, cfg.mlp_ratio)
        self.decoder = Decoder(cfg)
        self.apply(self._init_weights)
        with torch.no_grad():  # start from a 2D layout, as MingTok (models/blocks.py sincos_2d)
            self.encoder.pos_embed.copy_(sincos_2d(cfg.grid, cfg.enc_width))
            self.decoder.pos_embed.copy_(sincos_2d(cfg.grid, cfg.dec_width))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def features(self, images):  # (B, 3, H, W) in [-1, 1] -> (B, N, code_dim)
        return self.quant_proj(self.encoder(images))

    def encode(self, images):
        """images (B, 3, H, W) in [-1, 1] -> codes (B, N, K)."""
        return self.quantizer.encode(self.features(images))

    def decode(self, quantized, clamp: bool = True):
        """quantized (B, N, code_dim) -> images (B, 3, H, W) in [-1, 1] (unclamped for training)."""
        return self.decoder(self.post_quant_proj(quantized), clamp=clamp)

    def decode_codes(self, codes, clamp: bool = True):  # (B, N, K) -> (B, 3, H, W)
        return self.decode(self.quantizer.lookup(codes), clamp=clamp)

    def forward(self, images) -> UniTokOutput:
        features = self.features(images)
        quant = self.quantizer(features)
        tokens = self.post_quant_proj(quant.quantized)
        return UniTokOutput(self.decoder(tokens, clamp=False), tokens, features, quant)

    def reconstruct(self, images):
        return self.decode_codes(self.encode(images))

    def restart_dead_codes(self, features, generator: torch.Generator | None = None) -> torch.Tensor:
        """After an optimizer step: dead entries restarted from `features` (UniTokOutput's);
        returns the restarts per sub-codebook (K,)."""
        return self.quantizer.restart_dead_codes(features, generator)

    def stage_parameters(self) -> dict[str, int]:
        n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        return {
            "encoder": n(self.encoder),
            "projections": n(self.quant_proj) + n(self.post_quant_proj),
            "codebooks": n(self.quantizer),
            "decoder": n(self.decoder),
        }
