"""The unified model with each visual tokenizer kind (UniVisionConfig.image_kind): MingTok
unchanged (its forward and loss against a written-out derivation, its parameter names),
UniTok's code embedding and depth head, TUNA's blocks through the backbone with each image
bidirectional within itself, cached decoding equal to the full forward for every kind,
and the losses falling over a few steps of a tiny model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from uniloom.models import sequence as sq
from uniloom.models.blocks import attention_mask, rope_angles
from uniloom.models.special_tokens import SPECIAL_IDS
from uniloom.models.tuna import Tuna, TunaConfig
from uniloom.models.univision import UniVision, UniVisionConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = UniVisionConfig(vocab_size=48, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      rope_theta=100.0, init_std=0.1, num_experts=4, experts_per_token=2, expert_ffn=24,
                      num_shared_experts=1, semantic_dim=12, latent_dim=6, flow_width=16, flow_depth=2,
                      flow_mlp_mult=2.0, num_codebooks=8, codebook_size=16, depth_width=16, depth_layers=1,
                      depth_heads=2)  # fmt: skip
# 16 px -> a 4 x 4 x 4 latent grid -> 2 x 2 = 4 tokens of 2 * 2 * 4 = 16 values
TUNA = TunaConfig(image_size=16, vae_patch_size=4, latent_channels=4, vae_width=32, vae_depth=1, vae_heads=2,
                  rep_patch_size=2, rep_width=32, rep_depth=1, rep_heads=2, llm_width=32, head_depth=1,
                  head_heads=2)  # fmt: skip
ROW = {"mingtok": CFG.latent_dim, "unitok": CFG.num_codebooks, "tuna": 16}  # a slot's row of image_latents
N = 4  # slots per image


def build(kind: str, seed: int = 0):
    """(model, TUNA cascade or None) of `kind`."""
    torch.manual_seed(seed)
    weights = {"text_loss_weight": 0.2} if kind == "tuna" else {}
    model = UniVision(replace(CFG, image_kind=kind, **weights))
    return model, (Tuna(TUNA) if kind == "tuna" else None)


def image(kind: str, seed: int):
    """One image's slot rows (N, row): MingTok latents, UniTok codes or TUNA latent tokens."""
    g = torch.Generator().manual_seed(seed)
    if kind == "unitok":
        return torch.randint(CFG.codebook_size, (N, CFG.num_codebooks), generator=g)
    return torch.randn(N, ROW[kind], generator=g)


def samples(kind: str):
    return [
        sq.text_to_image([20, 21, 22], image(kind, 1)),
        sq.understanding(image(kind, 2), [23], [24, 25]),
        sq.text_only([26, 27, 28, 29]),
        sq.editing(image(kind, 3), [([30], image(kind, 4))]),
    ]


def features(batch, seed: int = 1):  # MingTok semantic features of the batch's slots
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch.image_latents.shape[0], CFG.semantic_dim, generator=g)


def inputs(kind: str, model, tuna, batch):
    """The forward's image input rows for `batch` (clean images, for TUNA at t = 1)."""
    if kind == "mingtok":
        return features(batch)
    if kind == "unitok":
        return batch.image_latents
    latents = tuna.latents_from_tokens(batch.image_latents.view(-1, N, ROW["tuna"]), (4, 4))
    return tuna.image_tokens(latents, torch.ones(latents.shape[0])).flatten(0, 1)


def loss(kind, model, tuna, batch, seed: int = 3):
    torch.manual_seed(seed)
    if kind == "mingtok":
        return model.loss(batch, features(batch))
    return model.loss(batch, tuna=tuna, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- MingTok unchanged


def test_mingtok_forward_and_loss_equal_their_written_out_derivation():
    """The MingTok path computes what it computed before the kinds: the embeddings with
    projected features in the slots, the blocks under a causal document mask, and text CE
    (per-turn means) + flow MSE of each slot's latent from the hidden state before it +
    the balance loss. The parameter names, which checkpoints and exports address, are the
    same modules in the same order."""
    model, _ = build("mingtok")
    with torch.no_grad():  # a flow head off its zero initialisation
        for p in model.flow_head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    prefixes = list(dict.fromkeys(name.split(".")[0] for name in model.state_dict()))
    assert prefixes == ["embed", "projector", "layers", "norm", "lm_head", "vis_head", "flow_head"]

    b = sq.pack(samples("mingtok"), 64)
    feats = features(b)
    with torch.no_grad():
        x = model.embed(b.input_ids)
        x[b.image_mask] = model.projector(feats)
        T = b.input_ids.shape[1]
        mask = attention_mask(torch.ones(1, T, dtype=torch.bool), T, b.doc_ids)
        cos, sin = rope_angles(b.position_ids, CFG.head_dim, CFG.rope_theta)
        aux = []
        for i, layer in enumerate(model.layers):
            x, stats = layer(x, cos, sin, mask, b.image_mask, None, i, b.doc_ids >= 0)
            aux.append(stats.aux_loss)
        hidden = model.norm(x)
        out = model(b.input_ids, feats, b.image_mask, position_ids_BT=b.position_ids, doc_ids_BT=b.doc_ids)
        torch.testing.assert_close(out.hidden, hidden, rtol=0, atol=0)

        # text: each assistant turn's mean CE, then the mean over turns
        sel = b.text_targets != -100
        ce = F.cross_entropy(model.lm_head(hidden[sel]), b.text_targets[sel], reduction="none")
        turns = sq.turn_ids(b)[sel]
        text = torch.stack([ce[turns == t].mean() for t in turns.unique()]).mean()
        # flow: slot j's latent from the hidden state at j - 1
        before = torch.zeros_like(b.image_targets)
        before[:, :-1] = b.image_targets[:, 1:]
        torch.manual_seed(3)
        flow = model.flow_head.loss(
            b.image_latents[b.image_targets[b.image_mask]], model.vis_head(hidden[before]), CFG.flow_batch_mul
        ).mean()
        total = text + flow + CFG.aux_loss_weight * torch.stack(aux).mean()
        losses = loss("mingtok", model, None, b)
    torch.testing.assert_close(losses.text, text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.flow, flow, rtol=0, atol=0)
    torch.testing.assert_close(losses.total, total, rtol=1e-5, atol=1e-6)
    assert losses.code == 0


# ---------------------------------------------------------------------------- shapes


def test_config_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="image_kind must be one of mingtok, unitok, tuna"):
        replace(CFG, image_kind="vqgan")


