"""Decoder pieces: RMSNorm, RoPE (relative positions), grouped-query attention against a
reference with repeated key/value heads, the KV cache, and the attention mask rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniloom.models.transformer import (
    Attention,
    KVCache,
    RMSNorm,
    apply_rope,
    attention_mask,
    rope_angles,
)
from uniloom.models.univision_config import UniVisionConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = UniVisionConfig(hidden=32, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=100.0)


def test_rmsnorm():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_()
    x = torch.randn(3, 6)
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        cq, sq = rope_angles(torch.tensor([[pq]]), 8, 100.0)
        ck, sk = rope_angles(torch.tensor([[pk]]), 8, 100.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))
    cos, sin = rope_angles(torch.tensor([[0]]), 8, 100.0)
    torch.testing.assert_close(apply_rope(q, cos, sin), q)  # position 0 is the identity


def reference_attention(attn: Attention, x, mask):
    """Plain multi-head attention with every key/value head repeated for its query group."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, attn.nh, attn.hd).transpose(1, 2)
    k = attn.wk(x).view(B, T, attn.nkv, attn.hd).transpose(1, 2)
    v = attn.wv(x).view(B, T, attn.nkv, attn.hd).transpose(1, 2)
    cos, sin = rope_angles(torch.arange(T)[None].expand(B, T), attn.hd, CFG.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = attn.nh // attn.nkv
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) / attn.hd**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    y = F.softmax(scores, -1) @ v
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1))


def test_gqa_attention_and_cache():
    torch.manual_seed(0)
    attn = Attention(CFG)
    B, T = 2, 7
    x = torch.randn(B, T, CFG.hidden)
    keys = torch.ones(B, T, dtype=torch.bool)
    mask = attention_mask(keys, T)
    cos, sin = rope_angles(torch.arange(T)[None].expand(B, T), CFG.head_dim, CFG.rope_theta)
    full = attn(x, cos, sin, mask)
    torch.testing.assert_close(full, reference_attention(attn, x, mask), atol=1e-5, rtol=1e-5)
    # Prefill 3 tokens, then one at a time: the same outputs.
    cache = KVCache(1)
    outs = []
    for span in (slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 7)):
        n = span.stop - span.start
        all_keys = cache.extend_mask(torch.ones(B, n, dtype=torch.bool))
        outs.append(attn(x[:, span], cos[:, :, span], sin[:, :, span], attention_mask(all_keys, n), cache, 0))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == T and cache.keys[0].shape == (B, CFG.num_kv_heads, T, CFG.head_dim)


def test_attention_mask_rules():
    keys = torch.tensor([[True, False, True, True, True]])
    docs = torch.tensor([[0, 0, 0, 1, 1]])
    m = attention_mask(keys, 5, docs)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],  # a hidden key is still seen by its own query (no empty rows)
        [1, 0, 1, 0, 0],  # ... and by nobody else
        [0, 0, 0, 1, 0],  # a new document starts from scratch
        [0, 0, 0, 1, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(m, expected)
    # Two new tokens after three cached ones see the cache and, causally, each other.
    m = attention_mask(torch.ones(1, 5, dtype=torch.bool), 2)[0, 0]
    assert torch.equal(m, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))


def test_cache_repeat_and_select_are_branch_major():
    cache = KVCache(1)
    cache.extend_mask(torch.tensor([[True, False], [True, True]]))
    cache.append(0, torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 2, 1), torch.zeros(2, 1, 2, 1))
    rep = cache.repeat(3)
    assert rep.keys[0][:, 0, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]
    rep.key_mask[:2] = False  # editing a copy leaves the original alone
    assert cache.key_mask.sum() == 3
    last = rep.select(slice(4, 6))
    assert last.key_mask.tolist() == [[True, False], [True, True]] and last.length == 2
