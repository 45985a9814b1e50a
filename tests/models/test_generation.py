"""Generation: image shapes and cache bookkeeping, guidance branches that compute exactly
the model on the prompt with the hidden tokens removed, multi-round editing straight from
the cache (MingTok's encoder runs once, pixels are never decoded in between), and text
answers consistent with the full forward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from uniloom.models import sequence as sq
from uniloom.models.generation import edit, generate, generate_text, prefill
from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.special_tokens import EOS, IMAGE_END, IMAGE_PATCH, IMAGE_START, SPECIAL_IDS
from uniloom.models.univision import UniVision, UniVisionConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOK = MingTokConfig(image_size=16, patch_size=8, enc_width=32, enc_depth=1, enc_heads=2, sem_width=32, sem_depth=2,
                    sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2, pix_patch_size=4, latent_dim=8,
                    latent_shift=0.0, latent_scale=1.0)  # fmt: skip  # 2x2 = 4 image tokens
CFG = UniVisionConfig(vocab_size=48, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      rope_theta=100.0, init_std=0.1, num_experts=4, experts_per_token=2, expert_ffn=24,
                      num_shared_experts=1, semantic_dim=32, latent_dim=8, flow_width=16, flow_depth=2,
                      flow_mlp_mult=2.0, flow_steps=3)  # fmt: skip
N = TOK.num_tokens


@pytest.fixture(params=[0, 16], ids=["positions", "aligned_image_starts"])
def models(request):
    """The model with plain positions, and with image starts aligned (model.image_stride):
    every property of the cache holds for both."""
    torch.manual_seed(0)
    model, tokenizer = UniVision(replace(CFG, image_stride=request.param)).eval(), MingTok(TOK).eval()
    with torch.no_grad():  # a flow head that is not the zero-initialised identity
        for p in model.flow_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, tokenizer


def pixels(batch=2, seed=0):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_generate_shapes_cache_and_features(models):
    model, tokenizer = models
    prompts = [[20, 21, 22], [23]]  # different lengths: the shorter is left-padded and masked
    out = generate(model, tokenizer, prompts, generator=torch.Generator().manual_seed(0))
    assert (
        out.images.shape == (2, 3, 16, 16)
        and out.latents.shape == (2, N, 8)
        and out.features.shape == (2, N, 32)
    )
    prompt_len = len(sq.prompt(prompts[0]).input_ids)
    assert out.state.length == prompt_len + N + 2  # + the N slots, <image_end>, <eos>
    assert out.state.key_mask.shape[0] == 2 and out.state.key_mask.sum(-1).tolist() == [prompt_len + N + 2,
                                                                                         prompt_len - 2 + N + 2]  # fmt: skip
    # The incrementally decoded features are the semantic decoder's full causal decoding.
    torch.testing.assert_close(out.features, tokenizer.decode_semantic(out.latents), atol=1e-5, rtol=1e-5)
    again = generate(model, tokenizer, prompts, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.latents, out.latents)
    other = generate(model, tokenizer, prompts, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.latents, out.latents)
    # A left-padded row computes what it computes alone (padding hidden, positions compacted).
    with torch.no_grad():
        alone, _ = prefill(model, [sq.prompt([23])])
        padded, _ = prefill(model, [sq.prompt([23]), sq.prompt([20, 21, 22])])
    torch.testing.assert_close(padded.view(3, 2, -1)[:, 0], alone, atol=1e-5, rtol=1e-5)


def test_guidance_branches_equal_prompts_without_the_hidden_tokens(models):
    model, _ = models
    with torch.no_grad():
        p = sq.prompt([20, 21, 22], source_tokens=N)
        src = torch.randn(1, N, 32)
        h, cache = prefill(model, [p], None, src, guidance=True)
        assert h.shape == (3, CFG.hidden) and cache.key_mask.shape == (3, len(p.input_ids))

        def alone(keep, features):
            ids, mask = p.input_ids[keep][None], p.image_mask[keep][None]
            return model(ids, features, mask).hidden[0, -1]

        torch.testing.assert_close(h[2], alone(torch.ones_like(p.turn_mask), src[0]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[1], alone(~p.text_mask, src[0]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[0], alone(~p.turn_mask, None), atol=1e-5, rtol=1e-5)
    # ... and those are the sequences guidance dropout trains on.
    z = torch.zeros(N, 8)
    text_uncond = sq.editing(z, [([20, 21, 22], z)], drop="text").input_ids[: int((~p.text_mask).sum())]
    uncond = sq.editing(z, [([20, 21, 22], z)], drop="turn").input_ids[: int((~p.turn_mask).sum())]
    assert torch.equal(text_uncond, p.input_ids[~p.text_mask])
    assert torch.equal(uncond, p.input_ids[~p.turn_mask])


def test_multi_round_edit_continues_from_the_cache(models, count_calls):
    model, tokenizer = models
    calls = count_calls(tokenizer, ["encode", "decode_pixels"])

    gen = torch.Generator().manual_seed(0)
    first = edit(model, tokenizer, None, [[20, 21]], source_images=pixels(1), render=False, generator=gen)
    assert calls == {"encode": 1, "decode_pixels": 0}
    second = edit(model, tokenizer, first.state, [[22]], render=False, generator=gen)
    third = edit(model, tokenizer, second.state, [[23, 24]], generator=gen)
    assert calls == {"encode": 1, "decode_pixels": 1}  # pixels only for the last round, nothing re-encoded
    turn = lambda ids: len(sq.prompt(ids).input_ids) + N + 2  # noqa: E731
    assert first.state.length == len(sq.prompt([20, 21], source_tokens=N).input_ids) + N + 2
    assert second.state.length == first.state.length + turn([22])
    assert third.state.length == second.state.length + turn([23, 24]) and third.images.shape == (1, 3, 16, 16)
    # The history matters: the same instruction without it yields another image.
    fresh = generate(model, tokenizer, [[22]], render=False, generator=torch.Generator().manual_seed(9))
    again = edit(
        model, tokenizer, first.state, [[22]], render=False, generator=torch.Generator().manual_seed(9)
    )
    assert not torch.allclose(fresh.latents, again.latents)
    with pytest.raises(ValueError, match="needs source images"):
        edit(model, tokenizer, None, [[20]])


def test_drop_history_hides_the_conversation_from_the_unconditional_branch(models):
    model, tokenizer = models
    first = generate(model, tokenizer, [[20]], render=False, generator=torch.Generator().manual_seed(0))
    p = sq.prompt([21])
    with torch.no_grad():
        h_keep, _ = prefill(model, [p], first.state, guidance=True)
        h_drop, _ = prefill(model, [p], first.state, guidance=True, drop_history=True)
        # Unconditional with history dropped = <assistant> <image_start> from scratch.
        scratch = model(p.input_ids[~p.turn_mask][None]).hidden[0, -1]
    torch.testing.assert_close(h_drop[0], scratch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_drop[1:], h_keep[1:])
    assert not torch.allclose(h_keep[0], scratch)


def test_generate_text_matches_full_forward(models):
    model, tokenizer = models
    out = generate_text(model, [[20, 21], [22]], tokenizer=tokenizer, images=pixels(2), max_new_tokens=6)
    assert all(1 <= len(ids) <= 6 for ids in out.ids)
    with torch.no_grad():
        features = tokenizer.decode_semantic(tokenizer.encode(pixels(2)))
        for b, prompt_ids in enumerate([[20, 21], [22]]):
            p = sq.prompt(prompt_ids, source_tokens=N, image=False)
            ids = torch.cat([p.input_ids, torch.tensor(out.ids[b])])[None]
            mask = torch.cat([p.image_mask, torch.zeros(len(out.ids[b]), dtype=torch.bool)])[None]
            logits = model.logits(model(ids, features[b], mask).hidden[0])
            greedy = logits[len(p.input_ids) - 1 : -1].argmax(-1)
            assert greedy.tolist() == out.ids[b]


def test_generate_text_stops_when_all_done_says_so(models):
    """Ranks decoding in lock step stop together: a row finished early keeps its answer
    while the model is still called for the others (here: never done, so every step runs)."""
    model, tokenizer = models
    calls = []

    def never(done_B):
        calls.append(done_B.clone())
        return False

    alone = generate_text(model, [[20, 21], [22]], tokenizer=tokenizer, images=pixels(2), max_new_tokens=6)
    locked = generate_text(model, [[20, 21], [22]], tokenizer=tokenizer, images=pixels(2), max_new_tokens=6,
                           all_done=never)  # fmt: skip
    assert locked.ids == alone.ids and len(calls) == 6


def test_generation_and_answers_run_under_bf16_autocast(models):
    """Inference with `precision: bf16` (or auto where bf16 is faster) runs under autocast."""
    model, tokenizer = models
    with torch.autocast("cpu", dtype=torch.bfloat16):
        turn = generate(model, tokenizer, [[20, 21]], steps=2, generator=torch.Generator().manual_seed(0))
        text = generate_text(model, [[20]], tokenizer=tokenizer, images=pixels(1), max_new_tokens=2)
    assert turn.images.shape[:2] == (1, 3) and torch.isfinite(turn.images).all()
    assert 1 <= len(text.ids[0]) <= 2


def test_mismatched_tokenizer_is_rejected(models):
    model, _ = models
    other = MingTok(replace(TOK, sem_width=64))
    with pytest.raises(ValueError, match="does not match"):
        generate(model, other, [[20]])


def test_aligned_image_starts_restart_with_each_document_and_carry_through_the_cache():
    S = SPECIAL_IDS[IMAGE_START]
    ids = torch.tensor([[1, S, 2, 2, 3, 1, 1, S, 2, 1, S]])  # a second document starts at index 9
    plain = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1]])
    visible = torch.ones_like(ids, dtype=torch.bool)
    pos, shift = sq.align_image_starts(ids, plain, visible, 4)
    assert pos.tolist() == [[0, 4, 5, 6, 7, 8, 9, 12, 13, 0, 4]] and shift.tolist() == [3]
    # hidden tokens neither move nor count; a call continues from the shift carried in
    visible[0, 7] = False
    pos, _ = sq.align_image_starts(ids[:, :9], plain[:, :9], visible[:, :9], 4)
    assert pos[0, 7:].tolist() == [10, 11]
    pos, shift = sq.align_image_starts(ids[:, 7:9], torch.tensor([[7, 8]]), visible[:, 7:9] | True, 4,
                                       torch.tensor([3]))  # fmt: skip
    assert pos.tolist() == [[12, 13]] and shift.tolist() == [5]
    # the model reads those positions: aligned starts are plain positions moved up
    torch.manual_seed(0)
    plain_model = UniVision(CFG).eval()
    aligned_model = UniVision(replace(CFG, image_stride=4)).eval()
    aligned_model.load_state_dict(plain_model.state_dict())
    ids = torch.tensor([[20, S, 21, 22, 23, S, 24]])
    moved, _ = sq.align_image_starts(ids, torch.arange(7)[None], torch.ones_like(ids, dtype=torch.bool), 4)
    assert moved.tolist() == [[0, 4, 5, 6, 7, 8, 9]]
    with torch.no_grad():
        torch.testing.assert_close(aligned_model(ids).hidden, plain_model(ids, position_ids_BT=moved).hidden)
        assert not torch.allclose(aligned_model(ids).hidden, plain_model(ids).hidden)


def test_a_cached_second_turn_equals_the_whole_conversation_in_one_call(models):
    """The positions the cache carries are the ones one forward over the conversation
    (as training reads it) gives: with aligned image starts, the second image's start
    sits a whole number of strides after the first's."""
    model, tokenizer = models
    first = generate(
        model, tokenizer, [[20]], guidance=False, render=False, generator=torch.Generator().manual_seed(0)
    )
    p = sq.prompt([21, 22, 23])
    with torch.no_grad():
        h, _ = prefill(model, [p], first.state, guidance=False)
        turn1 = sq.prompt([20])
        ids = torch.cat([turn1.input_ids, torch.full((N,), SPECIAL_IDS[IMAGE_PATCH]),
                         torch.tensor([SPECIAL_IDS[IMAGE_END], SPECIAL_IDS[EOS]]), p.input_ids])  # fmt: skip
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(turn1.input_ids) : len(turn1.input_ids) + N] = True
        whole = model(ids[None], first.features[0], mask[None]).hidden[0, -1]
    torch.testing.assert_close(h[0], whole, atol=1e-5, rtol=1e-5)
