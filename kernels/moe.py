"""MoE routing, token permutation and grouped SwiGLU experts (the layer in models/moe.py).
Each op has a PyTorch reference (the layer's own code, same ops and numbers) and a Triton
path (kernels/_triton_moe.py); the caller picks with `triton` (uniloom.kernels.use_triton).

    route          fp32 softmax over E, top-k, top-k scores renormalised to sum 1, per-expert
                   load counts; the backward reaches the logits from the gradients of the
                   probabilities (the balance loss) and of the scores
    sort_slots     the M * k token-slots in expert order, stably (torch's stable argsort)
    permute        rows of x into that order (a gather); backward: a sum per token
    unpermute      the experts' outputs weighted by their scores and summed back per token
    grouped_swiglu the E SwiGLU experts over their contiguous blocks of slots, by backend:
                   "loop" (the reference: a matmul per expert), "grouped_mm" (torch's grouped
                   GEMM, F.grouped_mm: bf16 on CUDA sm80+), "triton" (a Triton grouped GEMM)

Top-k ties: the reference is torch.topk (which of exactly equal probabilities it takes is
its own choice); the Triton kernel takes the lowest expert index among exact ties.

Numerics of the Triton path: the same math accumulated in fp32 and rounded once, where the
reference rounds each op to its dtype (bf16 under autocast); grads agree to bf16 tolerance.

Shape legend: T rows of x (padding included), M routed tokens, E experts, k experts per
token, N = M * k token-slots, D hidden, F expert FFN width, n one expert's slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("loop", "grouped_mm", "triton")


class Routing(NamedTuple):
    probs_ME: torch.Tensor  # (M, E) fp32 router probabilities
    scores_MK: torch.Tensor  # (M, k) fp32 top-k probabilities renormalised to sum 1
    selected_MK: torch.Tensor  # (M, k) int64 chosen experts, best first
    counts_E: torch.Tensor  # (E,) int64 token-slots per expert (not differentiable)


class Slots(NamedTuple):
    """Where the token-slots go: slot m * k + j is token m's j-th expert."""

    order_N: torch.Tensor  # (N,) slot at each position of the expert-sorted order
    token_N: torch.Tensor  # (N,) row of x read at each sorted position
    position_MK: torch.Tensor | None  # (M, k) each slot's sorted position (Triton path only)
    token_M: torch.Tensor | None  # (M,) row of x of each routed token; None: all rows, M = T


# ---------------------------------------------------------------------------------------
# Routing


def route_reference(logits_ME: torch.Tensor, top_k: int) -> Routing:
    probs_ME = logits_ME.float().softmax(dim=-1)
    scores_MK, selected_MK = probs_ME.topk(top_k, dim=-1)
    scores_MK = scores_MK / scores_MK.sum(-1, keepdim=True)
    counts_E = torch.bincount(selected_MK.reshape(-1), minlength=probs_ME.shape[1])
    return Routing(probs_ME, scores_MK, selected_MK, counts_E)


class RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_ME, top_k):
        from uniloom.kernels import _triton_moe

        probs_ME, scores_MK, selected_MK, counts_E = _triton_moe.route_forward(logits_ME.contiguous(), top_k)
        ctx.save_for_backward(probs_ME, scores_MK, selected_MK)
        ctx.mark_non_differentiable(selected_MK, counts_E)
        ctx.set_materialize_grads(False)
        return probs_ME, scores_MK, selected_MK, counts_E

    @staticmethod
    def backward(ctx, grad_probs_ME, grad_scores_MK, _selected, _counts):
        from uniloom.kernels import _triton_moe

        probs_ME, scores_MK, selected_MK = ctx.saved_tensors
        if grad_probs_ME is None and grad_scores_MK is None:
            return None, None
        return _triton_moe.route_backward(
            probs_ME, grad_probs_ME, scores_MK, selected_MK, grad_scores_MK
        ), None


def route(logits_ME: torch.Tensor, top_k: int, *, triton: bool) -> Routing:
    """Router logits (M, E), any float dtype (taken in fp32) -> Routing."""
    if logits_ME.dim() != 2 or not 1 <= top_k <= logits_ME.shape[1]:
        raise ValueError(f"route: logits (M, E) and 1 <= top_k <= E, got {tuple(logits_ME.shape)}, {top_k}")
    if not triton:
        return route_reference(logits_ME, top_k)
    return Routing(*RouteFunction.apply(logits_ME.float(), top_k))


