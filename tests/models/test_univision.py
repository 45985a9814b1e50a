"""The unified model: sequence formats, packing equal to separate forwards, cached decoding
equal to the full forward (text and image positions), the causal shift of the flow target,
tiny forward + backward, the paper preset's parameter counts, and a 200-step overfit of 8
rendered scenes that drives both the text and the flow loss down."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from uniloom.models import sequence as sq
from uniloom.models.mingtok import MingTok
from uniloom.models.special_tokens import SPECIAL_IDS, SPECIAL_TOKENS
from uniloom.models.univision import UniVision, UniVisionConfig
from uniloom.pipelines.config import load_config
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import sample_scene, scene_objects

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S = SPECIAL_IDS
SMALL = UniVisionConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        rope_theta=100.0, init_std=0.1, num_experts=4, experts_per_token=2, expert_ffn=24,
                        num_shared_experts=1, semantic_dim=12, latent_dim=6, flow_width=16, flow_depth=2,
                        flow_mlp_mult=2.0)  # fmt: skip


def latents(n=4, c=6, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def features_for(batch, seed=1):
    return torch.randn(
        batch.image_latents.shape[0], SMALL.semantic_dim, generator=torch.Generator().manual_seed(seed)
    )


def test_text_to_image_and_understanding_formats():
    z = latents(3)
    s = sq.text_to_image([20, 21], z)
    P, E = S["<|image_patch|>"], -100
    assert s.input_ids.tolist() == [S["<|human|>"], 20, 21, S["<|assistant|>"], S["<|image_start|>"], P, P, P,
                                    S["<|image_end|>"], S["<|eos|>"]]  # fmt: skip
    # Targets are per position: <assistant> predicts <image_start>, the last slot <image_end>.
    expected = [E, E, E, S["<|image_start|>"], E, E, E, S["<|image_end|>"], S["<|eos|>"], E]
    assert s.text_targets.tolist() == expected
    assert s.image_mask.tolist() == [False] * 5 + [True] * 3 + [False] * 2
    assert torch.equal(s.image_targets, s.image_mask) and torch.equal(s.image_latents, z)

    u = sq.understanding(z, [30], [40, 41])
    assert u.input_ids.tolist()[:6] == [S["<|human|>"], S["<|image_start|>"], P, P, P, S["<|image_end|>"]]
    assert u.text_targets.tolist()[-4:] == [40, 41, S["<|eos|>"], E] and not u.image_targets.any()

    # Guidance dropout: the sequences the text-unconditional / unconditional branches see.
    dropped = sq.text_to_image([20, 21], z, drop="text").input_ids.tolist()
    assert dropped[:2] == [S["<|human|>"], S["<|assistant|>"]]
    assert sq.text_to_image([20, 21], z, drop="turn").input_ids[0] == S["<|assistant|>"]


def test_editing_and_text_formats():
    src, t1, t2 = latents(2, seed=0), latents(2, seed=1), latents(2, seed=2)
    s = sq.editing(src, [([20], t1), ([21, 22], t2)])
    assert s.image_mask.sum() == 6 and s.image_targets.sum() == 4
    assert torch.equal(s.image_latents, torch.cat([src, t1, t2]))
    assert not s.image_targets[s.image_mask][:2].any()  # the source is context, not a target
    # Dropping the last instruction's turn keeps the first round intact.
    d = sq.editing(src, [([20], t1), ([21, 22], t2)], drop="turn")
    assert len(d) == len(s) - 3 and d.image_mask.sum() == 6
    t = sq.text_only([20, 21, 22])
    assert t.text_targets.tolist() == [21, 22, S["<|eos|>"], -100]
    c = sq.text_only([23], prompt_ids=[20])
    assert c.input_ids.tolist() == [S["<|human|>"], 20, S["<|assistant|>"], 23, S["<|eos|>"]]


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return UniVision(replace(SMALL, **kw)).eval()


def mixed_samples():
    return [
        sq.text_to_image([20, 21, 22], latents(4, seed=1)),
        sq.understanding(latents(4, seed=2), [23], [24, 25]),
        sq.text_only([26, 27, 28, 29]),
        sq.editing(latents(4, seed=3), [([30], latents(4, seed=4))]),
    ]


def test_packed_row_equals_separate_forwards():
    model = small_model()
    samples = mixed_samples()
    packed, separate = sq.pack(samples, 64), sq.collate(samples)
    assert packed.input_ids.shape == (1, 64) and separate.input_ids.shape[0] == 4
    feats = features_for(packed)
    with torch.no_grad():
        hp = model(packed.input_ids, feats, packed.image_mask, position_ids_BT=packed.position_ids,
                   doc_ids_BT=packed.doc_ids).hidden  # fmt: skip
        hs = model(separate.input_ids, feats, separate.image_mask, position_ids_BT=separate.position_ids,
                   doc_ids_BT=separate.doc_ids).hidden  # fmt: skip
    torch.testing.assert_close(hp[packed.doc_ids >= 0], hs[separate.doc_ids >= 0], atol=1e-5, rtol=1e-5)
    torch.manual_seed(3)
    lp = model.loss(packed, feats)
    torch.manual_seed(3)
    ls = model.loss(separate, feats)
    torch.testing.assert_close(lp.total, ls.total, atol=1e-5, rtol=1e-5)
    # Padding routes nowhere: the same samples with 64 more padding tokens load the
    # experts and the balance loss exactly as before.
    padded = sq.pack(samples, 128)
    torch.manual_seed(3)
    lpad = model.loss(padded, feats)
    for other in (ls, lpad):
        torch.testing.assert_close(other.aux, lp.aux, atol=1e-6, rtol=1e-6)
        assert torch.equal(other.expert_load, lp.expert_load)
    assert set(lp.per_task) == {"understanding/text", "text_to_image/text", "text/text", "editing/text",
                                "text_to_image/flow", "editing/flow"}  # fmt: skip


def test_cached_decoding_equals_full_forward():
    model = small_model()
    s = sq.editing(latents(4, seed=3), [([30, 31], latents(4, seed=4))])
    b = sq.collate([s])
    feats = features_for(b)
    with torch.no_grad():
        full = model(b.input_ids, feats, b.image_mask).hidden[0]  # (T, H)
        cache = model.new_cache()
        steps, start, used = [], 0, 0
        for stop in [5] + list(range(6, len(s) + 1)):  # a prefill of 5, then one token at a time
            mask = b.image_mask[:, start:stop]
            n = int(mask.sum())
            steps.append(
                model(b.input_ids[:, start:stop], feats[used : used + n], mask, cache=cache).hidden[0]
            )
            start, used = stop, used + n
    cached = torch.cat(steps)
    assert b.image_mask[0, 5:].any() and (~b.image_mask[0, 5:]).any()  # both kinds decoded one at a time
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.flow_condition(cached), model.flow_condition(full), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.logits(cached), model.logits(full), atol=1e-5, rtol=1e-5)


def test_latent_of_a_slot_is_predicted_from_the_position_before():
    """The flow loss of slot j depends on the features of slots < j, never on slot j's own."""
    model = small_model()
    with torch.no_grad():  # move the flow head off its zero initialisation, which ignores the condition
        for p in model.flow_head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b = sq.collate([sq.text_to_image([20], latents(4, seed=1))])
    feats = features_for(b).requires_grad_()
    b.image_targets[:] = False
    slots = b.image_mask[0].nonzero()[:, 0]
    b.image_targets[0, slots[2]] = True  # only the third latent is a target
    model.loss(b, feats).flow.backward()
    grad = feats.grad.abs().sum(-1)
    assert grad[0] > 0 and grad[1] > 0 and grad[2] == 0 and grad[3] == 0


