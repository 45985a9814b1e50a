"""The shared blocks (models/blocks.py): RMSNorm, RoPE (relative positions), attention in
both projection layouts against a plain re-derivation (explicit scores, softmax and boolean
masks; grouped-query heads repeated), the key/value cache and the attention mask rules;
the parameter names the checkpoints carry; and parity of the models built on the blocks:
MingTok's three stages and the backbone's forward against the same weights run through
the re-derivation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniloom.models import sequence as sq
from uniloom.models.blocks import (
    Attention,
    Block,
    KVCache,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attention_mask,
    rope_angles,
)
from uniloom.models.flow_head import ResBlock
from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.transformer import DecoderBlock
from uniloom.models.univision import UniVision, UniVisionConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = UniVisionConfig(hidden=32, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=100.0)


def gqa(cfg: UniVisionConfig = CFG) -> Attention:
    return Attention(cfg.hidden, cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     bias=False, fused=False)  # fmt: skip


# ---------------------------------------------------------------------------- re-derivation


def scores_attention(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(hd), masked) v with every key/value head repeated for its
    query group; allowed broadcasts to (B, nh, T, S), True = may attend."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return F.softmax(scores, -1) @ v


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def rope(x, position_ids, theta: float):
    """Rotate-half RoPE written out: pairs (i, i + hd/2) turn by position * theta^(-2i/hd)."""
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2).float() / hd)
    angle = torch.cat([position_ids[..., None] * inv_freq] * 2, -1)[:, None]  # (B, 1, T, hd)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * angle.cos() + torch.cat([-x2, x1], -1) * angle.sin()


def reference_fused(attn: Attention, x, allowed=None):
    """The fused layout: qkv's output is [q | k | v], each head-major."""
    B, T, C = x.shape
    q, k, v = linear(x, attn.qkv).view(B, T, 3, attn.nh, attn.hd).permute(2, 0, 3, 1, 4)
    return linear(scores_attention(q, k, v, allowed).transpose(1, 2).reshape(B, T, -1), attn.proj)


def reference_split(attn: Attention, x, allowed, position_ids, theta):
    B, T, _ = x.shape
    q = linear(x, attn.wq).view(B, T, attn.nh, attn.hd).transpose(1, 2)
    k = linear(x, attn.wk).view(B, T, attn.nkv, attn.hd).transpose(1, 2)
    v = linear(x, attn.wv).view(B, T, attn.nkv, attn.hd).transpose(1, 2)
    q, k = rope(q, position_ids, theta), rope(k, position_ids, theta)
    return linear(scores_attention(q, k, v, allowed).transpose(1, 2).reshape(B, T, -1), attn.wo)


def reference_block(block: Block, x, allowed=None):
    C = x.shape[-1]
    h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    x = x + reference_fused(block.attn, h, allowed)
    h = F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    gate, up = linear(h, block.mlp.gate_up).chunk(2, -1)
    return x + linear(F.silu(gate) * up, block.mlp.down)


def causal(T: int):
    return torch.ones(T, T, dtype=torch.bool).tril()


