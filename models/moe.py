"""Mixture-of-experts feed-forward of the unified model (Ling-lite / BailingMoE shapes).

    x_TD -> router (softmax over E, top-k, top-k weights renormalised to sum 1)
         -> token-slots sorted by expert -> GroupedExperts(x_ND, num_tokens_per_expert_E)
         -> weighted by their router score, summed back per token
         + shared experts (a dense SwiGLU, always on)

Multi-gate: image positions (image_mask) are routed by their own gate, text positions by
the text gate; both gates choose among the same experts.

Dropless routing, not a capacity factor: a capacity drops the token-slots that overflow an
expert, so a token's output would depend on which other tokens share its batch. Then the
cached (one token at a time) decoding would differ from the full forward, a packed row
from the same samples unpacked, and the layer from its dense reference. Dropless keeps
all three exact; the cost, uneven expert loads across expert-parallel ranks, is what the
load-balancing loss keeps in check.

Padding takes no expert slot. `valid_T` marks the tokens that exist (not padding of a
packed batch, not a token hidden from every query); only they are routed, counted in the
expert loads and averaged into the balance loss, so a padded batch costs the experts, the
all-to-all and the loss exactly what the same batch unpadded does. An invalid token gets
the shared experts only; nothing reads it. Being dropless, a valid token's output never
depended on the others, so this keeps the three exactness properties above.

Load-balancing loss (Switch / DeepSeek style): aux = E * sum_e f_e * P_e, with f_e the
fraction of token-slots routed to expert e (M * k slots of the M valid tokens) and P_e
the mean router probability of e over the valid tokens; each token's probabilities come
from the gate that routed it, and f and P are taken over all tokens together because the
experts' actual load (what unbalances an all-to-all) is the joint one. Perfect balance
gives 1.

Expert-parallel seam. The model stays single-device; expert parallelism is applied from
outside (pipelines/, on DeepSpeed's expert-parallel process groups) by replacing ONE
module per layer, `MoE.experts` (a `GroupedExperts`), with a module of the same call:

    experts(x_ND, num_tokens_per_expert_E) -> out_ND

where x_ND are this rank's token-slots sorted by global expert id (all rows of expert 0,
then expert 1, ...), num_tokens_per_expert_E (E,) their counts, and out_ND the experts'
outputs in the same order, not yet weighted by the router. An expert-parallel module
exchanges counts and tokens with an all-to-all over the EP group, runs its local experts
(a `GroupedExperts` holding rows [rank * E/ep, (rank+1) * E/ep) of w1_EFD, w2_EDF,
w3_EFD), and returns the outputs with the inverse all-to-all. Routing, the aux loss, the
score weighting and the shared experts stay outside the seam, so they need no change.
Parameters of the routed experts are `MoE.experts.parameters()` (see
`UniVision.expert_parameters`): those are the ones DeepSpeed must not all-reduce across
the data-parallel group. We use our own layer rather than deepspeed.moe.layer.MoE because
DeepSpeed's layer brings its own gate (no multi-gate routing by modality, a different
balancing loss), stores experts as separate modules (no grouped weights), and importing
DeepSpeed would break the rule that models/ is plain PyTorch.

Kernels: routing, the permutation into expert order and back, and the grouped expert
matmul are ops of kernels/moe.py, each a PyTorch reference (this layer's original math,
the CPU default) and a Triton path, chosen by `cfg.kernels` (auto|triton|reference).

Shape legend: T tokens (batch * sequence flattened), M valid tokens of them, D hidden, E routed
experts, k experts per token, N = M * k token-slots, F expert FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.kernels import moe as moe_ops
from uniloom.kernels import use_triton
from uniloom.kernels.moe import expert  # noqa: F401 (one expert's SwiGLU; the expert-parallel shadows call it)
from uniloom.models.univision_config import UniVisionConfig


@dataclass
class MoEStats:
    aux_loss: torch.Tensor  # () load-balancing loss of this layer
    tokens_per_expert: torch.Tensor  # (E,) token-slots routed to each expert, for logging


class FeedForward(nn.Module):
    """Dense SwiGLU: the shared experts (n shared experts of width F are one of width n * F)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):  # (..., D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """E SwiGLU experts as grouped weights: the expert-parallel seam (module docstring).
    `kernels` (auto|triton|reference): the reference's loop of per-expert matmuls, or a
    grouped GEMM (kernels/moe.py grouped_swiglu)."""

    def __init__(
        self, num_experts: int, dim: int, hidden: int, init_std: float = 0.02, kernels: str = "auto"
    ):
        super().__init__()
        self.kernels = kernels
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD):
            nn.init.normal_(w, std=init_std)

    def forward(self, x_ND, num_tokens_per_expert_E):
        """x_ND sorted by expert, counts (E,) -> out_ND in the same order."""
        backend = moe_ops.grouped_backend(use_triton(self.kernels, x_ND.device), x_ND, self.w1_EFD)
        return moe_ops.grouped_swiglu(
            x_ND, num_tokens_per_expert_E, self.w1_EFD, self.w3_EFD, self.w2_EDF, backend=backend
        )


class Router(nn.Module):
    """One gate: router logits over the E experts, in float32."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x_TD):
        return self.gate(x_TD).float()  # (T, E)


