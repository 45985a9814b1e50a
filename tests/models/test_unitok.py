"""UniTok: multi-codebook quantization (cosine matching, round trip through the codes,
the codebook and commitment terms, straight-through gradients), usage and perplexity per
sub-codebook, dead-code restarts, the objective, shapes and the paper's size, and codebook
usage kept above a floor by the restarts in a short training on rendered corpus scenes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniloom.models.unitok import MultiCodebookQuantizer, UniTok, UniTokConfig, code_statistics
from uniloom.models.unitok_loss import LossWeights, UniTokObjective
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import sample_scene, scene_objects

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = UniTokConfig()  # 32 px, 4 x 4 tokens, 8 sub-codebooks of 64 entries of 8 dims


def images(batch: int, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def quantizer(**kw) -> MultiCodebookQuantizer:
    torch.manual_seed(0)
    args = dict(num_codebooks=4, codebook_size=16, codebook_dim=3, commitment=0.25, restart_after=3) | kw
    return MultiCodebookQuantizer(**args)


def test_codes_are_the_highest_cosine_entry_of_each_sub_codebook():
    q = quantizer()
    z = torch.randn(2, 5, 12)
    out = q(z)
    assert out.codes.shape == (2, 5, 4) and out.codes.dtype == torch.long
    for k in range(4):
        chunk = F.normalize(z[..., 3 * k : 3 * k + 3], dim=-1)  # (2, 5, 3)
        entries = F.normalize(q.codebooks[k], dim=-1)  # (16, 3)
        assert torch.equal(out.codes[..., k], (chunk @ entries.T).argmax(-1))
    # Cosine: a chunk's length does not matter, only its direction.
    scaled = z.clone()
    scaled[..., 3:6] *= 7.0
    assert torch.equal(q(scaled).codes, out.codes)


def test_mcq_round_trip_codes_to_lookup_equal_the_quantized_output():
    q = quantizer()
    z = torch.randn(3, 7, 12)
    out = q(z)
    assert torch.equal(q.encode(z), out.codes)  # quantize -> codes
    torch.testing.assert_close(q.lookup(out.codes), out.quantized, atol=1e-6, rtol=0)  # codes -> lookup
    chunk_norms = out.quantized.view(3, 7, 4, 3).norm(dim=-1)
    torch.testing.assert_close(chunk_norms, torch.ones_like(chunk_norms))  # L2-normalised entries
    # The model: codes -> lookup -> decoder is what decoding the quantized output gives.
    torch.manual_seed(0)
    model = UniTok(TINY).eval()
    with torch.no_grad():
        result = model(images(2))
        assert torch.equal(model.encode(images(2)), result.quant.codes)
        torch.testing.assert_close(model.decode_codes(result.quant.codes, clamp=False), result.recon,
                                   atol=1e-5, rtol=0)  # fmt: skip


def test_the_loss_is_codebook_plus_a_quarter_commitment_with_separate_gradients():
    q = quantizer()
    z = torch.randn(2, 5, 12, requires_grad=True)
    out = q(z)
    chunks = F.normalize(z.view(2, 5, 4, 3), dim=-1)
    chosen = q.entries(out.codes)
    mse = F.mse_loss(chosen, chunks)
    torch.testing.assert_close(out.loss, 1.25 * mse)
    out.loss.backward()
    # The encoder side gets only the commitment term; the codebooks only the codebook term.
    (expected_z,) = torch.autograd.grad(0.25 * F.mse_loss(chunks, chosen.detach()), z)
    torch.testing.assert_close(z.grad, expected_z)
    (expected_books,) = torch.autograd.grad(F.mse_loss(q.entries(out.codes), chunks.detach()), q.codebooks)
    torch.testing.assert_close(q.codebooks.grad, expected_books)


def test_straight_through_gradients_reach_the_encoder():
    q = quantizer()
    z = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 12)
    (q(z).quantized * g).sum().backward()
    (through_chunks,) = torch.autograd.grad((q.chunks(z).flatten(-2) * g).sum(), z)
    torch.testing.assert_close(z.grad, through_chunks)  # the quantizer is the identity backward
    assert q.codebooks.grad is None  # the reconstruction does not move the codebooks

    torch.manual_seed(0)
    model = UniTok(TINY)
    out = model(images(2))
    (out.recon - images(2)).abs().mean().backward()
    for name, part in [
        ("patch_embed", model.encoder.patch_embed),
        ("encoder block", model.encoder.blocks[0].attn.qkv),
        ("quant_proj", model.quant_proj.attn.qkv),
    ]:
        assert part.weight.grad.abs().sum() > 0, name
    assert model.quantizer.codebooks.grad is None


def test_usage_and_perplexity_per_sub_codebook():
    counts = torch.tensor([[4, 4, 4, 4], [16, 0, 0, 0], [8, 8, 0, 0]])  # (K = 3, V = 4)
    usage, perplexity = code_statistics(counts)
    torch.testing.assert_close(usage, torch.tensor([1.0, 0.25, 0.5]))
    torch.testing.assert_close(perplexity, torch.tensor([4.0, 1.0, 2.0]))
    q = quantizer(num_codebooks=2, codebook_size=4, codebook_dim=2)
    with torch.no_grad():
        q.codebooks.copy_(torch.tensor([[[1.0, 0], [0, 1], [-1, 0], [0, -1]]] * 2))
    # Codebook 0 sees all four directions once each; codebook 1 always the first.
    z = torch.tensor([[[1.0, 0, 1, 0], [0, 1, 2, 0], [-1, 0, 3, 0], [0, -1, 1, 0.1]]])
    out = q(z)
    assert out.codes[0, :, 0].tolist() == [0, 1, 2, 3] and out.codes[0, :, 1].tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(out.usage, torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(out.perplexity, torch.tensor([4.0, 1.0]))


def test_dead_codes_are_restarted_from_batch_features():
    q = quantizer(num_codebooks=2, codebook_size=4, codebook_dim=2, restart_after=3)
    with torch.no_grad():
        q.codebooks.copy_(torch.tensor([[[1.0, 0], [0, 1], [-1, 0], [0, -1]]] * 2))
    # Three features whose chunks lean to entries 0, 1 and 3 of both codebooks: 2 is never chosen.
    z = torch.tensor([[[1.0, 0.9, 0.9, 1.0], [0.9, 1.0, 0.8, -1.0], [0.8, -1.0, 1.0, 0.9]]])
    q.eval()
    q(z)
    assert q.unused.sum() == 0  # evaluation counts nothing
    q.train()
    for _ in range(2):
        q(z)
    assert not q.restart_dead_codes(z).any()  # unused for 2 batches: not dead yet
    codes = q(z).codes[0]  # (3 features, 2 codebooks)
    assert sorted(codes[:, 0].tolist()) == sorted(codes[:, 1].tolist()) == [0, 1, 3]
    assert q.unused[:, 2].tolist() == [3, 3] and q.unused[:, [0, 1, 3]].sum() == 0
    before = q.codebooks.detach().clone()
    g = torch.Generator().manual_seed(0)
    assert q.restart_dead_codes(z, g).tolist() == [1, 1]
    chunks = F.normalize(z.view(3, 2, 2), dim=-1)  # (M, K, d)
    for k in range(2):
        restarted = q.codebooks[k, 2].detach()
        assert any(torch.allclose(restarted, chunks[m, k]) for m in range(3)), k  # a batch feature
        assert torch.equal(q.codebooks[k, [0, 1, 3]], before[k, [0, 1, 3]])  # live entries untouched
    assert q.unused[:, 2].tolist() == [0, 0]
    # The restarted entry sits on a feature, so that feature now picks it: it is live again.
    assert (q(z).codes == 2).any()


def corpus_images(n: int, size: int) -> torch.Tensor:
    """n scenes of the synthetic corpus (pipelines/corpus), rendered: (n, 3, size, size) in [-1, 1]."""
    pixels = [np.asarray(render(scene_objects(sample_scene(7, i)["objects"]), size)) for i in range(n)]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_usage(x: torch.Tensor, restart: bool, steps: int = 40):
    """Usage and perplexity (K,) of each sub-codebook on x after `steps` Adam steps on the
    pixel and VQ terms, restarting dead codes after every step or never."""
    torch.manual_seed(0)
    model = UniTok(replace(TINY, restart_after=5))
    objective = UniTokObjective(model, text_dim=16)
    opt = torch.optim.Adam(list(model.parameters()) + list(objective.parameters()), lr=3e-3)
    no_text = LossWeights(text=0.0)  # the caption table is not what this measures
    table, caption = torch.randn(len(x), 16), torch.arange(len(x))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        losses = objective(model, x, table, caption, no_text)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        if restart:
            model.restart_dead_codes(losses["features"], g)
    with torch.no_grad():
        quant = model.eval()(x).quant
    return quant.usage, quant.perplexity, losses["pixel_l1"].item()


def test_codebook_usage_stays_above_a_floor_after_a_short_training_on_the_corpus(report):
    """16 rendered scenes (256 tokens a batch, much of it plain background). Without
    restarts each 64-entry sub-codebook collapses to a handful of entries."""
    x = corpus_images(16, 32)
    usage, perplexity, l1 = train_usage(x, restart=True)
    collapsed_usage, collapsed_perplexity, _ = train_usage(x, restart=False)
    report(
        f"40 steps on 16 corpus scenes, 8 x 64 entries: usage {usage.min():.2f}-{usage.max():.2f}, "
        f"perplexity {perplexity.min():.1f}-{perplexity.max():.1f} with restarts; without: usage "
        f"{collapsed_usage.min():.2f}-{collapsed_usage.max():.2f}, perplexity "
        f"{collapsed_perplexity.min():.1f}-{collapsed_perplexity.max():.1f}; pixel L1 {l1:.3f}"
    )
    # Every sub-codebook above the usage floor; perplexity judged against the run without
    # restarts (the per-codebook minimum was 4.4 on an AVX2 CPU and 3.3 on an AVX-512 one:
    # 40 Adam steps' trajectory depends on the CPU's float rounding).
    assert (usage >= 0.1).all()
    assert collapsed_usage.mean() < usage.mean() / 2
    assert collapsed_perplexity.mean() < perplexity.mean() / 2
    assert l1 < 0.25  # it did train: the L1 starts near 0.8


def test_the_objective_gives_every_loss_and_trains_every_part():
    torch.manual_seed(0)
    model = UniTok(TINY)
    objective = UniTokObjective(model, text_dim=24)
    x, table, caption = images(4), torch.randn(3, 24), torch.tensor([0, 1, 0, 2])
    losses = objective(model, x, table, caption, LossWeights())
    for name in ("pixel_l1", "pixel_l2", "vq", "text", "total"):
        assert losses[name].dim() == 0 and torch.isfinite(losses[name]), name
    expected = 0.2 * losses["pixel_l1"] + losses["pixel_l2"] + losses["vq"] + losses["text"]
    torch.testing.assert_close(losses["total"], expected)
    assert losses["usage"].shape == losses["perplexity"].shape == (TINY.num_codebooks,)
    assert (
        losses["features"].shape == (4, TINY.num_tokens, TINY.code_dim)
        and not losses["features"].requires_grad
    )
    assert losses["recon"].shape == x.shape and not losses["recon"].requires_grad
    losses["total"].backward()
    parts = [model.encoder.patch_embed, model.quant_proj.shortcut, model.post_quant_proj.shortcut,
             model.decoder.head, objective.text_proj]  # fmt: skip
    for part in parts:
        assert part.weight.grad.abs().sum() > 0, part
    assert model.quantizer.codebooks.grad.abs().sum() > 0


def test_the_text_term_aligns_each_image_with_its_own_caption_through_the_codes():
    """Trained on the text term alone, the pooled post-quantization tokens of 4 images
    come to pick their own caption among 8 locked embeddings (4 of them distractors)."""
    torch.manual_seed(0)
    model = UniTok(TINY)
    objective = UniTokObjective(model, text_dim=16)
    opt = torch.optim.Adam(list(model.parameters()) + list(objective.parameters()), lr=3e-3)
    x = images(4)
    table = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    caption = torch.tensor([5, 0, 3, 6])
    only_text = LossWeights(pixel_l1=0.0, pixel_l2=0.0, vq=0.0, text=1.0)
    first = None
    for _ in range(30):
        losses = objective(model, x, table, caption, only_text)
        first = losses["text"].item() if first is None else first
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    with torch.no_grad():
        pooled = objective.text_norm(model(x).tokens.mean(dim=1))
        similarity = F.normalize(objective.text_proj(pooled), dim=-1) @ F.normalize(table, dim=-1).T
    assert similarity.argmax(-1).tolist() == caption.tolist()
    assert losses["text"].item() < first / 4


def test_shapes_follow_the_config_and_other_resolutions_work():
    torch.manual_seed(0)
    model = UniTok(TINY).eval()
    with torch.no_grad():
        codes = model.encode(images(2))
        assert codes.shape == (2, 16, 8) and int(codes.max()) < 64
        assert model.decode_codes(codes).shape == (2, 3, 32, 32)
        out = model.reconstruct(images(1, size=48))  # 6 x 6 tokens: positions resized
    assert out.shape == (1, 3, 48, 48) and out.min() >= -1 and out.max() <= 1


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        UniTokConfig(image_size=30)
    with pytest.raises(ValueError, match="not divisible by num_codebooks"):
        UniTokConfig(code_dim=60)
    with pytest.raises(ValueError, match="proj_heads"):
        UniTokConfig(proj_heads=3)
    with pytest.raises(ValueError, match="restart_after"):
        UniTokConfig(restart_after=0)


def test_paper_size(report):
    cfg = UniTokConfig.paper()
    assert (cfg.image_size, cfg.num_tokens, cfg.code_dim) == (256, 256, 64)
    assert (cfg.num_codebooks, cfg.codebook_size, cfg.codebook_dim) == (8, 4096, 8)
    with torch.device("meta"):
        model = UniTok(cfg)
        codes = model.encode(torch.empty(1, 3, 256, 256))
        assert codes.shape == (1, 256, 8)
        assert model.decode_codes(codes).shape == (1, 3, 256, 256)
    counts = model.stage_parameters()
    report(
        ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items())
        + f", total {sum(counts.values()) / 1e6:.1f}M"
    )
    assert counts["codebooks"] == 8 * 4096 * 8
    assert 290e6 < counts["encoder"] < 320e6  # ViT-L/16-sized
