"""TUNA: the cascade's shapes at 32 px and other resolutions, the attention mask that makes
an image bidirectional within itself and text causal (on its own and inside the model),
the VAE round trip training on rendered corpus scenes, the flow path and the flow loss's
gradient reaching the cascade (and not the frozen VAE), Euler sampling, config and input
errors, and the paper's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniloom.models.blocks import Block, attention_mask
from uniloom.models.tuna import Tuna, TunaConfig
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import sample_scene, scene_objects

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TunaConfig()  # 32 px -> 8 x 8 x 8 latents -> 4 x 4 tokens of width 64


def images(batch: int, height: int = 32, width: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, height, width or height, generator=g) * 2 - 1


def model(seed: int = 0) -> Tuna:
    torch.manual_seed(seed)
    return Tuna(TINY)


def corpus_images(n: int, size: int) -> torch.Tensor:
    """n scenes of the synthetic corpus (pipelines/corpus), rendered: (n, 3, size, size) in [-1, 1]."""
    pixels = [np.asarray(render(scene_objects(sample_scene(7, i)["objects"]), size)) for i in range(n)]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1


def backbone_block(width: int = 64) -> Block:
    torch.manual_seed(5)
    return Block(width, 2, 4.0)


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("size", "latent_hw", "tokens"),
    [((32, 32), (8, 8), 16), ((48, 48), (12, 12), 36), ((32, 48), (8, 12), 24)],
)
def test_cascade_shapes_follow_the_resolution(size, latent_hw, tokens):
    m = model().eval()
    x = images(2, *size)
    with torch.no_grad():
        mean, logvar = m.posterior(x)
        assert mean.shape == logvar.shape == (2, 8, *latent_hw)
        z = m.encode(x)
        torch.testing.assert_close(z, mean)  # shift 0, scale 1: the posterior mean
        block = m.image_tokens(z, torch.ones(2))
        assert block.shape == (2, 1 + tokens, TINY.llm_width)
        assert m.decode(z).shape == (2, 3, *size)
        assert m.predict_velocity(z, torch.rand(2)).shape == z.shape
        # Time enters the block as its first token only.
        other_time = m.image_tokens(z, torch.zeros(2))
    assert torch.equal(other_time[:, 1:], block[:, 1:])
    assert not torch.allclose(other_time[:, 0], block[:, 0])


def test_latents_are_normalised_by_the_configured_shift_and_scale():
    torch.manual_seed(0)
    m = Tuna(TunaConfig(latent_shift=0.5, latent_scale=4.0)).eval()
    x = images(2)
    with torch.no_grad():
        mean, _ = m.posterior(x)
        z = m.encode(x)
        torch.testing.assert_close(z, (mean - 0.5) / 4.0)
        torch.testing.assert_close(m.decode(z, clamp=False), m._decode_raw(mean))
        draw = m.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(draw, z)


# ---------------------------------------------------------------------------- the mask


def test_images_attend_bidirectionally_within_themselves_and_text_causally_in_a_packed_row():
    # Two documents packed in one row, one image each, then a padding slot:
    # doc 0: text, image A (2 tokens), text; doc 1: text, image B (3 tokens), text.
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, -1]])
    keys = docs >= 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # A's first token sees A's second
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # doc 1 sees nothing of doc 0
            [0, 0, 0, 0, 1, 1, 1, 1, 0, 0],  # B: all three of its tokens, text before it
            [0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 0],  # text after B: causal
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding sees only itself
        ],
        dtype=torch.bool,
    )
    # Images numbered across the row, or per document: the document ids keep them apart.
    for ids in ([-1, 0, 0, -1, -1, 1, 1, 1, -1, -1], [-1, 0, 0, -1, -1, 0, 0, 0, -1, -1]):
        mask = attention_mask(keys, 10, docs, torch.tensor([ids]))
        assert mask.shape == (1, 1, 10, 10)
        assert torch.equal(mask[0, 0], expected), ids
    # No images: exactly the mask without image ids.
    no_images = torch.full((1, 10), -1)
    assert torch.equal(attention_mask(keys, 10, docs, no_images), attention_mask(keys, 10, docs))


def test_an_image_block_appended_to_a_cache_is_bidirectional():
    # 3 cached prompt tokens; the new call is [time token, 3 image tokens] of one image.
    keys = torch.ones(1, 7, dtype=torch.bool)
    mask = attention_mask(keys, 4, image_ids_BT=torch.zeros(1, 4, dtype=torch.long))
    assert mask.shape == (1, 1, 4, 7) and mask.all()
    causal = attention_mask(keys, 4)[0, 0]
    assert torch.equal(causal, torch.ones(4, 7, dtype=torch.bool).tril(diagonal=3))
    with pytest.raises(ValueError, match="image ids must be"):
        attention_mask(keys, 4, image_ids_BT=torch.zeros(1, 7, dtype=torch.long))


def test_in_the_model_the_image_block_sees_its_later_tokens_and_the_prompt_does_not_see_the_image():
    """Hidden states the backbone produces: the time token (first of the block, before
    every image token) depends on the image latents; the prompt positions do not."""
    m = model()
    block = backbone_block()
    seen = []

    def backbone(sequence, mask):
        hidden = block(sequence, mask=mask)
        seen.append(hidden.detach())
        return hidden

    condition = torch.randn(2, 3, TINY.llm_width)
    t = torch.full((2,), 0.5)
    x_t = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.predict_velocity(x_t, t, condition, backbone)
        m.predict_velocity(x_t + 1.0, t, condition, backbone)
    first, second = seen
    assert first.shape == (2, 3 + 1 + 16, TINY.llm_width)
    torch.testing.assert_close(first[:, :3], second[:, :3], atol=0, rtol=0)  # the prompt: causal
    assert (first[:, 3] - second[:, 3]).abs().max() > 1e-3  # the time token sees the image


# ---------------------------------------------------------------------------- the VAE


def test_the_vae_round_trip_trains_on_corpus_scenes(report):
    """25 steps on 8 rendered scenes: the round trip through the latents beats painting
    each image its own mean colour, so the latents carry where things are."""
    x = corpus_images(8, 32)
    colour_only = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2).mean().item()
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def round_trip_mse() -> float:
        with torch.no_grad():
            return (m.decode(m.encode(x), clamp=False) - x).pow(2).mean().item()

    before = round_trip_mse()
    for _ in range(25):
        losses = m.vae_loss(x, g)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    after = round_trip_mse()
    report(f"25 Adam steps on 8 corpus scenes: round-trip MSE {before:.3f} -> {after:.3f} (each image's "
           f"mean colour: {colour_only:.3f}), KL {losses.kl.item():.3f}")  # fmt: skip
    torch.testing.assert_close(losses.total, losses.recon + TINY.kl_weight * losses.kl)
    assert losses.images.shape == x.shape and not losses.images.requires_grad
    assert losses.kl.item() > 0
    assert after < 0.8 * colour_only < before
    # The flow parts are not part of the VAE's objective.
    assert m.rep_encoder.patch_embed.weight.grad is None and m.head_out.linear.weight.grad is None


# ---------------------------------------------------------------------------- flow matching


def test_the_flow_path_runs_from_noise_at_t0_to_data_at_t1():
    m = model()
    x1 = torch.randn(3, 8, 8, 8)
    noise = torch.randn(3, 8, 8, 8)
    t, x_t, target = m.flow_path(x1, torch.tensor([0.0, 0.25, 1.0]), noise)
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[1], 0.25 * x1[1] + 0.75 * noise[1])
    torch.testing.assert_close(x_t[2], x1[2])
    torch.testing.assert_close(target, x1 - noise)
    t, x_t, _ = m.flow_path(x1, generator=torch.Generator().manual_seed(0))
    assert t.shape == (3,) and ((t >= 0) & (t < 1)).all()


def test_the_flow_loss_trains_the_cascade_and_the_backbone_but_not_the_vae():
    m = model()
    block = backbone_block()
    backbone = lambda sequence, mask: block(sequence, mask=mask)  # noqa: E731
    latents = m.encode(images(2))  # with the VAE's graph: the loss must not use it
    condition = torch.randn(2, TINY.llm_width, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    # At initialisation the head's output layer is zero: only it gets a gradient.
    m.flow_loss(latents, condition, backbone, generator=g).mean().backward()
    assert m.head_out.linear.weight.grad.abs().sum() > 0
    assert m.rep_encoder.patch_embed.weight.grad.abs().sum() == 0
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    opt.step()
    opt.zero_grad()
    block.zero_grad()
    loss = m.flow_loss(latents, condition, backbone, generator=g)
    assert loss.shape == (2,)
    loss.mean().backward()
    for name, part in [
        ("representation patch embedding", m.rep_encoder.patch_embed),
        ("representation block", m.rep_encoder.blocks[0].attn.qkv),
        ("connector", m.connector[1]),
        ("time embedding", m.time_embed.mlp[0]),
        ("head block modulation", m.head[0].ada[-1]),  # its gates open from zero at this step
        ("backbone", block.attn.qkv),
    ]:
        assert part.weight.grad.abs().sum() > 0, name
    assert condition.grad.abs().sum() > 0
    frozen = [p.grad for p in (*m.vae_encoder.parameters(), *m.vae_moments.parameters())]
    assert all(grad is None or not grad.any() for grad in frozen)


def test_the_flow_loss_falls_with_training():
    m = model()
    latents = m.encode(images(4)).detach()
    condition = torch.randn(4, 2, TINY.llm_width)
    head = [*m.rep_encoder.parameters(), *m.connector.parameters(), *m.time_embed.parameters(),
            *m.head.parameters(), *m.head_out.parameters()]  # fmt: skip
    opt = torch.optim.Adam(head, lr=2e-3)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    first = None
    for _ in range(25):
        loss = m.flow_loss(latents, condition, t=t, noise=noise).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2


def test_euler_sampling_takes_n_steps_from_t0_to_t1_and_decodes_to_images():
    m = model().eval()
    block = backbone_block()
    times = []

    def backbone(sequence, mask):
        times.append(sequence[:, 1].clone())  # after a 1-token condition: the time token
        return block(sequence, mask=mask)

    condition = torch.randn(2, TINY.llm_width)
    z = m.sample(
        2, steps=4, condition=condition, backbone=backbone, generator=torch.Generator().manual_seed(0)
    )
    assert z.shape == (2, 8, 8, 8) and torch.isfinite(z).all()
    with torch.no_grad():
        expected = m.time_embed(torch.tensor([0.0, 0.25, 0.5, 0.75]) * 1000)  # (4, H)
    assert len(times) == 4
    for step, seen in enumerate(times):
        torch.testing.assert_close(seen, expected[step].expand(2, -1))
    pictures = m.decode(z)
    assert pictures.shape == (2, 3, 32, 32) and pictures.min() >= -1 and pictures.max() <= 1
    # A constant velocity c moves the noise by c over t = 0 -> 1, whatever the step count.
    with torch.no_grad():
        m.head_out.linear.bias.fill_(0.5)
    noise = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(0))
    z = m.sample(1, steps=3, hw=(12, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, noise + 0.5)
    assert m.decode(z).shape == (1, 3, 48, 48)


# ---------------------------------------------------------------------------- errors, sizes


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="not a multiple of vae_patch_size \\* rep_patch_size = 8"):
        TunaConfig(image_size=36)
    with pytest.raises(ValueError, match="rep_width 60 is not divisible"):
        TunaConfig(rep_width=60, rep_heads=8)
    with pytest.raises(ValueError, match="llm_width 64 is not divisible"):
        TunaConfig(head_heads=3)
    with pytest.raises(ValueError, match="rep_patch_size must be at least 1"):
        TunaConfig(rep_patch_size=0)
    with pytest.raises(ValueError, match="kl_weight"):
        TunaConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="latent_scale"):
        TunaConfig(latent_scale=0.0)


def test_invalid_inputs_are_rejected():
    m = model()
    with pytest.raises(ValueError, match="multiples of 8"):
        m.encode(images(1, 36))  # a whole number of VAE patches, not of representation tokens
    with pytest.raises(ValueError, match="latents must be"):
        m.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="rep_patch_size 2"):
        m.image_tokens(torch.zeros(1, 8, 7, 8), torch.ones(1))
    with pytest.raises(ValueError, match="condition must be"):
        m.flow_loss(torch.zeros(2, 8, 8, 8), torch.zeros(2, 32))
    with pytest.raises(ValueError, match="steps must be at least 1"):
        m.sample(1, steps=0)


def test_paper_size(report):
    cfg = TunaConfig.paper()
    assert (cfg.latent_grid, cfg.latent_channels, cfg.num_tokens, cfg.velocity_dim) == (32, 48, 1024, 48)
    with torch.device("meta"):
        m = Tuna(cfg)
        z = m.encode(torch.empty(1, 3, 512, 512))
        assert z.shape == (1, 48, 32, 32)
        assert m.image_tokens(z, torch.ones(1)).shape == (1, 1025, 2048)  # the shared backbone's width
        assert m.decode(z).shape == (1, 3, 512, 512)
    counts = m.stage_parameters()
    report(", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    assert 380e6 < counts["representation_encoder"] < 440e6  # SigLIP-2 so400m-sized
