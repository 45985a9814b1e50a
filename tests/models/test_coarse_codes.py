"""MingTok's coarse codes (model.coarse_codes): each target latent's nearest k-means centre
is predicted by a softmax head and conditions the flow head. The code is the nearest
centre, the cross-entropy trains the head and the code embedding, generation draws the
code before the latent (cached generation equals the full forward's draws), and a model
without codes has none of their weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.models.test_generation_kinds import CFG, TOKENIZERS, N, conversation, gen
from uniloom.models import sequence as sq
from uniloom.models.generation import generate
from uniloom.models.mingtok import MingTok
from uniloom.models.univision import UniVision

pytestmark = pytest.mark.usefixtures("one_torch_thread")
K = 5


def build(codes: int = K):
    torch.manual_seed(0)
    model = UniVision(replace(CFG, coarse_codes=codes)).eval()
    with torch.no_grad():
        for p in model.flow_head.parameters():  # off MAR's zero init, so conditions matter
            p.add_(0.05 * torch.randn_like(p))
        if codes:
            model.set_coarse_centers(torch.randn(codes, CFG.latent_dim))
            model.coarse_embed.weight.normal_(std=0.5)
    return model, MingTok(TOKENIZERS["mingtok"][1]).eval()


def test_code_is_the_nearest_centre():
    model, _ = build()
    centres = model.coarse_centers
    latents = centres[[3, 0, 4]] + 0.01 * torch.randn(3, CFG.latent_dim)
    assert model.coarse_code(latents).tolist() == [3, 0, 4]


def test_loss_trains_the_code_head_and_embedding():
    model, tokenizer = build()
    model.train()
    z = torch.randn(2, N, CFG.latent_dim)
    batch = sq.collate([sq.text_to_image([20, 21, 22], z[0]), sq.text_to_image([23, 24], z[1])])
    features = tokenizer.decode_semantic(batch.image_latents.view(2, N, -1)).reshape(2 * N, -1)
    losses = model.loss(batch, features.detach())
    assert losses.code > 0 and "text_to_image/code" in losses.per_task
    losses.total.backward()
    assert model.coarse_head.weight.grad.abs().sum() > 0
    assert model.coarse_embed.weight.grad.abs().sum() > 0
    # the code's cross-entropy is a term of the total beside text and flow
    text_flow = model.cfg.text_loss_weight * losses.text + model.cfg.flow_loss_weight * losses.flow
    torch.testing.assert_close(losses.total - model.cfg.aux_loss_weight * losses.aux, text_flow + losses.code)


def test_cached_generation_draws_what_the_full_forward_draws():
    model, tokenizer = build()
    prompts = [[20, 21, 22], [23, 24, 25]]
    turn = generate(model, tokenizer, prompts, guidance=False, render=False, generator=gen())
    ids, mask, rows = conversation("mingtok", model, tokenizer, prompts, turn)
    T0 = len(sq.prompt(prompts[0], 0).input_ids)
    replay = gen()
    with torch.no_grad():
        full = model(ids, rows, mask).hidden
        for i in range(N):  # the code drawn from the head's softmax, then the latent given it
            h = full[:, T0 - 1 + i]
            code = torch.multinomial(model.coarse_head(h).float().softmax(-1), 1, generator=replay)[:, 0]
            z = model.flow_head.sample(model.flow_condition(h, code), CFG.flow_steps, 1.0, None, replay)
            torch.testing.assert_close(z, turn.latents[:, i], atol=1e-4, rtol=1e-4)
    # guided generation runs and draws other latents than the unguided one
    guided = generate(model, tokenizer, prompts, render=False, generator=gen())
    assert not torch.allclose(guided.latents, turn.latents)


def test_a_model_without_codes_has_none_of_their_weights():
    model, _ = build(codes=0)
    assert not any(k.startswith("coarse") for k in model.state_dict())
    with pytest.raises(ValueError, match="coarse_codes"):
        replace(CFG, coarse_codes=1)


def test_coarse_temperature_sharpens_the_code_draw():
    """At temperature 0 the code is the guided logits' argmax; a low temperature draws it
    nearly always, temperature 1 draws other codes too."""
    from uniloom.models.generation import _sample_coarse, guide

    model, _ = build()
    h_RH = torch.randn(3 * 64, CFG.hidden)  # 3 guidance branches of 64 rows
    scales = (1.1, 3.0)
    with torch.no_grad():
        best = guide(model.coarse_head(h_RH).float().view(3, -1, K), scales).argmax(-1)
        greedy = _sample_coarse(model, h_RH, scales, 0.0, None)
        assert torch.equal(greedy, best.repeat(3))
        gen = torch.Generator().manual_seed(0)
        cold = torch.stack([_sample_coarse(model, h_RH, scales, 0.05, gen)[:64] for _ in range(20)])
        warm = torch.stack([_sample_coarse(model, h_RH, scales, 1.0, gen)[:64] for _ in range(20)])
    assert (cold == best).float().mean() > 0.95
    assert (warm == best).float().mean() < (cold == best).float().mean() - 0.1
