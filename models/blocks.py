"""Building blocks shared by every model: attention with a key/value cache, the pre-norm
transformer block, SwiGLU, RMSNorm, rotary and 2D position embeddings, patch embedding.

    Attention  multi-head or grouped-query attention; a causal flag or an explicit boolean
               mask (causal, block, padding: anything), RoPE optional, KVCache optional
    Block      x + attn(LayerNorm(x)), then x + SwiGLU(LayerNorm(x)): the ViT block of
               MingTok's three stages and UniTok's encoder and decoder
    SwiGLU     down(silu(gate) * up), [gate | up] from one matmul (kernels/flow_block.py)
    RMSNorm    kernels/rms_norm.py
    PatchEmbed images -> patch tokens, and `unpatchify` back

Parameter names are those of the checkpoints trained before the blocks were shared:
training checkpoints (pipelines/train/checkpoint.py) address parameters by name, so a
renamed parameter would not resume. That is why Attention has two projection layouts, each
with its family's names (fused `qkv`/`proj` as in ViTs; split `wq`/`wk`/`wv`/`wo` as in
LLaMA-style decoders), and why SwiGLU takes the names of its two linear layers.

Shape legend: B batch, T new tokens, S all keys (cache + new), C width, nh query heads,
nkv key/value heads, hd head dim, P patch size, h x w patch grid, N = h * w patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.kernels import check_mode, use_triton
from uniloom.kernels.flow_block import swiglu
from uniloom.kernels.rms_norm import rms_norm

# ---------------------------------------------------------------------------- norms and MLP


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


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """2/3 of a GELU MLP's hidden size (same parameter count), rounded up to a multiple of 32."""
    return int(math.ceil(2 * mlp_ratio * width / 3 / 32) * 32)


class SwiGLU(nn.Module):
    """down(silu(gate) * up) with [gate | up] from one matmul; the activation is
    kernels/flow_block.py `swiglu`, Triton or the reference under `kernels`. `names` are
    the two linear layers' attribute (and so parameter) names."""

    def __init__(
        self,
        width: int,
        hidden: int,
        *,
        bias: bool = True,
        kernels: str = "reference",
        names: tuple[str, str] = ("gate_up", "down"),
    ):
        super().__init__()
        self.kernels = check_mode(kernels)
        self.names = names
        setattr(self, names[0], nn.Linear(width, 2 * hidden, bias=bias))
        setattr(self, names[1], nn.Linear(hidden, width, bias=bias))

    def forward(self, x):  # (..., C)
        gate_up, down = (getattr(self, n) for n in self.names)
        return down(swiglu(gate_up(x), triton=use_triton(self.kernels, x.device)))  # (..., C)


# ---------------------------------------------------------------------------- positions


def rope_angles(position_ids, head_dim: int, theta: float, dtype=torch.float32):
    """position_ids (B, T) -> cos, sin (B, 1, T, hd), the "rotate half" layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, heads, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def resize_pos_embed(pos: torch.Tensor, grid: int, hw: tuple[int, int]) -> torch.Tensor:
    """Learned position embeddings of a `grid` x `grid` layout (1, grid*grid, C), resized
    bicubically to an h x w layout (1, h*w, C) for another resolution."""
    if hw == (grid, grid):
        return pos
    C = pos.shape[-1]
    img = pos.reshape(1, grid, grid, C).permute(0, 3, 1, 2)  # (1, C, grid, grid)
    img = F.interpolate(img.float(), size=hw, mode="bicubic", align_corners=False).to(pos.dtype)
    return img.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], C)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(1, grid * grid, width) sin-cos embedding of a raster-ordered grid, scaled to std 0.1:
    strong enough to matter beside the patch embeddings at initialisation."""
    # On the CPU even when the model is built on the meta device: meta-device arange runs
    # through decompositions that import torch._dynamo (a second per data-stage actor).
    with torch.device("cpu"):
        quarter = width // 4
        freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
        ys, xs = torch.meshgrid(
            torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
        )
        parts = []
        for coord in (ys.flatten(), xs.flatten()):
            angle = coord[:, None] * freq[None, :]  # (grid * grid, width / 4)
            parts += [angle.sin(), angle.cos()]
        emb = torch.cat(parts, dim=1)
        emb = torch.cat([emb, torch.zeros(grid * grid, width - emb.shape[1], dtype=emb.dtype)], dim=1)
        return (0.1 * emb / emb.std()).float().unsqueeze(0)