def test_tiny_preset_forward_backward():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = UniVision(cfg.model)
    C = cfg.model.latent_dim
    samples = [
        sq.text_to_image([20, 21, 22], torch.randn(16, C)),
        sq.understanding(torch.randn(16, C), [23], [24, 25]),
        sq.text_only([26, 27, 28, 29]),
        sq.editing(torch.randn(16, C), [([30], torch.randn(16, C))]),
    ]
    batch = sq.pack(samples, 128)
    losses = model.loss(batch, torch.randn(batch.image_latents.shape[0], cfg.model.semantic_dim))
    losses.total.backward()
    assert torch.isfinite(losses.total) and losses.text > 0 and losses.flow > 0 and losses.aux > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert losses.expert_load.shape == (cfg.model.num_layers, cfg.model.num_experts)
    # padding (doc id -1) takes no expert slot
    tokens = int((batch.doc_ids >= 0).sum())
    assert tokens < batch.input_ids.numel()
    assert (losses.expert_load.sum(-1) == tokens * cfg.model.experts_per_token).all()


def test_paper_preset_parameter_counts(report):
    cfg = load_config("paper")
    with torch.device("meta"):
        model = UniVision(cfg.model)
    counts = model.parameter_counts()
    total, active = counts["backbone_total"], counts["backbone_active"]
    report(
        f"paper preset: backbone {total / 1e9:.3f}B total, {active / 1e9:.3f}B active per token "
        f"(embeddings + LM head included, as Ling-lite's 16.8B / 2.75B); vision parts "
        f"(projector, vis_head, flow head) {counts['vision_total'] / 1e9:.3f}B more, "
        f"{counts['total'] / 1e9:.3f}B in all"
    )
    assert abs(total / 16.8e9 - 1) < 0.05
    assert abs(active / 2.75e9 - 1) < 0.05