# ---------------------------------------------------------------------------------------
# Permutation


def sort_slots(
    selected_MK: torch.Tensor, num_experts: int, token_M: torch.Tensor | None = None, *, triton: bool
) -> Slots:
    """The token-slots sorted by expert, stably (by slot within an expert). token_M: the rows
    of x the M routed tokens are (None: token m is row m)."""
    if not triton:
        order_N = selected_MK.reshape(-1).argsort(stable=True)
        slot_token_N = order_N // selected_MK.shape[1]  # which routed token each sorted slot belongs to
        token_N = slot_token_N if token_M is None else token_M[slot_token_N]
        return Slots(order_N, token_N, None, token_M)
    from uniloom.kernels import _triton_moe

    token_M = None if token_M is None else token_M.contiguous()
    order_N, token_N, position_MK = _triton_moe.sort_slots(selected_MK.contiguous(), num_experts, token_M)
    return Slots(order_N, token_N, position_MK, token_M)


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_M, position_MK):
        from uniloom.kernels import _triton_moe

        ctx.save_for_backward(token_M, position_MK)
        ctx.num_tokens = x_TD.shape[0]
        return _triton_moe.permute_forward(x_TD.contiguous(), token_M, position_MK)

    @staticmethod
    def backward(ctx, grad_ND):
        from uniloom.kernels import _triton_moe

        token_M, position_MK = ctx.saved_tensors
        return (
            _triton_moe.permute_backward(grad_ND.contiguous(), token_M, position_MK, ctx.num_tokens),
            None,
            None,
        )


def permute(x_TD: torch.Tensor, slots: Slots, *, triton: bool) -> torch.Tensor:
    """x (T, D) -> the rows the sorted slots read (N, D)."""
    if not triton:
        return x_TD[slots.token_N]
    _need_positions(slots)
    return PermuteFunction.apply(x_TD, slots.token_M, slots.position_MK)


class UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_ND, scores_MK, token_M, position_MK, num_tokens):
        from uniloom.kernels import _triton_moe

        out_ND, scores_MK = out_ND.contiguous(), scores_MK.contiguous()
        ctx.save_for_backward(out_ND, scores_MK, token_M, position_MK)
        return _triton_moe.unpermute_forward(out_ND, scores_MK, token_M, position_MK, num_tokens)

    @staticmethod
    def backward(ctx, grad_TD):
        from uniloom.kernels import _triton_moe

        out_ND, scores_MK, token_M, position_MK = ctx.saved_tensors
        grad_out_ND, grad_scores_MK = _triton_moe.unpermute_backward(
            grad_TD.contiguous(), out_ND, scores_MK, token_M, position_MK
        )
        return grad_out_ND, grad_scores_MK, None, None, None


def unpermute(
    out_ND: torch.Tensor, scores_MK: torch.Tensor, slots: Slots, num_tokens: int, *, triton: bool
) -> torch.Tensor:
    """Expert outputs in sorted order (N, D), each weighted by its slot's score and summed
    per token into (num_tokens, D), out_ND's dtype; rows no token was routed from are 0."""
    if not triton:
        out_ND = out_ND * scores_MK.reshape(-1)[slots.order_N, None].to(out_ND.dtype)
        # In out_ND's dtype: under autocast the experts compute in bf16 while x is fp32.
        return out_ND.new_zeros((num_tokens, out_ND.shape[1])).index_add_(0, slots.token_N, out_ND)
    _need_positions(slots)
    return UnpermuteFunction.apply(out_ND, scores_MK, slots.token_M, slots.position_MK, num_tokens)


def _need_positions(slots: Slots) -> None:
    if slots.position_MK is None:
        raise ValueError("the Triton permutation needs slots from sort_slots(..., triton=True)")


# ---------------------------------------------------------------------------------------
# Grouped SwiGLU experts


def expert(x_nD, w1_FD, w3_FD, w2_DF):
    """One SwiGLU expert on its n token-slots -> (n, D)."""
    return (F.silu(x_nD @ w1_FD.T) * (x_nD @ w3_FD.T)) @ w2_DF.T


