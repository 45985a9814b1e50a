"""MingTok: shapes, the causal semantic decoder's key/value cache, position-embedding
resizing, clamping, masking, and the paper preset's size."""

from __future__ import annotations

import pytest
import torch

from uniloom.models.blocks import resize_pos_embed as resize
from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import ConfigError

SMALL = MingTokConfig(
    image_size=32,
    patch_size=8,
    enc_width=64,
    enc_depth=2,
    enc_heads=2,
    sem_width=96,
    sem_depth=3,
    sem_heads=3,
    pix_width=64,
    pix_depth=2,
    pix_heads=2,
    pix_patch_size=4,
    latent_shift=0.3,
    latent_scale=2.0,
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MingTok(SMALL).eval()


def images(batch: int, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_shapes_follow_the_config(model):
    x = images(2)
    latents = model.encode(x)
    assert latents.shape == (2, SMALL.num_tokens, SMALL.latent_dim) == (2, 16, 32)
    features = model.decode_semantic(latents)
    assert features.shape == (2, 16, SMALL.semantic_dim) == (2, 16, 96)
    assert model.decode_pixels(features).shape == x.shape
    assert model.reconstruct(x).shape == x.shape


def test_the_tiny_preset_gives_64_latents_at_64_px():
    cfg = load_config("tiny").mingtok
    assert (cfg.image_size, cfg.num_tokens, cfg.latent_dim) == (64, 64, 32)
    with torch.device("meta"):
        model = MingTok(cfg)
    assert model.encode(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, 64, 32)


def test_incremental_decoding_with_the_cache_equals_the_full_causal_pass(model):
    latents = model.encode(images(3))  # (3, 16, 32)
    with torch.no_grad():
        full = model.decode_semantic(latents)
        cache = model.new_semantic_cache(3)
        one_by_one = torch.cat([model.decode_semantic(latents[:, t : t + 1], cache) for t in range(16)], 1)
        assert cache.length == 16
        cache = model.new_semantic_cache(3)
        chunks = torch.cat([model.decode_semantic(latents[:, t : t + 5], cache) for t in range(0, 16, 5)], 1)
    assert torch.allclose(one_by_one, full, atol=1e-5, rtol=0)
    assert torch.allclose(chunks, full, atol=1e-5, rtol=0)
    assert (full[:, 1:] - full[:, :1]).abs().max() > 1e-2  # positions really differ


def test_the_semantic_decoder_is_causal(model):
    latents = model.encode(images(2))
    changed = latents.clone()
    changed[:, 9] += 1.0
    with torch.no_grad():
        a, b = model.decode_semantic(latents), model.decode_semantic(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert (a[:, 9:] - b[:, 9:]).abs().amax(dim=(0, 2)).min() > 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_a_causal_encoder_keeps_later_patches_out_of_earlier_latents(causal):
    from dataclasses import replace

    torch.manual_seed(0)
    model = MingTok(replace(SMALL, enc_causal=causal)).eval()
    x = images(1)
    changed = x.clone()
    changed[..., 16:, :] = -x[..., 16:, :]  # the bottom half: patch rows 2 and 3 (tokens 8..15)
    with torch.no_grad():
        a, b = model.encode(x), model.encode(changed)
    assert torch.equal(a[:, :8], b[:, :8]) == causal  # a bidirectional ViT mixes every patch in
    assert not torch.equal(a[:, 8:], b[:, 8:])


def test_the_class_token_is_last_and_dropping_it_changes_no_patch_feature(model):
    with torch.no_grad():
        with_cls = model.encode_all(images(2))  # (2, 17, 32)
        assert with_cls.shape == (2, 17, 32)
        features = model.semantic_decoder(model.denormalize(with_cls))
        assert torch.allclose(features[:, :-1], model.decode_semantic(with_cls[:, :-1]), atol=1e-6)
        assert not torch.allclose(model.encode(images(2)), with_cls[:, 1:])


def test_latent_normalisation_uses_the_fixed_shift_and_scale(model):
    with torch.no_grad():
        raw = model.encoder(images(2))
        assert torch.allclose(model.encode_all(images(2)), (raw - 0.3) / 2.0, atol=1e-6)


def test_masked_patches_change_the_latents(model):
    x = images(2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(model.encode(x, mask), model.encode(x))
        mask[:, :8] = True
        assert not torch.allclose(model.encode(x, mask), model.encode(x))


def test_position_embeddings_resize_bicubically_for_other_resolutions(model):
    pos = torch.randn(1, 16, 8)
    assert resize(pos, 4, (4, 4)) is pos
    constant = torch.ones(1, 16, 8) * 0.7
    assert torch.allclose(resize(constant, 4, (6, 6)), torch.full((1, 36, 8), 0.7), atol=1e-5)
    ramp = torch.linspace(0, 1, 4).repeat(4).view(1, 16, 1)  # left to right
    big = resize(ramp, 4, (8, 8)).view(8, 8)
    assert (big[:, 1:] > big[:, :-1]).all()  # still increases left to right
    x = images(2, size=48)  # 6x6 patches instead of 4x4
    with torch.no_grad():
        latents = model.encode(x)
        assert latents.shape == (2, 36, 32)
        features = model.decode_semantic(latents, total=36)
        assert model.decode_pixels(features).shape == x.shape


def test_reconstruct_clamps_to_the_image_range(model):
    with torch.no_grad():
        model.pixel_decoder.head.bias.fill_(5.0)
        features = model.decode_semantic(model.encode(images(2)))
        assert model.decode_pixels(features, clamp=False).min() > 1.0
        out = model.reconstruct(images(2))
    assert torch.equal(out, torch.ones_like(out))


def test_gradients_reach_every_stage(model):
    model.train()
    x = images(2)
    out = model.decode_pixels(model.decode_semantic(model.encode(x)), clamp=False)
    (out - x).abs().mean().backward()
    for name, stage in [
        ("enc", model.encoder),
        ("sem", model.semantic_decoder),
        ("pix", model.pixel_decoder),
    ]:
        assert stage.blocks[0].attn.qkv.weight.grad.abs().sum() > 0, name


def test_invalid_shapes_are_rejected_as_config_errors():
    with pytest.raises(ConfigError, match="pix_patch_size"):
        load_config("tiny", overrides=["mingtok.pix_patch_size=8"])
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        load_config("tiny", overrides=["mingtok.image_size=60"])


def test_paper_preset_matches_the_model_spec(report):
    cfg = load_config("paper").mingtok
    assert (cfg.image_size, cfg.patch_size, cfg.num_tokens, cfg.latent_dim) == (512, 32, 256, 32)
    assert (cfg.enc_width, cfg.enc_depth, cfg.enc_heads) == (768, 12, 12)
    assert (cfg.sem_width, cfg.sem_depth, cfg.sem_heads, cfg.semantic_dim) == (1024, 24, 16, 1024)
    assert (cfg.pix_width, cfg.pix_depth, cfg.pix_heads, cfg.pix_patch_size) == (1024, 24, 16, 16)
    assert (cfg.latent_shift, cfg.latent_scale) == (1.468, 8.094)
    with torch.device("meta"):
        model = MingTok(cfg)
        latents = model.encode_all(torch.empty(1, 3, 512, 512))
        assert latents.shape == (1, 257, 32)  # 16 x 16 patches + the class token
        features = model.decode_semantic(latents[:, :-1])
        assert model.pixel_decoder.pos_embed.shape == (1, 1024, 1024)  # 32 x 32 pixel-decoder tokens
        assert model.decode_pixels(features).shape == (1, 3, 512, 512)
    counts = model.stage_parameters()
    report(
        ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items())
        + f", total {sum(counts.values()) / 1e6:.1f}M"
    )
    assert 80e6 < counts["encoder"] < 95e6  # a ViT-B/32 with a 32-d head
    assert 290e6 < counts["semantic_decoder"] < 320e6  # ViT-L-sized, 24 x 1024


def test_building_on_the_meta_device_stays_cheap():
    """Data-stage actors build MingTok on the meta device before loading the encoder's
    weights; a meta-device op at init used to import torch._dynamo (a second each)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from uniloom.models.mingtok import MingTok, MingTokConfig\n"
        "with torch.device('meta'):\n"
        "    MingTok(MingTokConfig())\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
