"""Triton kernels of the MoE ops (kernels/moe.py): routing, the counting sort of the
token-slots, the permutation and its inverse, the grouped SwiGLU matmuls.

Routing: a program per block of tokens holds their (tokens, E) logits, takes the fp32
softmax, picks the top k by k max-reductions, renormalises, and adds its block's expert
histogram to the counts (one integer atomic per expert and block: exact, in any order).

Slot sort: stable by slot index within an expert, as torch's stable argsort. Per block of
slots, a histogram; one program scans the histograms into each (block, expert)'s first
position; each block then places its slots at that base plus their rank among the block's
slots of the same expert (a cumulative sum of one-hot rows).

Permutation: token-major. A program per routed token knows its k slots' positions, so the
gather's backward and the weighted scatter-add's forward are sums of k rows in registers:
deterministic, no atomics.

Grouped GEMM: row tiles walk the experts' contiguous row blocks. A program's row tile is
found by walking the counts on the device (no host sync); tile programs beyond the last
expert's rows exit. Weight gradients: a program per (expert, output tile) loops over that
expert's rows. Under TRITON_INTERPRET tiles are upcast to fp32 before tl.dot (its bf16 dot
is broken there).

Shape legend as in kernels/moe.py: M routed tokens, E experts, K experts per token, N = M * K
token-slots, D hidden, F expert FFN width, B blocks of slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from uniloom.kernels import interpreting

# Grouped GEMM tiles (rows, output columns, reduction); not tuned on a GPU yet.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


def _row_block(width: int, elements: int = 4096, most: int = 64) -> int:
    """Rows per program for kernels that hold (rows, width) tiles: about `elements` values."""
    return max(1, min(most, elements // triton.next_power_of_2(width)))


@triton.jit
def _cast(value, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. The interpreter's fp32 -> bf16 cast truncates
    (triton 3.9, twice the GPU's rounding error): FIX_BF16 rounds here first."""
    if FIX_BF16:
        if dtype == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


# ---------------------------------------------------------------------------------------
# Routing


@triton.jit
def _route_fwd_kernel(
    logits_ptr, probs_ptr, scores_ptr, selected_ptr, counts_ptr, M, E,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < E
    tile_ok = row_ok[:, None] & col_ok[None, :]
    z = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    z = tl.where(col_ok[None, :], z, float("-inf"))
    ez = tl.exp(z - tl.max(z, 1)[:, None])
    p = ez / tl.sum(ez, 1)[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=tile_ok)

    work = tl.where(col_ok[None, :], p, -1.0)  # probabilities are >= 0: -1 marks taken or absent
    top = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    sel = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    hist = tl.zeros((BLOCK_E,), tl.int32)
    for j in tl.static_range(K):
        best = tl.max(work, 1)
        # Lowest expert index among exact ties; clamped so a NaN row still names an expert
        # (its NaN reaches the loss through the probabilities).
        idx = tl.minimum(tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), 1), E - 1)
        chosen = cols[None, :] == idx[:, None]
        work = tl.where(chosen, -1.0, work)
        hist += tl.sum((chosen & row_ok[:, None]).to(tl.int32), 0)
        top = tl.where(ks[None, :] == j, best[:, None], top)
        sel = tl.where(ks[None, :] == j, idx[:, None], sel)
    scores = top / tl.sum(top, 1)[:, None]
    k_ok = row_ok[:, None] & (ks[None, :] < K)
    tl.store(scores_ptr + rows[:, None] * K + ks[None, :], scores, mask=k_ok)
    tl.store(selected_ptr + rows[:, None] * K + ks[None, :], sel.to(tl.int64), mask=k_ok)
    tl.atomic_add(counts_ptr + cols, hist.to(tl.int64), mask=col_ok)


