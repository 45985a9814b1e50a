"""Triton kernel of the chunked linear cross-entropy (kernels/linear_ce.py): the per-row
step on one chunk of logits, Liger-Kernel's cross_entropy kernel without its extras (no
label smoothing, z-loss or softcap). One program per row walks the row in blocks twice: an
online max and sum of exponentials give the log-sum-exp and the CE, then the row is
overwritten with weight * (softmax - onehot), the gradient the matmuls around it need.
Everything in fp32 registers; the row is read and written in its own dtype.

Shape legend: C rows of the chunk, V vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 32768  # Liger's MAX_FUSED_SIZE: wider rows are walked in blocks of this


@triton.jit
def _ce_and_grad_rows(
    X, stride_x, TARGET, WEIGHT, CE, n_cols, ignore_index, GRAD: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    target = tl.load(TARGET + row)
    offs = tl.arange(0, BLOCK)
    if target == ignore_index:
        tl.store(CE + row, 0.0)
        if GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                tl.store(X + cols, tl.zeros([BLOCK], dtype=X.dtype.element_ty), mask=cols < n_cols)
        return

    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(X + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    picked = tl.load(X + target).to(tl.float32)
    tl.store(CE + row, lse - picked)

    if GRAD:
        weight = tl.load(WEIGHT + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * weight
            g = tl.where(cols == target, g - weight, g)
            tl.store(X + cols, g.to(X.dtype.element_ty), mask=mask)


def ce_and_grad_(logits_CV: torch.Tensor, target_C, weight_C, ce_C, ignore_index: int, grad: bool) -> None:
    """Writes each row's CE into ce_C (fp32, 0 at ignored rows) and, with `grad`, overwrites
    logits_CV (unit column stride) with weight_c * (softmax - onehot)."""
    C, V = logits_CV.shape
    if C == 0:
        return
    if logits_CV.stride(1) != 1:
        raise ValueError("ce_and_grad_: the logits need unit column stride")
    block = min(MAX_BLOCK, triton.next_power_of_2(V))
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    _ce_and_grad_rows[(C,)](
        logits_CV, logits_CV.stride(0), target_C, weight_C, ce_C, V, ignore_index,
        GRAD=grad, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