def rendered_scenes(n: int, size: int) -> tuple[list[str], torch.Tensor]:
    scenes = [sample_scene(0, i) for i in range(n)]
    images = [np.array(render(scene_objects(s["objects"]), size)) for s in scenes]
    pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return [s["caption"] for s in scenes], pixels


def test_overfit_eight_scenes(report):
    """Eight rendered scenes, each as text-to-image and as captioning (word-id captions),
    through a randomly initialised MingTok at 32 px (16 latents per image, calibrated to
    unit scale as an exported MingTok is). 200 AdamW steps of a reduced tiny model."""
    torch.manual_seed(0)
    tok_cfg = replace(load_config("tiny").mingtok, image_size=32)
    tokenizer = MingTok(tok_cfg).eval()
    captions, pixels = rendered_scenes(8, tok_cfg.image_size)
    with torch.no_grad():
        raw = tokenizer.denormalize(tokenizer.encode(pixels))
        tokenizer.latent_shift.fill_(raw.mean())
        tokenizer.latent_scale.fill_(raw.std())
        z = tokenizer.encode(pixels)  # (8, 16, 32)
    words = sorted({w for c in captions for w in c.split()})
    ids = [[len(SPECIAL_TOKENS) + words.index(w) for w in c.split()] for c in captions]
    samples = [sq.text_to_image(i, zi) for i, zi in zip(ids, z)] + [
        sq.understanding(zi, [], i) for i, zi in zip(ids, z)
    ]
    batch = sq.pack(samples, sum(len(s) for s in samples))
    with torch.no_grad():
        feats = tokenizer.slot_features(batch.image_latents)

    # The tiny architecture with a half-width, half-depth backbone keeps 200 steps near 20 s
    # of one CPU core. The flow loss falls only as far as the head pins x0 down (its target
    # (x_t - x0) / t magnifies any error at small t), so the head keeps its capacity (4
    # blocks) and gets more weight and more (t, noise) draws per token than training uses;
    # over seeds 0-2 this reaches 14.5-15x in 200 steps.
    cfg = replace(load_config("tiny").model, vocab_size=len(SPECIAL_TOKENS) + len(words), hidden=64,
                  num_layers=2, head_dim=16, expert_ffn=64, semantic_dim=tok_cfg.semantic_dim, flow_width=96,
                  flow_depth=4, flow_batch_mul=16, flow_loss_weight=4.0)  # fmt: skip
    model = UniVision(cfg)

    def evaluate():  # fixed draws of (t, noise), many per token, so before and after compare
        torch.manual_seed(123)
        with torch.no_grad():
            losses = model.loss(batch, feats)
        return losses.text.item(), losses.flow.item()

    text0, flow0 = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=200, pct_start=0.1)
    start = time.process_time()
    for _ in range(200):
        loss = model.loss(batch, feats).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    cpu = time.process_time() - start
    text1, flow1 = evaluate()
    report(
        f"overfit 8 scenes x 2 tasks ({batch.input_ids.shape[1]} tokens), 200 steps, {cpu:.0f} s CPU: "
        f"text CE {text0:.3f} -> {text1:.4f} ({text0 / text1:.0f}x), flow MSE {flow0:.3f} -> {flow1:.3f} "
        f"({flow0 / flow1:.1f}x)"
    )
    assert text0 / text1 >= 10 and flow0 / flow1 >= 10