@triton.jit
def _route_bwd_kernel(
    probs_ptr, grad_probs_ptr, scores_ptr, selected_ptr, grad_scores_ptr, grad_logits_ptr, M, E,
    K: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    tile_ok = row_ok[:, None] & (cols[None, :] < E)
    p = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=tile_ok, other=0.0)
    if HAS_GRAD_PROBS:
        gp = tl.load(grad_probs_ptr + rows[:, None] * E + cols[None, :], mask=tile_ok, other=0.0).to(
            tl.float32
        )
    else:
        gp = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    if HAS_GRAD_SCORES:
        # s_j = p_sel_j / S with S = sum_j p_sel_j: dL/dp_sel_j = (g_j - sum_i g_i s_i) / S.
        k_ok = row_ok[:, None] & (ks[None, :] < K)
        s = tl.load(scores_ptr + rows[:, None] * K + ks[None, :], mask=k_ok, other=0.0)
        gs = tl.load(grad_scores_ptr + rows[:, None] * K + ks[None, :], mask=k_ok, other=0.0).to(tl.float32)
        sel = tl.load(selected_ptr + rows[:, None] * K + ks[None, :], mask=k_ok, other=-1).to(tl.int32)
        dot = tl.sum(gs * s, 1)
        g_sel = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        is_sel = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for j in tl.static_range(K):
            sel_j = tl.sum(tl.where(ks[None, :] == j, sel, 0), 1)
            g_j = tl.sum(tl.where(ks[None, :] == j, gs, 0.0), 1)
            chosen = cols[None, :] == sel_j[:, None]
            g_sel = tl.where(chosen, g_j[:, None], g_sel)
            is_sel = is_sel | chosen.to(tl.int32)
        total = tl.sum(tl.where(is_sel > 0, p, 0.0), 1)
        total = tl.where(row_ok, total, 1.0)
        gp += tl.where(is_sel > 0, (g_sel - dot[:, None]) / total[:, None], 0.0)
    gz = p * (gp - tl.sum(p * gp, 1)[:, None])
    tl.store(grad_logits_ptr + rows[:, None] * E + cols[None, :], gz, mask=tile_ok)


def route_forward(logits_ME: torch.Tensor, top_k: int):
    """fp32 logits (M, E) -> probs (M, E), scores (M, K) fp32, selected (M, K) int64, counts (E,) int64."""
    M, E = logits_ME.shape
    probs_ME = torch.empty((M, E), dtype=torch.float32, device=logits_ME.device)
    scores_MK = torch.empty((M, top_k), dtype=torch.float32, device=logits_ME.device)
    selected_MK = torch.empty((M, top_k), dtype=torch.int64, device=logits_ME.device)
    counts_E = torch.zeros(E, dtype=torch.int64, device=logits_ME.device)
    if M:
        block_t = _row_block(E)
        _route_fwd_kernel[(triton.cdiv(M, block_t),)](
            logits_ME, probs_ME, scores_MK, selected_MK, counts_E, M, E,
            K=top_k, BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(E),
            BLOCK_K=max(2, triton.next_power_of_2(top_k)),
        )  # fmt: skip
    return probs_ME, scores_MK, selected_MK, counts_E


def route_backward(probs_ME, grad_probs_ME, scores_MK, selected_MK, grad_scores_MK):
    """Gradient to the logits from those of the probabilities and of the scores (either None)."""
    M, E = probs_ME.shape
    top_k = scores_MK.shape[1]
    grad_logits_ME = torch.empty_like(probs_ME)
    if M:
        block_t = _row_block(E)
        _route_bwd_kernel[(triton.cdiv(M, block_t),)](
            probs_ME, probs_ME if grad_probs_ME is None else grad_probs_ME.contiguous(), scores_MK, selected_MK,
            scores_MK if grad_scores_MK is None else grad_scores_MK.contiguous(), grad_logits_ME, M, E,
            K=top_k, HAS_GRAD_PROBS=grad_probs_ME is not None, HAS_GRAD_SCORES=grad_scores_MK is not None,
            BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(E), BLOCK_K=max(2, triton.next_power_of_2(top_k)),
        )  # fmt: skip
    return grad_logits_ME


# ---------------------------------------------------------------------------------------
# Slot sort


