"""Generation with each visual tokenizer kind: the cached image loop equals the model's
full forward (the sampled image is what the whole sequence's hidden states sample, and
the conversation state is the whole conversation's keys and values), guidance at scales
(1, 1) is the conditional branch alone, multi-round editing continues from the cache
(sources encoded once, pixels only when asked), and text answers about images."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from uniloom.models import sequence as sq
from uniloom.models.generation import edit, generate, generate_text
from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.special_tokens import EOS, IMAGE_END, IMAGE_PATCH, IMAGE_START, SPECIAL_IDS
from uniloom.models.tuna import Tuna, TunaConfig
from uniloom.models.unitok import UniTok, UniTokConfig
from uniloom.models.univision import UniVision, UniVisionConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Every tokenizer at 16 px gives 2 x 2 = 4 image tokens.
TOKENIZERS = {
    "mingtok": (MingTok, MingTokConfig(image_size=16, patch_size=8, enc_width=32, enc_depth=1, enc_heads=2,
                                       sem_width=32, sem_depth=2, sem_heads=2, pix_width=32, pix_depth=1,
                                       pix_heads=2, pix_patch_size=4, latent_dim=8, latent_shift=0.0,
                                       latent_scale=1.0)),
    "unitok": (UniTok, UniTokConfig(image_size=16, patch_size=8, enc_width=32, enc_depth=1, enc_heads=2,
                                    dec_width=32, dec_depth=1, dec_heads=2, proj_heads=2, code_dim=32,
                                    num_codebooks=8, codebook_size=16)),
    "tuna": (Tuna, TunaConfig(image_size=16, vae_patch_size=4, latent_channels=4, vae_width=32, vae_depth=1,
                              vae_heads=2, rep_patch_size=2, rep_width=32, rep_depth=1, rep_heads=2, llm_width=32,
                              head_depth=1, head_heads=2)),
}  # fmt: skip
CFG = UniVisionConfig(vocab_size=48, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      rope_theta=100.0, init_std=0.1, num_experts=4, experts_per_token=2, expert_ffn=24,
                      num_shared_experts=1, semantic_dim=32, latent_dim=8, flow_width=16, flow_depth=2,
                      flow_mlp_mult=2.0, flow_steps=3, num_codebooks=8, codebook_size=16, depth_width=16,
                      depth_layers=1, depth_heads=2)  # fmt: skip
N = 4
KINDS = ["mingtok", "unitok", "tuna"]
S = SPECIAL_IDS


def build(kind: str, **model_cfg):
    torch.manual_seed(0)
    model = UniVision(replace(CFG, image_kind=kind, **model_cfg)).eval()
    cls, cfg = TOKENIZERS[kind]
    tokenizer = cls(cfg).eval()
    # Flow heads start at v = 0, which ignores its condition: move them off it.
    head = model.flow_head if kind == "mingtok" else tokenizer.head_out if kind == "tuna" else None
    if head is not None:
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model, tokenizer


def pixels(batch=2, seed=0):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def conversation(kind, model, tokenizer, prompts, turn):
    """The prompts and their generated image turn as one sequence: ids, image mask (B, L)
    and image input rows, as a full forward reads them."""
    B = len(prompts)
    ps = [sq.prompt(ids, 0, image=kind != "tuna") for ids in prompts]
    if kind == "tuna":
        image = [S[IMAGE_START]] + [S[IMAGE_PATCH]] * N
        rows = tokenizer.image_tokens(turn.latents, torch.ones(B)).flatten(0, 1)
    else:
        image = [S[IMAGE_PATCH]] * N
        rows = (turn.features if kind == "mingtok" else turn.latents).flatten(0, 1)
    tail = torch.tensor(image + [S[IMAGE_END], S[EOS]])
    ids = torch.stack([torch.cat([p.input_ids, tail]) for p in ps])
    return ids, ids == S[IMAGE_PATCH], rows


@pytest.mark.parametrize("stride", [0, 16], ids=["positions", "aligned_image_starts"])
@pytest.mark.parametrize("kind", KINDS)
def test_generated_image_and_state_equal_the_full_forward(kind, stride):
    model, tokenizer = build(kind, image_stride=stride)
    prompts = [[20, 21, 22], [23, 24, 25]]  # equal lengths: no padding in the full forward
    temperature = 0.0 if kind == "unitok" else 1.0  # greedy codes; flows replay their noise
    turn = generate(model, tokenizer, prompts, guidance=False, temperature=temperature, render=False,
                    generator=gen())  # fmt: skip
    ids, mask, rows = conversation(kind, model, tokenizer, prompts, turn)
    T0 = len(sq.prompt(prompts[0], 0, image=kind != "tuna").input_ids)
    with torch.no_grad():
        cache = model.new_cache()
        full = model(ids, rows, mask, cache=cache).hidden  # (B, L, H)
        # The conversation state holds the whole conversation's keys and values.
        assert torch.equal(turn.state.key_mask, cache.key_mask)
        for layer in range(CFG.num_layers):
            torch.testing.assert_close(turn.state.keys[layer], cache.keys[layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(turn.state.values[layer], cache.values[layer], atol=1e-5, rtol=1e-5)

        # The image is what the full forward's hidden states sample (same noise).
        replay = gen()
        if kind == "mingtok":  # slot i's latent from the hidden state at T0 - 1 + i
            z = [model.flow_head.sample(model.flow_condition(full[:, T0 - 1 + i]), CFG.flow_steps, 1.0, None, replay)
                 for i in range(N)]  # fmt: skip
            torch.testing.assert_close(torch.stack(z, 1), turn.latents, atol=1e-4, rtol=1e-4)
        elif kind == "unitok":  # each code the argmax given the hidden state and the earlier codes
            for i in range(N):
                logits = model.depth_head.logits(full[:, T0 - 1 + i], turn.latents[:, i])
                assert torch.equal(logits.argmax(-1), turn.latents[:, i])
        else:  # Euler over uncached forwards of [prompt, block of x at t]
            x = torch.randn(2, 4, 4, 4, generator=replay)
            times = torch.linspace(0, 1, CFG.flow_steps + 1)
            for t, t_next in zip(times[:-1], times[1:]):
                block = tokenizer.image_tokens(x, t.expand(2))
                h = model(ids[:, : T0 + 1 + N], block.flatten(0, 1), mask[:, : T0 + 1 + N]).hidden[:, T0:]
                v = tokenizer.velocity(h, t.expand(2))[:, 1:]
                x = x + (t_next - t) * tokenizer.latents_from_tokens(v, (4, 4))
            torch.testing.assert_close(x, turn.latents, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_at_unit_scales_is_the_conditional_branch(kind):
    """v_u + 1 (v_tu - v_u) + 1 (v_c - v_tu) = v_c: the three branches, guided, give the
    unguided image (with a source image in the prompt, so every branch differs)."""
    model, tokenizer = build(kind)
    kw = {"source_images": pixels(1), "render": False, "temperature": 0.0 if kind == "unitok" else 1.0}
    guided = generate(model, tokenizer, [[20, 21]], scales=(1.0, 1.0), generator=gen(), **kw)
    plain = generate(model, tokenizer, [[20, 21]], guidance=False, generator=gen(), **kw)
    if kind == "unitok":
        assert torch.equal(guided.latents, plain.latents)
    else:
        torch.testing.assert_close(guided.latents, plain.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided.state.keys[0], plain.state.keys[0], atol=1e-5, rtol=1e-5)
    # ... and the default scales give another image.
    default = generate(model, tokenizer, [[20, 21]], generator=gen(), **kw)
    assert not torch.allclose(default.latents.float(), plain.latents.float())


@pytest.mark.parametrize("kind", ["unitok", "tuna"])
def test_multi_round_edit_continues_from_the_cache(kind, count_calls):
    model, tokenizer = build(kind)
    render = "decode_codes" if kind == "unitok" else "decode"
    calls = count_calls(tokenizer, ["encode", render])

    first = edit(model, tokenizer, None, [[20, 21]], source_images=pixels(1), render=False, generator=gen(0))
    second = edit(model, tokenizer, first.state, [[22]], render=False, generator=gen(1))
    third = edit(model, tokenizer, second.state, [[23, 24]], generator=gen(2))
    assert calls == {"encode": 1, render: 1}  # pixels only for the last round, nothing re-encoded
    turn = lambda ids, n=0: len(sq.prompt(ids, n).input_ids) + N + 2  # noqa: E731 (+ slots, <image_end>, <eos>)
    assert first.state.length == turn([20, 21], N)
    assert second.state.length == first.state.length + turn([22])
    assert third.state.length == second.state.length + turn([23, 24])
    assert third.images.shape == (1, 3, 16, 16) and torch.isfinite(third.images).all()
    # The history matters: the same instruction without it yields another image.
    fresh = generate(model, tokenizer, [[22]], render=False, generator=gen(1))
    assert not torch.equal(fresh.latents, second.latents)


@pytest.mark.parametrize("kind", ["unitok", "tuna"])
def test_text_answer_about_images_matches_full_forward(kind):
    model, tokenizer = build(kind)
    out = generate_text(model, [[20, 21], [22]], tokenizer=tokenizer, images=pixels(2), max_new_tokens=5)
    with torch.no_grad():
        if kind == "unitok":
            rows = tokenizer.encode(pixels(2))  # (2, N, K)
        else:
            rows = tokenizer.image_tokens(tokenizer.encode(pixels(2)), torch.ones(2))  # (2, 1 + N, H)
        for b, prompt_ids in enumerate([[20, 21], [22]]):
            p = sq.prompt(prompt_ids, source_tokens=N, image=False)
            ids = torch.cat([p.input_ids, torch.tensor(out.ids[b])])[None]
            mask = torch.cat([p.image_mask, torch.zeros(len(out.ids[b]), dtype=torch.bool)])[None]
            logits = model.logits(model(ids, rows[b], mask).hidden[0])
            assert logits[len(p.input_ids) - 1 : -1].argmax(-1).tolist() == out.ids[b]


def test_a_tokenizer_of_another_kind_or_size_is_rejected():
    model, _ = build("unitok")
    with pytest.raises(ValueError, match="a unitok model needs a unitok tokenizer, got Tuna"):
        generate(model, build("tuna")[1], [[20]])
    cls, cfg = TOKENIZERS["unitok"]
    with pytest.raises(ValueError, match=r"UniTok \(8 x 32 codes\) does not match the model \(8 x 16\)"):
        generate(model, cls(replace(cfg, codebook_size=32)), [[20]])
    tuna_model, tuna = build("tuna")
    with pytest.raises(ValueError, match="does not match the model"):
        generate_text(tuna_model, [[20]], tokenizer=Tuna(replace(tuna.cfg, llm_width=64)), images=pixels(1))


@pytest.mark.parametrize("kind", ["unitok", "tuna"])
def test_generation_and_answers_run_under_bf16_autocast(kind):
    """Inference with `precision: bf16` runs under autocast: the depth head's and the
    cascade's mixed dtypes meet the backbone's."""
    model, tokenizer = build(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = edit(model, tokenizer, None, [[20, 21]], source_images=pixels(1), steps=2, generator=gen())
        second = edit(model, tokenizer, first.state, [[22]], steps=2, generator=gen())
        text = generate_text(model, [[20]], tokenizer=tokenizer, images=pixels(1), max_new_tokens=2)
    assert second.images.shape == (1, 3, 16, 16) and torch.isfinite(second.images).all()
    assert 1 <= len(text.ids[0]) <= 2