def perturbed(module: torch.nn.Module, seed: int = 0):
    """Off the initialisation (zero biases, ones in the norms), so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


# ---------------------------------------------------------------------------- the blocks


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
        cq, sq_ = rope_angles(torch.tensor([[pq]]), 8, 100.0)
        ck, sk = rope_angles(torch.tensor([[pk]]), 8, 100.0)
        return (apply_rope(q, cq, sq_) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))
    cos, sin = rope_angles(torch.tensor([[0]]), 8, 100.0)
    torch.testing.assert_close(apply_rope(q, cos, sin), q)  # position 0 is the identity


def test_gqa_attention_and_cache():
    torch.manual_seed(0)
    attn = gqa()
    B, T = 2, 7
    x = torch.randn(B, T, CFG.hidden)
    positions = torch.arange(T)[None].expand(B, T)
    mask = attention_mask(torch.ones(B, T, dtype=torch.bool), T)
    cos, sin = rope_angles(positions, CFG.head_dim, CFG.rope_theta)
    full = attn(x, mask=mask, rope=(cos, sin))
    expected = reference_split(attn, x, mask, positions, CFG.rope_theta)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
    # Prefill 3 tokens, then one at a time: the same outputs.
    cache = KVCache(1)
    outs = []
    for span in (slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 7)):
        n = span.stop - span.start
        all_keys = cache.extend_mask(torch.ones(B, n, dtype=torch.bool))
        rot = (cos[:, :, span], sin[:, :, span])
        outs.append(attn(x[:, span], mask=attention_mask(all_keys, n), rope=rot, cache=cache, layer=0))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == T and cache.keys[0].shape == (B, CFG.num_kv_heads, T, CFG.head_dim)


def test_masked_gqa_with_repeated_kv_equals_grouped(monkeypatch):
    """The CUDA path (K/V repeated to every query head for a masked call) run on the CPU:
    the same outputs and gradients as the grouped call."""
    from uniloom.models import blocks

    torch.manual_seed(0)
    attn = gqa()
    B, T = 2, 7
    x = torch.randn(B, T, CFG.hidden)
    cos, sin = rope_angles(torch.arange(T)[None].expand(B, T), CFG.head_dim, CFG.rope_theta)
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[1, 5:] = False
    mask = attention_mask(keys, T, image_ids_BT=torch.tensor([[-1, 0, 0, 0, -1, -1, -1]] * B))
    runs = []
    for devices in ((), (x.device.type,)):
        monkeypatch.setattr(blocks, "EXPAND_MASKED_GQA_ON", devices)
        attn.zero_grad()
        y = attn(x, mask=mask, rope=(cos, sin))
        y.square().sum().backward()
        runs.append((y.detach(), [p.grad.clone() for p in attn.parameters()]))
    (grouped, g_grads), (repeated, r_grads) = runs
    torch.testing.assert_close(repeated, grouped, atol=1e-5, rtol=1e-5)
    for a, b in zip(r_grads, g_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_attention_causal_masked_and_cached_match_the_rederivation():
    torch.manual_seed(0)
    attn = perturbed(Attention(24, 3))
    B, T = 2, 6
    x = torch.randn(B, T, 24)
    torch.testing.assert_close(attn(x), reference_fused(attn, x), atol=1e-5, rtol=1e-5)
    full = attn(x, causal=True)
    torch.testing.assert_close(full, reference_fused(attn, x, causal(T)), atol=1e-5, rtol=1e-5)
    # Any block mask: here two images of 3 tokens, each bidirectional within itself.
    blocks = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).bool()
    torch.testing.assert_close(attn(x, mask=blocks), reference_fused(attn, x, blocks), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(attn(x, mask=blocks), attn(x), atol=1e-3)
    # Causal with a cache: chunks of 2, 1, 3 tokens give the full causal pass.
    cache = KVCache(1)
    outs = []
    for span in (slice(0, 2), slice(2, 3), slice(3, 6)):
        cache.extend_mask(torch.ones(B, span.stop - span.start, dtype=torch.bool))
        outs.append(attn(x[:, span], causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        attn(x, causal=True, mask=blocks)


def test_block_matches_the_rederivation():
    torch.manual_seed(0)
    block = perturbed(Block(32, 2, 4.0))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(block(x), reference_block(block, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        block(x, causal=True), reference_block(block, x, causal(5)), atol=1e-5, rtol=1e-5
    )


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


def test_parameter_names_are_the_checkpoints():
    """Training checkpoints address parameters by name (pipelines/train/checkpoint.py):
    the shared blocks carry the names each model was trained under."""
    assert list(Block(32, 2, 4.0).state_dict()) == [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.gate_up.weight", "mlp.gate_up.bias",
        "mlp.down.weight", "mlp.down.bias",
    ]  # fmt: skip
    assert [n for n in DecoderBlock(CFG).state_dict() if n.startswith("attn.")] == [
        "attn.wq.weight",
        "attn.wk.weight",
        "attn.wv.weight",
        "attn.wo.weight",
    ]
    assert [n for n in ResBlock(16, 2.0).state_dict() if n.startswith("mlp.")] == [
        "mlp.w12.weight",
        "mlp.w12.bias",
        "mlp.w3.weight",
        "mlp.w3.bias",
    ]
    assert list(SwiGLU(8, 16, bias=False).state_dict()) == ["gate_up.weight", "down.weight"]
    tok = MingTok(MingTokConfig(image_size=16, enc_width=32, sem_width=32, pix_width=32, enc_depth=1,
                                sem_depth=1, pix_depth=1))  # fmt: skip
    assert [n for n in tok.state_dict() if "patch_embed" in n] == [
        "encoder.patch_embed.weight",
        "encoder.patch_embed.bias",
    ]


# ---------------------------------------------------------------------------- model parity

TOK = MingTokConfig(image_size=32, patch_size=8, enc_width=64, enc_depth=2, enc_heads=2, sem_width=96,
                    sem_depth=2, sem_heads=3, pix_width=64, pix_depth=2, pix_heads=2, pix_patch_size=4,
                    latent_shift=0.3, latent_scale=2.0)  # fmt: skip


@pytest.mark.parametrize("enc_causal", [False, True])
def test_mingtok_stages_match_the_rederivation(enc_causal):
    from dataclasses import replace

    torch.manual_seed(0)
    model = perturbed(MingTok(replace(TOK, enc_causal=enc_causal))).eval()
    cfg, enc, sem, pix = model.cfg, model.encoder, model.semantic_decoder, model.pixel_decoder
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    B, P, n, L = 2, cfg.patch_size, cfg.num_tokens, cfg.latent_dim
    with torch.no_grad():
        # Encoder: patches in raster order, positions, class token last, blocks, head.
        x = F.conv2d(images, enc.patch_embed.weight, enc.patch_embed.bias, stride=P)  # (B, C, 4, 4)
        x = x.flatten(2).transpose(1, 2) + enc.pos_embed
        x = torch.cat([x, enc.cls_token.expand(B, -1, -1)], 1)
        for block in enc.blocks:
            x = reference_block(block, x, causal(n + 1) if enc_causal else None)
        latents = (enc.head_out(x) - cfg.latent_shift) / cfg.latent_scale  # (B, n + 1, L)
        torch.testing.assert_close(model.encode_all(images), latents, atol=1e-5, rtol=1e-5)
        # Semantic decoder: causal blocks over the raw patch latents.
        z = latents[:, :-1] * cfg.latent_scale + cfg.latent_shift
        x = linear(z, sem.proj) + z.repeat_interleave(cfg.sem_width // L, -1) + sem.pos_embed[:, :n]
        for block in sem.blocks:
            x = reference_block(block, x, causal(n))
        features = sem.norm(x)
        torch.testing.assert_close(model.decode_semantic(latents[:, :-1]), features, atol=1e-5, rtol=1e-5)
        # Pixel decoder: each token to its 2x2 sub-tokens, blocks, patches back to pixels.
        W, Q = cfg.pix_width, cfg.pix_patch_size
        x = linear(features, pix.proj).view(B, 4, 4, 2, 2, W).permute(0, 1, 3, 2, 4, 5).reshape(B, 4 * n, W)
        x = x + pix.pos_embed
        for block in pix.blocks:
            x = reference_block(block, x)
        patches = linear(pix.norm(x), pix.head).view(B, 8, 8, 3, Q, Q)  # (B, 2h, 2w, 3, Q, Q)
        pixels = torch.einsum("bhwcpq->bchpwq", patches).reshape(B, 3, 32, 32)
        torch.testing.assert_close(model.decode_pixels(features, clamp=False), pixels, atol=1e-5, rtol=1e-5)


def test_backbone_matches_the_rederivation():
    """A packed row (documents, padding, image slots) through UniVision's decoder, and the
    same weights through explicit RMSNorm, RoPE, grouped-query attention over the packing
    mask, and each layer's MoE."""
    cfg = UniVisionConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          rope_theta=100.0, init_std=0.1, num_experts=4, experts_per_token=2, expert_ffn=24,
                          num_shared_experts=1, semantic_dim=12, latent_dim=6, flow_width=16, flow_depth=2,
                          flow_mlp_mult=2.0)  # fmt: skip
    torch.manual_seed(0)
    model = perturbed(UniVision(cfg)).eval()
    z = lambda seed: torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    samples = [
        sq.text_to_image([20, 21, 22], z(1)),
        sq.understanding(z(2), [23], [24, 25]),
        sq.text_only([26, 27]),
    ]
    b = sq.pack(samples, 40)
    feats = torch.randn(b.image_latents.shape[0], 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = model(
            b.input_ids, feats, b.image_mask, position_ids_BT=b.position_ids, doc_ids_BT=b.doc_ids
        ).hidden
        T = b.input_ids.shape[1]
        same_doc = b.doc_ids[:, :, None] == b.doc_ids[:, None, :]
        allowed = (causal(T)[None] & same_doc)[:, None]  # (B, 1, T, T)

        def rms(x, norm):
            return x / x.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt() * norm.weight

        x = model.embed_inputs(b.input_ids, feats, b.image_mask)
        for layer in model.layers:
            x = x + reference_split(
                layer.attn, rms(x, layer.attn_norm), allowed, b.position_ids, cfg.rope_theta
            )
            x = x + layer.moe(rms(x, layer.ffn_norm), b.image_mask, b.doc_ids >= 0)[0]
        expected = rms(x, model.norm)
    assert (b.doc_ids < 0).any()  # padding is in the row
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