@triton.jit
def _slot_hist_kernel(selected_ptr, hist_ptr, N, E, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_E)
    sel = tl.load(selected_ptr + slots, mask=slots < N, other=-1).to(tl.int32)
    hist = tl.sum((sel[:, None] == cols[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + pid * E + cols, hist, mask=cols < E)


@triton.jit
def _slot_base_kernel(hist_ptr, base_ptr, num_blocks, E, BLOCK_E: tl.constexpr):
    """base[b, e] = slots of experts before e, plus slots of e in blocks before b."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    total = tl.zeros((BLOCK_E,), tl.int64)
    for b in range(num_blocks):
        total += tl.load(hist_ptr + b * E + cols, mask=col_ok, other=0)
    run = tl.cumsum(total, 0) - total
    for b in range(num_blocks):
        tl.store(base_ptr + b * E + cols, run, mask=col_ok)
        run += tl.load(hist_ptr + b * E + cols, mask=col_ok, other=0)


@triton.jit
def _slot_place_kernel(
    selected_ptr, base_ptr, token_M_ptr, order_ptr, token_N_ptr, position_ptr, N, E, K,
    HAS_TOKEN_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = slots < N
    cols = tl.arange(0, BLOCK_E)
    sel = tl.load(selected_ptr + slots, mask=ok, other=-1).to(tl.int32)
    onehot = (sel[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.sum(onehot * tl.cumsum(onehot, 0), 1) - 1  # earlier slots of this block with the same expert
    pos = tl.load(base_ptr + pid * E + sel, mask=ok, other=0) + rank
    slots64 = slots.to(tl.int64)
    tl.store(position_ptr + slots, pos, mask=ok)
    tl.store(order_ptr + pos, slots64, mask=ok)
    if HAS_TOKEN_M:
        token = tl.load(token_M_ptr + slots64 // K, mask=ok, other=0)
    else:
        token = slots64 // K
    tl.store(token_N_ptr + pos, token, mask=ok)


def sort_slots(selected_MK: torch.Tensor, num_experts: int, token_M: torch.Tensor | None):
    """-> order_N (slot m * K + j at each sorted position), token_N (its row of x),
    position_MK (each slot's sorted position)."""
    M, K = selected_MK.shape
    N, E = M * K, num_experts
    device = selected_MK.device
    order_N = torch.empty(N, dtype=torch.int64, device=device)
    token_N = torch.empty(N, dtype=torch.int64, device=device)
    position_MK = torch.empty((M, K), dtype=torch.int64, device=device)
    if N:
        block_e = triton.next_power_of_2(E)
        block_s = max(16, _row_block(E, elements=8192, most=1024))
        num_blocks = triton.cdiv(N, block_s)
        hist_BE = torch.empty((num_blocks, E), dtype=torch.int64, device=device)
        base_BE = torch.empty_like(hist_BE)
        _slot_hist_kernel[(num_blocks,)](selected_MK, hist_BE, N, E, BLOCK_S=block_s, BLOCK_E=block_e)
        _slot_base_kernel[(1,)](hist_BE, base_BE, num_blocks, E, BLOCK_E=block_e)
        _slot_place_kernel[(num_blocks,)](
            selected_MK, base_BE, token_M if token_M is not None else selected_MK, order_N, token_N, position_MK,
            N, E, K, HAS_TOKEN_M=token_M is not None, BLOCK_S=block_s, BLOCK_E=block_e,
        )  # fmt: skip
    return order_N, token_N, position_MK


# ---------------------------------------------------------------------------------------
# Permutation (token-major: program m handles routed token m and its K slots)


@triton.jit
def _permute_fwd_kernel(
    x_ptr, token_M_ptr, position_ptr, out_ptr, D, K,
    HAS_TOKEN_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FIX_BF16: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0).to(tl.int64)
    if HAS_TOKEN_M:
        src = tl.load(token_M_ptr + m)
    else:
        src = m
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    pos = tl.load(position_ptr + m * K + ks, mask=k_ok, other=0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        row = tl.load(x_ptr + src * D + d, mask=d_ok, other=0.0)
        tl.store(out_ptr + pos[:, None] * D + d[None, :], tl.broadcast_to(row[None, :], (BLOCK_K, BLOCK_D)),
                 mask=k_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def _permute_bwd_kernel(
    grad_out_ptr, token_M_ptr, position_ptr, grad_x_ptr, D, K,
    HAS_TOKEN_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FIX_BF16: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0).to(tl.int64)
    if HAS_TOKEN_M:
        dst = tl.load(token_M_ptr + m)
    else:
        dst = m
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    pos = tl.load(position_ptr + m * K + ks, mask=k_ok, other=0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        g = tl.load(
            grad_out_ptr + pos[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0
        )
        tl.store(
            grad_x_ptr + dst * D + d,
            _cast(tl.sum(g.to(tl.float32), 0), grad_x_ptr.dtype.element_ty, FIX_BF16),
            mask=d_ok,
        )


@triton.jit
def _unpermute_fwd_kernel(
    y_ptr, scores_ptr, token_M_ptr, position_ptr, out_ptr, D, K,
    HAS_TOKEN_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FIX_BF16: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0).to(tl.int64)
    if HAS_TOKEN_M:
        dst = tl.load(token_M_ptr + m)
    else:
        dst = m
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    pos = tl.load(position_ptr + m * K + ks, mask=k_ok, other=0)
    # The score rounded to the outputs' dtype, as the reference multiplies in that dtype.
    s = tl.load(scores_ptr + m * K + ks, mask=k_ok, other=0.0)
    s = _cast(s, y_ptr.dtype.element_ty, FIX_BF16).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        y = tl.load(y_ptr + pos[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.sum(y.to(tl.float32) * s[:, None], 0)
        tl.store(out_ptr + dst * D + d, _cast(acc, out_ptr.dtype.element_ty, FIX_BF16), mask=d_ok)


@triton.jit
def _unpermute_bwd_kernel(
    grad_out_ptr, y_ptr, scores_ptr, token_M_ptr, position_ptr, grad_y_ptr, grad_scores_ptr, D, K,
    HAS_TOKEN_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FIX_BF16: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0).to(tl.int64)
    if HAS_TOKEN_M:
        dst = tl.load(token_M_ptr + m)
    else:
        dst = m
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    pos = tl.load(position_ptr + m * K + ks, mask=k_ok, other=0)
    s = tl.load(scores_ptr + m * K + ks, mask=k_ok, other=0.0)
    s = _cast(s, y_ptr.dtype.element_ty, FIX_BF16).to(tl.float32)
    dots = tl.zeros((BLOCK_K,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        tile_ok = k_ok[:, None] & d_ok[None, :]
        g = tl.load(grad_out_ptr + dst * D + d, mask=d_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + pos[:, None] * D + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        dots += tl.sum(y * g[None, :], 1)
        tl.store(grad_y_ptr + pos[:, None] * D + d[None, :],
                 _cast(s[:, None] * g[None, :], grad_y_ptr.dtype.element_ty, FIX_BF16), mask=tile_ok)  # fmt: skip
    tl.store(grad_scores_ptr + m * K + ks, dots, mask=k_ok)


def _row_settings(D: int, K: int):
    return dict(BLOCK_K=max(2, triton.next_power_of_2(K)), BLOCK_D=min(1024, triton.next_power_of_2(D)),
                FIX_BF16=interpreting())  # fmt: skip


def permute_forward(x_TD, token_M, position_MK):
    M, K = position_MK.shape
    out_ND = x_TD.new_empty((M * K, x_TD.shape[1]))
    if M:
        _permute_fwd_kernel[(M,)](x_TD, token_M if token_M is not None else position_MK, position_MK, out_ND,
                                  x_TD.shape[1], K, HAS_TOKEN_M=token_M is not None,
                                  **_row_settings(x_TD.shape[1], K))  # fmt: skip
    return out_ND


def permute_backward(grad_ND, token_M, position_MK, num_tokens: int):
    M, K = position_MK.shape
    D = grad_ND.shape[1]
    # Rows of x that no slot read (not routed) get a zero gradient.
    grad_TD = grad_ND.new_zeros((num_tokens, D)) if token_M is not None else grad_ND.new_empty((M, D))
    if M:
        _permute_bwd_kernel[(M,)](grad_ND, token_M if token_M is not None else position_MK, position_MK, grad_TD,
                                  D, K, HAS_TOKEN_M=token_M is not None, **_row_settings(D, K))  # fmt: skip
    return grad_TD


def unpermute_forward(y_ND, scores_MK, token_M, position_MK, num_tokens: int):
    M, K = position_MK.shape
    D = y_ND.shape[1]
    out_TD = y_ND.new_zeros((num_tokens, D)) if token_M is not None else y_ND.new_empty((M, D))
    if M:
        _unpermute_fwd_kernel[(M,)](y_ND, scores_MK, token_M if token_M is not None else position_MK, position_MK,
                                    out_TD, D, K, HAS_TOKEN_M=token_M is not None,
                                    **_row_settings(D, K))  # fmt: skip
    return out_TD


def unpermute_backward(grad_TD, y_ND, scores_MK, token_M, position_MK):
    M, K = position_MK.shape
    D = y_ND.shape[1]
    grad_y_ND = torch.empty_like(y_ND)
    grad_scores_MK = torch.empty((M, K), dtype=torch.float32, device=y_ND.device)
    if M:
        _unpermute_bwd_kernel[(M,)](grad_TD, y_ND, scores_MK, token_M if token_M is not None else position_MK,
                                    position_MK, grad_y_ND, grad_scores_MK, D, K,
                                    HAS_TOKEN_M=token_M is not None, **_row_settings(D, K))  # fmt: skip
    return grad_y_ND, grad_scores_MK


# ---------------------------------------------------------------------------------------
# Grouped GEMM


@triton.jit
def _expert_tile(counts_ptr, E, tile, BLOCK: tl.constexpr):
    """Row tile `tile` of the experts' blocks (each split into BLOCK-row tiles) ->
    (expert or -1 past the last, first row, end of the expert's rows)."""
    zero = tile.to(tl.int64) * 0  # int64 loop-carried values: the counts are int64
    expert = zero - 1
    row0 = zero
    row_end = zero
    tiles_before = zero
    rows_before = zero
    for e in range(E):
        n = tl.load(counts_ptr + e)
        tiles = (n + BLOCK - 1) // BLOCK
        hit = (tile >= tiles_before) & (tile < tiles_before + tiles)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, rows_before + (tile - tiles_before) * BLOCK, row0)
        row_end = tl.where(hit, rows_before + n, row_end)
        tiles_before += tiles
        rows_before += n
    return expert, row0, row_end


@triton.jit
def _tile_dot(
    acc, a_ptr, stride_am, rows, row_ok, b_ptr, stride_bk, stride_bn, cols, col_ok, K_dim,
    BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc += A[rows, :K_dim] @ B[:K_dim, cols]; A has unit column stride."""
    for k0 in range(0, K_dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K_dim
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(b_ptr + kk[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gmm_swiglu_fwd_kernel(
    x_ptr, w1_ptr, w3_ptr, h1_ptr, h3_ptr, act_ptr, counts_ptr, E, D, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
):  # fmt: skip
    """h1 = x @ W1_e.T, h3 = x @ W3_e.T, act = silu(h1) * h3 on the tile's rows."""
    expert, row0, row_end = _expert_tile(counts_ptr, E, tl.program_id(0), BLOCK_M)
    if expert < 0:
        return
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    w_off = expert.to(tl.int64) * F * D
    zero = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    h1 = _tile_dot(
        zero, x_ptr, D, rows, row_ok, w1_ptr + w_off, 1, D, cols, col_ok, D, BLOCK_K, DOT_FP32, PRECISION
    )
    h3 = _tile_dot(
        zero, x_ptr, D, rows, row_ok, w3_ptr + w_off, 1, D, cols, col_ok, D, BLOCK_K, DOT_FP32, PRECISION
    )
    act = h1 * tl.sigmoid(h1) * h3
    out = rows[:, None] * F + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(h1_ptr + out, _cast(h1, h1_ptr.dtype.element_ty, FIX_BF16), mask=ok)
    tl.store(h3_ptr + out, _cast(h3, h3_ptr.dtype.element_ty, FIX_BF16), mask=ok)
    tl.store(act_ptr + out, _cast(act, act_ptr.dtype.element_ty, FIX_BF16), mask=ok)


@triton.jit
def _gmm_swiglu_bwd_kernel(
    dy_ptr, w2_ptr, h1_ptr, h3_ptr, dh1_ptr, dh3_ptr, counts_ptr, E, D, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
):  # fmt: skip
    """d act = dy @ W2_e, then through act = silu(h1) * h3 to dh1 and dh3."""
    expert, row0, row_end = _expert_tile(counts_ptr, E, tl.program_id(0), BLOCK_M)
    if expert < 0:
        return
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    w_off = expert.to(tl.int64) * D * F
    zero = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    dact = _tile_dot(
        zero, dy_ptr, D, rows, row_ok, w2_ptr + w_off, F, 1, cols, col_ok, D, BLOCK_K, DOT_FP32, PRECISION
    )
    out = rows[:, None] * F + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    h1 = tl.load(h1_ptr + out, mask=ok, other=0.0).to(tl.float32)
    h3 = tl.load(h3_ptr + out, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(h1)
    tl.store(
        dh1_ptr + out,
        _cast(dact * h3 * sig * (1.0 + h1 * (1.0 - sig)), dh1_ptr.dtype.element_ty, FIX_BF16),
        mask=ok,
    )
    tl.store(dh3_ptr + out, _cast(dact * h1 * sig, dh3_ptr.dtype.element_ty, FIX_BF16), mask=ok)


@triton.jit
def _gmm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, counts_ptr, E, N_out, K_dim, stride_be, stride_bk, stride_bn,
    HAS_SECOND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
):  # fmt: skip
    """C = A @ B_e (+ A2 @ B2_e) on the tile's rows; A, A2, C contiguous rows."""
    expert, row0, row_end = _expert_tile(counts_ptr, E, tl.program_id(0), BLOCK_M)
    if expert < 0:
        return
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_out
    b_off = expert.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = _tile_dot(acc, a_ptr, K_dim, rows, row_ok, b_ptr + b_off, stride_bk, stride_bn, cols, col_ok, K_dim,
                    BLOCK_K, DOT_FP32, PRECISION)  # fmt: skip
    if HAS_SECOND:
        acc = _tile_dot(acc, a2_ptr, K_dim, rows, row_ok, b2_ptr + b_off, stride_bk, stride_bn, cols, col_ok, K_dim,
                        BLOCK_K, DOT_FP32, PRECISION)  # fmt: skip
    tl.store(c_ptr + rows[:, None] * N_out + cols[None, :], _cast(acc, c_ptr.dtype.element_ty, FIX_BF16),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def _gmm_weight_kernel(
    a_ptr, b_ptr, c_ptr, counts_ptr, P, Q,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
):  # fmt: skip
    """C[e] = A[rows_e].T @ B[rows_e]: (P, Q) per expert, from A (N, P) and B (N, Q)."""
    expert = tl.program_id(0)
    start = expert.to(tl.int64) * 0
    for e in range(expert):
        start += tl.load(counts_ptr + e)
    end = start + tl.load(counts_ptr + expert)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < P
    q_ok = qs < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < end
        a_t = tl.load(a_ptr + r[None, :] * P + ps[:, None], mask=p_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + r[:, None] * Q + qs[None, :], mask=r_ok[:, None] & q_ok[None, :], other=0.0)
        if DOT_FP32:
            a_t = a_t.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
    c_off = expert.to(tl.int64) * P * Q
    tl.store(c_ptr + c_off + ps[:, None] * Q + qs[None, :], _cast(acc, c_ptr.dtype.element_ty, FIX_BF16),
             mask=p_ok[:, None] & q_ok[None, :])  # fmt: skip


def _dot_settings(dtype: torch.dtype) -> dict:
    """Interpreter: fp32 tiles (its bf16 tl.dot is broken), bf16 rounded by _cast. fp32 operands: IEEE products
    unless torch itself allows TF32 matmuls, as the reference's matmul would."""
    fp32 = dtype == torch.float32 or interpreting()
    exact = fp32 and (interpreting() or not torch.backends.cuda.matmul.allow_tf32)
    return dict(DOT_FP32=interpreting(), PRECISION="ieee" if exact else "tf32", FIX_BF16=interpreting())


def _row_tiles(N: int, E: int) -> int:
    """An upper bound of the row tiles over all experts: sum_e ceil(n_e / BLOCK_M)."""
    return triton.cdiv(N, BLOCK_M) + E


def swiglu_forward(x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF):
    """-> out_ND and (h1, h3, act) (N, F) saved for the backward."""
    N, D = x_ND.shape
    E, F_, _ = w1_EFD.shape
    h1, h3, act = (x_ND.new_empty((N, F_)) for _ in range(3))
    out_ND = x_ND.new_empty((N, D))
    if N:
        dots = _dot_settings(x_ND.dtype)
        tiles = _row_tiles(N, E)
        _gmm_swiglu_fwd_kernel[(tiles, triton.cdiv(F_, BLOCK_N))](
            x_ND, w1_EFD, w3_EFD, h1, h3, act, counts_E, E, D, F_,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **dots,
        )  # fmt: skip
        # out = act @ W2_e.T: B_e[f, d] = W2[e, d, f]
        _gmm_kernel[(tiles, triton.cdiv(D, BLOCK_N))](
            act, w2_EDF, act, w2_EDF, out_ND, counts_E, E, D, F_, D * F_, 1, F_,
            HAS_SECOND=False, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **dots,
        )  # fmt: skip
    return out_ND, (h1, h3, act)


def swiglu_backward(grad_ND, x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF, h1, h3, act):
    """-> grads of x (N, D), w1 (E, F, D), w3 (E, F, D), w2 (E, D, F)."""
    N, D = x_ND.shape
    E, F_, _ = w1_EFD.shape
    grad_ND = grad_ND.contiguous()
    dx = torch.empty_like(x_ND)
    dw1, dw3, dw2 = torch.empty_like(w1_EFD), torch.empty_like(w3_EFD), torch.empty_like(w2_EDF)
    if not N:
        return dx, dw1.zero_(), dw3.zero_(), dw2.zero_()
    dots = _dot_settings(x_ND.dtype)
    tiles = _row_tiles(N, E)
    dh1, dh3 = torch.empty_like(h1), torch.empty_like(h3)
    _gmm_swiglu_bwd_kernel[(tiles, triton.cdiv(F_, BLOCK_N))](
        grad_ND, w2_EDF, h1, h3, dh1, dh3, counts_E, E, D, F_,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **dots,
    )  # fmt: skip
    # dx = dh1 @ W1_e + dh3 @ W3_e: B_e[f, d] = W[e, f, d]
    _gmm_kernel[(tiles, triton.cdiv(D, BLOCK_N))](
        dh1, w1_EFD, dh3, w3_EFD, dx, counts_E, E, D, F_, F_ * D, D, 1,
        HAS_SECOND=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **dots,
    )  # fmt: skip
    for a, b, c, P, Q in ((dh1, x_ND, dw1, F_, D), (dh3, x_ND, dw3, F_, D), (grad_ND, act, dw2, D, F_)):
        _gmm_weight_kernel[(E, triton.cdiv(P, BLOCK_N), triton.cdiv(Q, BLOCK_N))](
            a, b, c, counts_E, P, Q, BLOCK_P=BLOCK_N, BLOCK_Q=BLOCK_N, BLOCK_R=BLOCK_K, **dots,
        )  # fmt: skip
    return dx, dw1, dw3, dw2