def test_each_kind_owns_only_its_modules():
    parts = {kind: set(build(kind)[0].vision_modules()) for kind in ("mingtok", "unitok", "tuna")}
    assert parts == {"mingtok": {"projector", "vis_head", "flow_head"}, "unitok": {"code_embed", "depth_head"},
                     "tuna": set()}  # fmt: skip
    for kind in ("unitok", "tuna"):
        model = build(kind)[0]
        assert not any(hasattr(model, name) for name in ("projector", "vis_head", "flow_head"))
        counts = model.parameter_counts()
        assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_unitok_shapes_and_integer_codes_through_packing():
    model, _ = build("unitok")
    b = sq.pack(samples("unitok"), 64)
    assert b.image_latents.dtype == torch.long and b.image_latents.shape == (4 * N, CFG.num_codebooks)
    out = model(
        b.input_ids, b.image_latents, b.image_mask, position_ids_BT=b.position_ids, doc_ids_BT=b.doc_ids
    )
    assert out.hidden.shape == (1, 64, CFG.hidden)
    codes, h = model.shifted_targets(b, out.hidden)
    assert codes.shape == (2 * N, CFG.num_codebooks) and h.shape == (2 * N, CFG.hidden)
    assert model.depth_head.logits(h, codes).shape == (2 * N, CFG.num_codebooks, CFG.codebook_size)
    assert model.code_embed(codes).shape == (2 * N, CFG.hidden)
    with pytest.raises(ValueError, match="UniTok codes must be integers"):
        model(b.input_ids, b.image_latents.float(), b.image_mask)


def test_unitok_depth_head_predicts_each_code_from_the_earlier_ones():
    """Depth k's logits depend on the hidden state and codes < k only, and drawing one
    depth at a time with the cache gives the teacher-forced logits."""
    head = build("unitok")[0].depth_head.eval()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, CFG.hidden, generator=g)
    codes = torch.randint(CFG.codebook_size, (3, CFG.num_codebooks), generator=g)
    with torch.no_grad():
        full = head.logits(h, codes)  # (3, K, V)
        changed = codes.clone()
        changed[:, 3] = (changed[:, 3] + 1) % CFG.codebook_size
        other = head.logits(h, changed)
        torch.testing.assert_close(other[:, :4], full[:, :4], rtol=0, atol=0)
        assert not torch.allclose(other[:, 4], full[:, 4])
        cache = head.new_cache()
        steps = [head.first(h, cache)] + [
            head.next(codes[:, k - 1], k, cache) for k in range(1, CFG.num_codebooks)
        ]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_tuna_tokens_round_trip_and_block_positions():
    model, tuna = build("tuna")
    latents = torch.randn(3, 4, 4, 4)
    tokens = tuna.tokens_from_latents(latents)
    assert tokens.shape == (3, N, 16)
    assert torch.equal(tuna.latents_from_tokens(tokens, (4, 4)), latents)
    b = sq.pack(samples("tuna"), 64)
    block, image_ids = model.image_positions(b.input_ids, b.image_mask)
    starts = block & ~b.image_mask
    assert (b.input_ids[starts] == SPECIAL_IDS["<|image_start|>"]).all() and int(starts.sum()) == 4
    assert image_ids[block].unique().tolist() == [0, 1, 2, 3] and (image_ids[~block] == -1).all()
    out = model(b.input_ids, inputs("tuna", model, tuna, b), b.image_mask, position_ids_BT=b.position_ids,
                doc_ids_BT=b.doc_ids)  # fmt: skip
    assert out.hidden.shape == (1, 64, CFG.hidden)
    with pytest.raises(ValueError, match="20 image positions but 16 image input rows"):
        model(b.input_ids, torch.zeros(16, CFG.hidden), b.image_mask)
    with pytest.raises(ValueError, match="needs the TUNA tokenizer"):
        model.loss(b)