def square_grid(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    return side


# ---------------------------------------------------------------------------- patches


class PatchEmbed(nn.Conv2d):
    """A P x P, stride-P convolution: images (B, Cin, H, W) -> tokens (B, N, C) in raster
    order, and the grid (h, w). A Conv2d itself, so its parameters are `weight`, `bias`."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        x = super().forward(images)  # (B, C, h, w)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (h, w)  # (B, N, C)


def unpatchify(x, hw: tuple[int, int], patch_size: int, channels: int = 3):
    """Tokens (B, h*w, channels * P * P) in raster order -> images (B, channels, h*P, w*P)."""
    (h, w), P = hw, patch_size
    B = x.shape[0]
    x = x.view(B, h, w, channels, P, P).permute(0, 3, 1, 4, 2, 5)  # (B, channels, h, P, w, P)
    return x.reshape(B, channels, h * P, w * P)


# ---------------------------------------------------------------------------- attention


class KVCache:
    """Keys and values of every layer plus the key mask (B, S) of the tokens they hold.

    Rows are independent sequences; guided generation keeps its three branches as rows
    (branch-major: row g * B + b), so `repeat` and `select` move between one history and
    its branches. A caller extends the key mask once per forward, before its layers append.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_mask: torch.Tensor | None = None  # (B, S) bool
        # (B,) long, what aligning image starts has added to the positions so far
        # (models/sequence.align_image_starts); None: nothing
        self.position_shift: torch.Tensor | None = None

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
        out.position_shift = None if self.position_shift is None else fn(self.position_shift)
        return out

    def repeat(self, n: int) -> KVCache:
        """A new cache holding n copies of every row, copy-major (row g * B + b)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def select(self, rows: slice) -> KVCache:
        return self._map(lambda t: t[rows])

    def fork(self) -> KVCache:
        """A cache holding this one's tensors: what a forward appends to it stays out of
        this one (a look-ahead that is not kept, as each of TUNA's denoising steps)."""
        return self._map(lambda t: t)


def attention_mask(key_mask_BS, num_new: int, doc_ids_BT=None, image_ids_BT=None):
    """(B, 1, T, S) bool, True = may attend, for the last `num_new` of S slots querying all
    S, from four ingredients:
      - causality over absolute cache slots (query i of a call sits at slot S - T + i),
      - a key mask (B, S): False hides a key from every query (padding, the conditioning
        a classifier-free-guidance branch must not see),
      - document ids (B, T) for packed rows: a token sees only its own document,
      - image ids (B, T), -1 for text: the tokens of one image also see each other's
        later tokens, so an image is bidirectional within itself while text stays causal
        (TUNA denoises a whole image at once). Only the new tokens are compared: with a
        cache, an image is bidirectional when all of it is in one call.
    Every query may always see itself, so no row is empty (an empty row would give NaN,
    and 0 * NaN poisons every value that reads it)."""
    B, S = key_mask_BS.shape
    device = key_mask_BS.device
    q_slot = torch.arange(S - num_new, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    order = (k_slot <= q_slot)[None]  # (1, T, S)
    if image_ids_BT is not None:
        if image_ids_BT.shape != (B, num_new):
            raise ValueError(f"image ids must be (B, T) = {(B, num_new)}, got {tuple(image_ids_BT.shape)}")
        same_image = (image_ids_BT[:, :, None] == image_ids_BT[:, None, :]) & (image_ids_BT[:, :, None] >= 0)
        cached = torch.zeros(B, num_new, S - num_new, dtype=torch.bool, device=device)
        order = order | torch.cat([cached, same_image], dim=2)  # (B, T, S)
    allowed = order & key_mask_BS[:, None, :]  # (B, T, S)
    if doc_ids_BT is not None:
        if num_new != S:
            raise ValueError("document ids (packing) are for uncached forwards only")
        allowed = allowed & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])
    allowed = allowed | (k_slot == q_slot)[None]  # a query always sees itself: no empty rows
    return allowed[:, None]


# Devices where a masked grouped-query call repeats K/V to every query head first. On CUDA,
# flash attention takes no mask and memory-efficient attention no grouped K/V heads, so
# such a call (every training forward: padding, documents, images) would fall back to the
# math kernel and its (B, nh, T, S) score matrix; repeated K/V let memory-efficient
# attention take it. On the CPU the fused kernel takes both as they are.
EXPAND_MASKED_GQA_ON = ("cuda",)


class Attention(nn.Module):
    """Multi-head attention, grouped-query when kv_heads < heads (each key/value head
    serves heads / kv_heads query heads); the output width is `out_width` (default: the
    input's), so a projection between two widths can attend (UniTok's code space).

    Projection layouts (module docstring: the names are the checkpoints'):
      fused  qkv (C -> (nh + 2 nkv) hd, one matmul) and proj
      split  wq, wk, wv (C -> nh hd, nkv hd, nkv hd) and wo
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        out_width: int | None = None,
        bias: bool = True,
        fused: bool = True,
    ):
        super().__init__()
        self.nh, self.nkv = heads, kv_heads or heads
        self.hd = head_dim or width // heads
        if self.nh % self.nkv:
            raise ValueError(f"heads {self.nh} is not a multiple of kv_heads {self.nkv}")
        self.fused = fused
        q_dim, kv_dim, out_width = self.nh * self.hd, self.nkv * self.hd, out_width or width
        if fused:
            self.qkv = nn.Linear(width, q_dim + 2 * kv_dim, bias=bias)
            self.proj = nn.Linear(q_dim, out_width, bias=bias)
        else:
            self.wq = nn.Linear(width, q_dim, bias=bias)
            self.wk = nn.Linear(width, kv_dim, bias=bias)
            self.wv = nn.Linear(width, kv_dim, bias=bias)
            self.wo = nn.Linear(q_dim, out_width, bias=bias)

    def _heads(self, x, n: int):  # (B, T, n * hd) -> (B, n, T, hd)
        return x.view(*x.shape[:2], n, self.hd).transpose(1, 2)

    def forward(self, x, *, causal: bool = False, mask=None, rope=None, cache: KVCache | None = None,
                layer: int = 0):  # fmt: skip
        """x (B, T, C) -> (B, T, out_width). `mask` (bool, broadcastable to (B, nh, T, S), True =
        may attend) or `causal` (query i of a cached call sits at slot S - T + i); `rope`
        (cos, sin) rotates queries and keys; with a cache, the keys and values of x are
        appended to it (layer `layer`) and every key it holds is attended."""
        if causal and mask is not None:
            raise ValueError("attention takes a causal flag or an explicit mask, not both")
        B, T, _ = x.shape
        q_dim, kv_dim = self.nh * self.hd, self.nkv * self.hd
        if self.fused:
            q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = self._heads(q, self.nh), self._heads(k, self.nkv), self._heads(v, self.nkv)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nkv, S, hd)
        past = k.shape[2] - T
        if causal and past and T > 1:
            # Query i sits at slot past + i and sees keys 0 .. past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        grouped = self.nh != self.nkv
        if grouped and mask is not None and q.device.type in EXPAND_MASKED_GQA_ON:
            k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))  # (B, nh, S, hd)
            grouped = False
        # A single new causal token may see every cached key: no mask needed.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and not past, enable_gqa=grouped
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, q_dim)
        return self.proj(y) if self.fused else self.wo(y)  # (B, T, out_width)


class Block(nn.Module):
    """Pre-norm transformer block: attention then SwiGLU MLP, LayerNorms, biases
    (MingTok's and UniTok's ViT stages)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))

    def forward(self, x, *, causal: bool = False, mask=None, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.norm1(x), causal=causal, mask=mask, cache=cache, layer=layer)  # (B, T, C)
        return x + self.mlp(self.norm2(x))
