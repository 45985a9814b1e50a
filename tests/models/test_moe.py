"""MoE layer: equals a dense reference that runs every expert and weights it by the router,
the load-balancing loss matches a hand computation, and the expert-parallel seam (one
module call on tokens sorted by expert) is enough to distribute the experts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.models.moe import GroupedExperts, MoE
from uniloom.models.univision_config import UniVisionConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = UniVisionConfig(hidden=16, num_experts=6, experts_per_token=2, expert_ffn=12, num_shared_experts=2,
                      init_std=0.2)  # fmt: skip


def dense_reference(moe: MoE, x_BTD, image_mask_BT):
    """Every expert on every token, weighted by the renormalised top-k router scores."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    image_T = image_mask_BT.reshape(-1)
    probs_TE = torch.where(
        image_T[:, None], moe.image_router.gate(x_TD).softmax(-1), moe.router.gate(x_TD).softmax(-1)
    )
    top, idx = probs_TE.topk(moe.top_k, dim=-1)
    weights_TE = torch.zeros_like(probs_TE).scatter(1, idx, top / top.sum(-1, keepdim=True))
    w = moe.experts
    out = torch.zeros_like(x_TD)
    for e in range(moe.num_experts):
        expert = (F.silu(x_TD @ w.w1_EFD[e].T) * (x_TD @ w.w3_EFD[e].T)) @ w.w2_EDF[e].T
        out = out + weights_TE[:, e : e + 1] * expert
    return (out + moe.shared(x_TD)).view_as(x_BTD)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_equals_dense_reference(top_k):
    torch.manual_seed(0)
    moe = MoE(replace(CFG, experts_per_token=top_k))
    x = torch.randn(3, 7, CFG.hidden)
    image_mask = torch.rand(3, 7) < 0.5
    out, stats = moe(x, image_mask)
    torch.testing.assert_close(out, dense_reference(moe, x, image_mask), atol=1e-5, rtol=1e-5)
    assert stats.tokens_per_expert.sum() == 3 * 7 * top_k
    # Gradients flow to the routers (through the top-k scores) and to the experts.
    out.square().sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0 and moe.image_router.gate.weight.grad.abs().sum() > 0
    assert moe.experts.w1_EFD.grad.abs().sum() > 0


def test_image_positions_use_their_own_gate():
    torch.manual_seed(0)
    moe = MoE(CFG)
    x = torch.randn(1, 8, CFG.hidden)
    image_mask = torch.tensor([[False, True, True, False, True, False, False, True]])
    before, _ = moe(x, image_mask)
    with torch.no_grad():
        moe.image_router.gate.weight.normal_()
    after, _ = moe(x, image_mask)
    changed = (after - before).abs().amax(-1)[0] > 1e-6  # (T,)
    assert not changed[~image_mask[0]].any()
    assert changed[image_mask[0]].all()


def test_aux_loss_matches_hand_computation():
    """E = 2, k = 1, gate = identity, so the logits are the inputs themselves."""
    cfg = UniVisionConfig(hidden=2, num_experts=2, experts_per_token=1, expert_ffn=4, num_shared_experts=0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.gate.weight.copy_(torch.eye(2))
        moe.image_router.gate.weight.copy_(torch.eye(2).flip(0))  # the image gate swaps the experts
    ln3 = math.log(3.0)
    # Text tokens with logits (ln 3, 0): p = (3/4, 1/4), both pick expert 0:
    # f = (1, 0), P = (3/4, 1/4), aux = E * sum f P = 2 * 3/4 = 1.5.
    x = torch.tensor([[[ln3, 0.0], [ln3, 0.0]]])
    _, stats = moe(x, torch.zeros(1, 2, dtype=torch.bool))
    assert stats.aux_loss.item() == pytest.approx(1.5, abs=1e-6)
    assert stats.tokens_per_expert.tolist() == [2, 0]
    # The second token is an image position: its gate reads (0, ln 3), so p = (1/4, 3/4) and it
    # picks expert 1: f = (1/2, 1/2), P = (1/2, 1/2), aux = 2 * (1/4 + 1/4) = 1, the balanced value.
    _, stats = moe(x, torch.tensor([[False, True]]))
    assert stats.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert stats.tokens_per_expert.tolist() == [1, 1]


def test_padding_takes_no_expert_slot():
    """The same tokens with and without padding: same outputs, aux loss and loads."""
    torch.manual_seed(0)
    moe = MoE(CFG)
    x, image_mask = torch.randn(2, 5, CFG.hidden), torch.rand(2, 5) < 0.4
    ref, ref_stats = moe(x, image_mask)
    padded = torch.cat([x, 10 * torch.randn(2, 3, CFG.hidden)], 1)  # loud padding: it would tip the loads
    padded_image = torch.cat([image_mask, torch.ones(2, 3, dtype=torch.bool)], 1)
    valid = torch.arange(8).expand(2, 8) < 5
    out, stats = moe(padded, padded_image, valid)
    torch.testing.assert_close(out[:, :5], ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.aux_loss, ref_stats.aux_loss)
    assert torch.equal(stats.tokens_per_expert, ref_stats.tokens_per_expert)
    assert stats.tokens_per_expert.sum() == 2 * 5 * CFG.experts_per_token
    torch.testing.assert_close(out[:, 5:], moe.shared(padded[:, 5:]))  # shared experts only
    unmasked = moe(padded, padded_image)[1]
    assert unmasked.tokens_per_expert.sum() == 2 * 8 * CFG.experts_per_token
    # All padding (a rank's empty step): no slots, a zero loss rather than NaN.
    _, empty = moe(padded, padded_image, torch.zeros(2, 8, dtype=torch.bool))
    assert empty.tokens_per_expert.sum() == 0 and empty.aux_loss.item() == 0.0


class TwoRankExperts(nn.Module):
    """What an expert-parallel wrapper does at the seam, with two simulated ranks: each
    holds half the experts; tokens are dispatched by the per-expert counts and the outputs
    gathered back in order (the all-to-all of a real EP group)."""

    def __init__(self, full: GroupedExperts):
        super().__init__()
        E = full.w1_EFD.shape[0]
        self.half = E // 2
        self.ranks = nn.ModuleList()
        for rows in (slice(0, self.half), slice(self.half, E)):
            local = GroupedExperts(rows.stop - rows.start, full.w1_EFD.shape[2], full.w1_EFD.shape[1])
            with torch.no_grad():
                for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
                    getattr(local, name).copy_(getattr(full, name)[rows])
            self.ranks.append(local)

    def forward(self, x_ND, num_tokens_per_expert_E):
        first = int(num_tokens_per_expert_E[: self.half].sum())
        return torch.cat([
            self.ranks[0](x_ND[:first], num_tokens_per_expert_E[: self.half]),
            self.ranks[1](x_ND[first:], num_tokens_per_expert_E[self.half :]),
        ])  # fmt: skip


def test_expert_parallel_seam_is_one_module():
    torch.manual_seed(0)
    moe = MoE(CFG)
    x, image_mask = torch.randn(2, 9, CFG.hidden), torch.rand(2, 9) < 0.3
    reference, ref_stats = moe(x, image_mask)
    moe.experts = TwoRankExperts(moe.experts)
    out, stats = moe(x, image_mask)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.aux_loss, ref_stats.aux_loss)