# ---------------------------------------------------------------------------- attention


def test_tuna_image_is_bidirectional_within_itself_and_text_causal():
    """Changing an image's last token changes the hidden states of its earlier tokens
    (and of the text after it), never those of the text before it or of an earlier image;
    with MingTok the same change reaches only later positions."""
    b = sq.collate([sq.editing(image("tuna", 3), [([30, 31], image("tuna", 4))])])
    first, second = b.image_mask[0].nonzero()[:, 0].view(2, N)
    for kind in ("tuna", "mingtok"):
        model, tuna = build(kind)
        rows = inputs(kind, model, tuna, b)
        changed = rows.clone()
        last = (2 + 2 * N - 1) if kind == "tuna" else (2 * N - 1)  # the second image's last row
        changed[last] += 1.0
        with torch.no_grad():
            h0 = model(b.input_ids, rows, b.image_mask).hidden[0]
            h1 = model(b.input_ids, changed, b.image_mask).hidden[0]
        moved = (h1 - h0).abs().amax(-1) > 1e-6  # (T,)
        assert not moved[: second[0] - 1].any()  # the text and image before it
        assert moved[second[-1] + 1 :].all()  # the text after it
        earlier_slots = moved[second[:-1]]
        assert earlier_slots.all() if kind == "tuna" else not earlier_slots.any()
        assert moved[second[0] - 1] == (kind == "tuna")  # the <image_start> with TUNA's time token
    assert first[-1] < second[0]


# ---------------------------------------------------------------------------- cached == full


@pytest.mark.parametrize("kind", ["unitok", "tuna"])
def test_cached_decoding_equals_full_forward(kind):
    """A prefill, then text one token at a time, an image per call (TUNA's blocks are whole;
    UniTok's slots one at a time too): the hidden states of the full forward."""
    model, tuna = build(kind)
    model.eval()
    b = sq.collate([sq.editing(image(kind, 3), [([30, 31], image(kind, 4))])])
    rows = inputs(kind, model, tuna, b)
    T = b.input_ids.shape[1]
    cuts = set(range(5, T + 1))  # a prefill of 5, then call by call
    if kind == "tuna":
        for slot in b.image_mask[0].nonzero()[:, 0].tolist()[::N]:  # no cut inside [start, N slots]
            cuts -= set(range(slot, slot + N))
    stops = sorted(cuts)
    with torch.no_grad():
        full = model(b.input_ids, rows, b.image_mask).hidden[0]
        cache, steps, start, used = model.new_cache(), [], 0, 0
        for stop in stops:
            ids, mask = b.input_ids[:, start:stop], b.image_mask[:, start:stop]
            n = int(model.image_positions(ids, mask)[0].sum())
            steps.append(model(ids, rows[used : used + n], mask, cache=cache).hidden[0])
            start, used = stop, used + n
    assert start == T and used == rows.shape[0]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["mingtok", "unitok", "tuna"])
def test_losses_are_finite_and_fall_over_a_few_steps(kind, report):
    """60 AdamW steps on one packed batch of the four tasks (the TUNA cascade trains with
    the model); the losses before and after are means over the same 8 noise draws."""
    model, tuna = build(kind)
    b = sq.pack(samples(kind), 64)
    params = list(model.parameters()) + (list(tuna.parameters()) if tuna is not None else [])
    opt = torch.optim.AdamW(params, lr=1e-2)

    def evaluate():
        with torch.no_grad():
            draws = [loss(kind, model, tuna, b, seed=100 + i) for i in range(8)]
        image = [(d.code if kind == "unitok" else d.flow).item() for d in draws]
        return draws[0].text.item(), sum(image) / len(image)

    text0, image0 = evaluate()
    for step in range(60):
        losses = loss(kind, model, tuna, b, seed=step)
        assert torch.isfinite(losses.total)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    text1, image1 = evaluate()
    name = "code CE" if kind == "unitok" else "flow MSE"
    report(f"{kind}: 60 steps, text CE {text0:.3f} -> {text1:.3f}, {name} {image0:.3f} -> {image1:.3f}")
    # Over build seeds 0-4 the image term fell to 0.31-0.35x (mingtok), 0.01x (unitok) and
    # 0.58-0.76x (tuna: one (t, noise) draw per image and step, a head that starts at v = 0).
    assert text1 < 0.5 * text0 and image1 < 0.85 * image0
    assert set(losses.per_task) >= {"text_to_image/text", f"editing/{'code' if kind == 'unitok' else 'flow'}"}
