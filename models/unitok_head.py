"""UniTok positions in the unified model: the input embedding of a position's K codes, and
the depth transformer that predicts the next position's K codes.

    codes (P, K) -> sum over k of table_k[code_k]                   -> (P, H)   CodeEmbedding
    hidden h (M, H), codes (M, K)                                              DepthHead
      -> inputs [proj(h), emb_0(code_0), ..., emb_{K-2}(code_{K-2})] + depth positions
                                                                    -> (M, K, W)
      -> causal transformer blocks (models/blocks.py Block), LayerNorm
      -> one classifier per depth: depth k scores sub-codebook k    -> (M, K, V)

Input: the sum of K learned tables, as RQ-Transformer embeds its stacked codes (a sum is a
concatenation followed by a linear layer, folded into the tables). The tables are the
model's own, not the tokenizer's codebooks, so the data stage stores integer codes alone;
each starts at std init_std / sqrt(K), so a position's sum has a text token's scale.

Output: RQ-Transformer's (and UniTok's MLLM's) depth transformer. The backbone's hidden
state at a position conditions the K codes of the next one (the same causal shift as
MingTok's latents); code k is predicted from the hidden state and codes 0..k-1, so the
K codes of a position are drawn one sub-codebook at a time, each conditioned on the
earlier ones, and the loss is the cross-entropy of each code given the true earlier ones
(teacher forcing), averaged over the K codes. Sampling runs the same blocks one depth at
a time with their key/value cache (`first`, then `next` K - 1 times).

Shape legend: P image positions, M predicted positions, R rows being sampled, H backbone
width, K sub-codebooks, V entries each, W depth width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.models.blocks import Block, KVCache

__all__ = ["CodeEmbedding", "DepthHead"]


class CodeEmbedding(nn.Module):
    def __init__(self, num_codebooks: int, codebook_size: int, hidden: int, init_std: float):
        super().__init__()
        self.K, self.V = num_codebooks, codebook_size
        self.tables = nn.Embedding(num_codebooks * codebook_size, hidden)  # table k: rows k*V .. (k+1)*V
        nn.init.normal_(self.tables.weight, std=init_std / math.sqrt(num_codebooks))

    def forward(self, codes_PK):  # (P, K) long -> (P, H)
        if codes_PK.dim() != 2 or codes_PK.shape[1] != self.K or codes_PK.is_floating_point():
            raise ValueError(f"UniTok codes must be integers (P, {self.K}), got {codes_PK.dtype} "
                             f"{tuple(codes_PK.shape)}")  # fmt: skip
        offset = torch.arange(self.K, device=codes_PK.device) * self.V
        return self.tables(codes_PK + offset).sum(1)


class DepthHead(nn.Module):
    def __init__(self, hidden: int, num_codebooks: int, codebook_size: int, width: int, layers: int,
                 heads: int, init_std: float):  # fmt: skip
        super().__init__()
        self.K, self.V = num_codebooks, codebook_size
        self.proj = nn.Linear(hidden, width)  # depth 0 reads the backbone's hidden state
        self.code_embed = nn.Embedding((num_codebooks - 1) * codebook_size, width)  # code k feeds depth k + 1
        self.depth_pos = nn.Parameter(torch.zeros(num_codebooks, width))
        self.blocks = nn.ModuleList(Block(width, heads, 4.0) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out_KVW = nn.Parameter(torch.empty(num_codebooks, codebook_size, width))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.out_KVW, std=init_std)
        nn.init.normal_(self.depth_pos, std=init_std)

    def _code_inputs(self, codes_MJ, first: int):
        """Inputs of depths first + 1 .. first + J from codes of sub-codebooks first .. first + J - 1."""
        J = codes_MJ.shape[1]
        offset = (torch.arange(J, device=codes_MJ.device) + first) * self.V
        return self.code_embed(codes_MJ + offset)  # (M, J, W)

    def _run(self, x_MJW, first: int, cache: KVCache | None = None):
        """Depths first .. first + J - 1 through the blocks -> logits (M, J, V)."""
        J = x_MJW.shape[1]
        x = x_MJW + self.depth_pos[first : first + J]
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, cache=cache, layer=i)
        out = self.out_KVW[first : first + J]  # (J, V, W)
        return torch.einsum("mjw,jvw->mjv", self.norm(x), out)

    def logits(self, h_MH, codes_MK):
        """Teacher-forced logits (M, K, V): code k scored given h and the true codes < k."""
        start_M1W = self.proj(h_MH)[:, None]
        x = torch.cat([start_M1W, self._code_inputs(codes_MK[:, :-1], 0).to(start_M1W.dtype)], 1)
        return self._run(x, 0)

    def loss(self, h_MH, codes_MK):
        """Cross-entropy per position (M,), the mean over its K codes."""
        logits = self.logits(h_MH, codes_MK).float()  # (M, K, V)
        return (
            F.cross_entropy(logits.flatten(0, 1), codes_MK.flatten(), reduction="none")
            .view(-1, self.K)
            .mean(-1)
        )

    # Sampling, one depth at a time (generation.py draws the codes and guides the logits).

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def first(self, h_RH, cache: KVCache):  # -> logits (R, V) of sub-codebook 0
        return self._run(self.proj(h_RH)[:, None], 0, cache)[:, 0]

    def next(self, codes_R, k: int, cache: KVCache):
        """The drawn code of sub-codebook k - 1 (R,) -> logits (R, V) of sub-codebook k."""
        return self._run(self._code_inputs(codes_R[:, None], k - 1), k, cache)[:, 0]