def grouped_swiglu_loop(x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF):
    """The reference: one matmul chain per expert over its block of rows. The weights are
    unbound, not indexed per expert: the same numbers, but indexing's backward writes a
    full (E, ...) gradient per expert, E^2 F D work (20x the matmuls at E = 64 on a CPU)."""
    pieces = torch.split(x_ND, counts_E.tolist())
    experts = zip(pieces, w1_EFD.unbind(0), w3_EFD.unbind(0), w2_EDF.unbind(0))
    return torch.cat([expert(x_nD, w1_FD, w3_FD, w2_DF) for x_nD, w1_FD, w3_FD, w2_DF in experts])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x_ND: torch.Tensor, w_EFD: torch.Tensor) -> bool:
    """F.grouped_mm's fast path: bf16 on CUDA sm80+, rows of 16-byte multiples (TMA)."""
    if x_ND.device.type != "cuda" or compute_dtype(x_ND) != torch.bfloat16:
        return False
    aligned = all(n % 8 == 0 for n in w_EFD.shape[1:]) and x_ND.data_ptr() % 16 == 0
    return aligned and torch.cuda.get_device_capability(x_ND.device) >= (8, 0)


def grouped_backend(triton: bool, x_ND: torch.Tensor, w_EFD: torch.Tensor) -> str:
    """The reference loop unless `triton`; then torch's grouped GEMM where it has its fast
    path, the Triton grouped GEMM elsewhere (CUDA fp32, other GPUs, the interpreter)."""
    if not triton:
        return "loop"
    return "grouped_mm" if grouped_mm_supported(x_ND, w_EFD) else "triton"


class GroupedSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF):
        from uniloom.kernels import _triton_moe

        x_ND, w1_EFD, w3_EFD, w2_EDF = (t.contiguous() for t in (x_ND, w1_EFD, w3_EFD, w2_EDF))
        out_ND, saved = _triton_moe.swiglu_forward(x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF)
        ctx.save_for_backward(x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF, *saved)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        from uniloom.kernels import _triton_moe

        dx, dw1, dw3, dw2 = _triton_moe.swiglu_backward(grad_ND, *ctx.saved_tensors)
        return dx, None, dw1, dw3, dw2


def _grouped_mm_swiglu(x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF):
    offs = counts_E.cumsum(0).to(torch.int32)  # end row of each expert
    h_NF = F.silu(F.grouped_mm(x_ND, w1_EFD.transpose(-2, -1), offs=offs))
    h_NF = h_NF * F.grouped_mm(x_ND, w3_EFD.transpose(-2, -1), offs=offs)
    return F.grouped_mm(h_NF, w2_EDF.transpose(-2, -1), offs=offs)


def grouped_swiglu(x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF, *, backend: str) -> torch.Tensor:
    """E SwiGLU experts: rows of x_ND (N, D) sorted by expert, counts_E (E,) rows per expert
    (any device), weights w1/w3 (E, F, D), w2 (E, D, F) -> (N, D) in the compute dtype
    (autocast's, as the reference's matmuls give, else x's)."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_swiglu backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if counts_E.shape != w1_EFD.shape[:1]:
        raise ValueError(f"grouped_swiglu: {counts_E.numel()} counts for {w1_EFD.shape[0]} experts")
    if backend == "loop" or (backend == "grouped_mm" and not x_ND.shape[0]):
        # grouped_mm's backward fails on zero rows (torch 2.13); the loop gives zero grads.
        return grouped_swiglu_loop(x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF)
    # As autocast would for the reference's matmuls: operands in the compute dtype (the
    # casts are differentiable, so fp32 weights get fp32 grads).
    dtype = compute_dtype(x_ND)
    counts_E = counts_E.to(device=x_ND.device, dtype=torch.int64)
    args = [t.to(dtype) for t in (x_ND, w1_EFD, w3_EFD, w2_EDF)]
    with torch.autocast(x_ND.device.type, enabled=False):
        if backend == "grouped_mm":
            return _grouped_mm_swiglu(args[0], counts_E, *args[1:])
        return GroupedSwiGLUFunction.apply(args[0], counts_E, *args[1:])
