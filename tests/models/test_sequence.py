"""Multi-turn VQA in the sequence format, and the text loss averaged per assistant turn, so
that one-word answers are not drowned by the tokens of long captions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniloom.models import sequence as sq
from uniloom.models.special_tokens import SPECIAL_IDS
from uniloom.models.univision import UniVision, UniVisionConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S, E = SPECIAL_IDS, sq.IGNORE
TINY = UniVisionConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       rope_theta=100.0, init_std=0.1, num_experts=4, experts_per_token=2, expert_ffn=24,
                       num_shared_experts=1, semantic_dim=12, latent_dim=6, flow_width=16, flow_depth=2,
                       flow_mlp_mult=2.0)  # fmt: skip


def latents(n=3, seed=0):
    return torch.randn(n, TINY.latent_dim, generator=torch.Generator().manual_seed(seed))


def test_a_conversation_shows_the_image_once_and_targets_every_answer():
    z = latents()
    s = sq.conversation(z, [([20], [30]), ([21, 22], [31, 32])])
    P, H, A, EOS = S["<|image_patch|>"], S["<|human|>"], S["<|assistant|>"], S["<|eos|>"]
    assert s.input_ids.tolist() == [H, S["<|image_start|>"], P, P, P, S["<|image_end|>"], 20, A, 30, EOS,
                                    H, 21, 22, A, 31, 32, EOS]  # fmt: skip
    assert s.text_targets.tolist() == [E] * 7 + [30, EOS, E, E, E, E, 31, 32, EOS, E]
    assert s.task == "understanding" and torch.equal(s.image_latents, z) and not s.image_targets.any()
    one = sq.understanding(z, [20], [30])
    assert torch.equal(one.input_ids, s.input_ids[:10]) and torch.equal(one.text_targets, s.text_targets[:10])
    with pytest.raises(ValueError, match="at least one"):
        sq.conversation(z, [])


def samples():
    return [
        sq.understanding(latents(seed=1), [], list(range(20, 32))),  # a 12-token caption
        sq.conversation(latents(seed=2), [([40], [50]), ([41], [51]), ([42], [52])]),
        sq.text_to_image([20, 21], latents(seed=3)),
        sq.text_only([23, 24, 25]),
    ]


def target_turns(batch):
    """Text targets grouped by turn id, in order: [[target, ...], ...]."""
    sel = batch.text_targets != E
    ids, targets = sq.turn_ids(batch)[sel].tolist(), batch.text_targets[sel].tolist()
    groups: dict[int, list[int]] = {}
    for i, t in zip(ids, targets):
        groups.setdefault(i, []).append(t)
    return list(groups.values())


def test_turn_ids_group_each_answer_caption_image_and_document():
    EOS = S["<|eos|>"]
    expected = [
        [*range(20, 32), EOS],  # the caption
        [50, EOS], [51, EOS], [52, EOS],  # one turn per answer
        [S["<|image_start|>"], S["<|image_end|>"], EOS],  # the generated image's turn
        [24, 25, EOS],  # a plain document is one turn
    ]  # fmt: skip
    assert target_turns(sq.pack(samples(), 64)) == expected
    assert target_turns(sq.collate(samples())) == expected


def test_text_loss_is_the_mean_over_turns_of_each_turns_mean():
    torch.manual_seed(0)
    model = UniVision(TINY).eval()
    batch = sq.pack(samples(), 64)
    feats = torch.randn(batch.image_latents.shape[0], TINY.semantic_dim)
    with torch.no_grad():
        losses = model.loss(batch, feats)
        hidden = model(batch.input_ids, feats, batch.image_mask, position_ids_BT=batch.position_ids,
                       doc_ids_BT=batch.doc_ids).hidden  # fmt: skip
    sel = batch.text_targets != E
    ce = F.cross_entropy(model.logits(hidden[sel]).float(), batch.text_targets[sel], reduction="none")
    sizes = [len(turn) for turn in target_turns(batch)]  # targets come in turn order
    per_turn = torch.stack([part.mean() for part in ce.split(sizes)])
    torch.testing.assert_close(losses.text, per_turn.mean())
    # The caption's 13 targets weigh as much as each 2-target answer, not 6.5 times more.
    assert not torch.isclose(losses.text, ce.mean())
