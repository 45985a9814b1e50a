"""The decoder backbone of the unified model: RMSNorm, rotary position embeddings,
grouped-query attention with a key/value cache, and the pre-norm decoder block whose
feed-forward is the mixture of experts (models/moe.py).

Attention masks are boolean, True = may attend, and are built once per forward by
`attention_mask` from three ingredients, so one code path serves training, packing and
guided generation:
  - causality over absolute cache slots (query i of a call sits at slot past + i),
  - a key mask (B, S): False hides a key from every query; padding, and the conditioning
    that a classifier-free-guidance branch must not see, are hidden this way,
  - document ids (B, T) for packed rows: a token sees only its own document.
Every query may always see itself, so no row of the mask is empty (an empty row would
give NaN, and 0 * NaN poisons every value that reads it).

Shape legend: B batch, T new tokens, S all keys (cache + new), H hidden, nh query heads,
nkv key/value heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.kernels import check_mode, use_triton
from uniloom.kernels.rms_norm import rms_norm
from uniloom.models.moe import MoE
from uniloom.models.univision_config import UniVisionConfig


class RMSNorm(nn.Module):
    """kernels/rms_norm.py: statistics in fp32, the result in x's dtype promoted with the
    weight's; `kernels` picks Triton or the reference (uniloom.kernels)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, kernels: str = "auto"):
        super().__init__()
        self.eps = eps
        self.kernels = check_mode(kernels)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., dim)
        return rms_norm(x, self.weight, self.eps, triton=use_triton(self.kernels, x.device))


def rope_angles(position_ids, head_dim: int, theta: float, dtype=torch.float32):
    """position_ids (B, T) -> cos, sin (B, 1, T, hd), the "rotate half" layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, heads, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every layer plus the key mask (B, S) of the tokens they hold.

    Rows are independent sequences; guided generation keeps its three branches as rows
    (branch-major: row g * B + b), so `repeat` and `select` move between one history and
    its branches.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_mask: torch.Tensor | None = None  # (B, S) bool

    @property
    def length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def visible_count(self, batch: int, device) -> torch.Tensor:
        """Keys each row can see (B,): the position the next visible token takes."""
        if self.key_mask is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return self.key_mask.sum(-1)

    def extend_mask(self, key_mask_BT) -> torch.Tensor:
        self.key_mask = key_mask_BT if self.key_mask is None else torch.cat([self.key_mask, key_mask_BT], 1)
        return self.key_mask

    def append(self, layer: int, k, v):
        """Store k, v (B, nkv, T, hd) of new tokens; return all of them (B, nkv, S, hd)."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def _map(self, fn) -> KVCache:
        out = KVCache(len(self.keys))
        out.keys = [None if k is None else fn(k) for k in self.keys]
        out.values = [None if v is None else fn(v) for v in self.values]
        out.key_mask = None if self.key_mask is None else fn(self.key_mask)
        return out

    def repeat(self, n: int) -> KVCache:
        """A new cache holding n copies of every row, copy-major (row g * B + b)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def select(self, rows: slice) -> KVCache:
        return self._map(lambda t: t[rows])


def attention_mask(key_mask_BS, num_new: int, doc_ids_BT=None):
    """(B, 1, T, S) bool for the last `num_new` of S slots querying all S."""
    B, S = key_mask_BS.shape
    device = key_mask_BS.device
    q_slot = torch.arange(S - num_new, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_slot <= q_slot)[None] & key_mask_BS[:, None, :]  # (B, T, S)
    if doc_ids_BT is not None:
        if num_new != S:
            raise ValueError("document ids (packing) are for uncached forwards only")
        allowed = allowed & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])
    allowed = allowed | (k_slot == q_slot)[None]  # a query always sees itself: no empty rows
    return allowed[:, None]


class Attention(nn.Module):
    """Grouped-query attention: nh query heads share nkv key/value heads."""

    def __init__(self, cfg: UniVisionConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden, self.nh * self.hd, bias=False)
        self.wk = nn.Linear(cfg.hidden, self.nkv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.hidden, self.nkv * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):  # x (B, T, H)
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))  # (B, T, H)


class DecoderBlock(nn.Module):
    """x + attention(norm(x)), then x + MoE(norm(x)); the MoE routes image positions
    through its own gate and only the valid (B, T) tokens (models/moe.py: padding takes no
    expert slot)."""

    def __init__(self, cfg: UniVisionConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels=cfg.kernels)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels=cfg.kernels)
        self.moe = MoE(cfg)

    def forward(
        self, x, cos, sin, mask, image_mask=None, cache=None, layer: int = 0, valid=None
    ):  # (B, T, H)
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        y, stats = self.moe(self.ffn_norm(x), image_mask, valid)
        return x + y, stats