class MoE(nn.Module):
    def __init__(self, cfg: UniVisionConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.experts_per_token
        self.kernels = cfg.kernels
        self.router = Router(cfg.hidden, cfg.num_experts)
        self.image_router = Router(cfg.hidden, cfg.num_experts) if cfg.multi_gate else None
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden, cfg.expert_ffn, cfg.init_std, cfg.kernels)
        self.shared = (
            FeedForward(cfg.hidden, cfg.expert_ffn * cfg.num_shared_experts)
            if cfg.num_shared_experts
            else None
        )

    def router_logits(self, x_TD, image_mask_T=None):
        """Router logits (T, E) from each token's gate. Selecting logits, then one softmax,
        gives each row exactly the probabilities of softmax-per-gate, then selecting."""
        logits_TE = self.router(x_TD)
        if self.image_router is not None and image_mask_T is not None:
            logits_TE = torch.where(image_mask_T[:, None], self.image_router(x_TD), logits_TE)
        return logits_TE

    def forward(self, x_BTD, image_mask_BT=None, valid_BT=None):
        """x (B, T, D), image positions and valid (non-padding) tokens (B, T) bool -> (B, T, D)."""
        B, T, D = x_BTD.shape
        triton = use_triton(self.kernels, x_BTD.device)
        x_TD = x_BTD.reshape(B * T, D)
        image_mask_T = None if image_mask_BT is None else image_mask_BT.reshape(B * T)
        token_M = None if valid_BT is None else valid_BT.reshape(B * T).nonzero()[:, 0]
        x_MD = x_TD if token_M is None else x_TD[token_M]
        image_mask_M = image_mask_T if token_M is None or image_mask_T is None else image_mask_T[token_M]
        # Softmax over E (fp32), top-k, scores renormalised to sum 1, loads per expert.
        probs_ME, top_scores_MK, selected_MK, num_tokens_per_expert_E = moe_ops.route(
            self.router_logits(x_MD, image_mask_M), self.top_k, triton=triton
        )
        # Sort the M * k token-slots by expert so each expert reads one contiguous block.
        slots = moe_ops.sort_slots(selected_MK, self.num_experts, token_M, triton=triton)
        out_ND = self.experts(moe_ops.permute(x_TD, slots, triton=triton), num_tokens_per_expert_E)
        out_TD = moe_ops.unpermute(out_ND, top_scores_MK, slots, B * T, triton=triton)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)

        # Sums over max(M, 1): a batch of padding alone (a rank's empty step) gives 0, not NaN.
        M = max(probs_ME.shape[0], 1)
        f_E = num_tokens_per_expert_E.float() / (M * self.top_k)
        aux_loss = self.num_experts * (f_E * probs_ME.sum(0) / M).sum()
        return out_TD.view(B, T, D), MoEStats(aux_loss, num_tokens_per_expert_E.detach())
