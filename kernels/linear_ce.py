"""LM head + cross-entropy, fused and chunked (Liger-Kernel's fused linear cross-entropy):
the (N, V) logits never exist whole.

    loss = sum_i w_i * CE(x_i @ W.T, target_i)   over the rows whose target is not ignored

with w the caller's per-row token weights, or 1 / (non-ignored rows) for a plain mean.

Forward walks the rows in chunks. For each chunk: logits_CV = x_CH @ W.T (one matmul in the
inputs' dtype, fp32 accumulation inside it), then per row the log-sum-exp, the CE and the
gradient of the loss with respect to the logits, w_i * (softmax_i - onehot_i), written over
the logits in place; then grad_x_CH = g_CV @ W and grad_W_VH += g_CV.T @ x_CH. Backward
only scales the saved gradients by the incoming scalar. Peak memory: one chunk of logits
plus grad_x and an fp32 grad_W (for bf16 inputs also the chunk's fp32 logits in the
reference, and each chunk's bf16 (V, H) grad_W term), instead of several (N, V) tensors.

Two implementations of the per-row step, the matmuls torch (cuBLAS) in both:
  reference  plain PyTorch in place on the chunk (already saves the memory on a CPU)
  triton     kernels/_triton_linear_ce.py: one program per row reads its logits twice (an
             online max/sum, then the gradient) and overwrites them, as Liger's
             cross_entropy kernel does. It fuses the softmax, the CE and the gradient, not
             the matmuls.

Chunk size (`chunk_rows=None`): Liger's rule, chunk logits about the size of the input
x_NH (rows = next power of two of N / ceil(V / H)), but at least MIN_CHUNK_ROWS rows: each
chunk's grad_W update reads and writes the whole (V, H) accumulator, so a chunk of a few
rows is bound by that traffic, not by its flops (N 2,048, H 256, V 126,464 on one CPU
thread: Liger's 8-row chunks take 2.4x eager's time, 128-row chunks 0.6x).

Dtypes: x and W share a dtype (fp32 or bf16); CE, log-sum-exp and the gradient are
computed in fp32, grad_W accumulated in fp32 across chunks. Under torch.autocast x and W
are cast to the autocast dtype first, so the logits are what F.linear under autocast
gives, then upcast for the CE: the same as `F.cross_entropy(F.linear(x, W).float(), ...)`.
Label smoothing is not supported; token_weight gets no gradient.

Shape legend: N rows (tokens), H hidden, V vocabulary, C rows of one chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_CHUNK_ROWS = 128


def default_chunk_rows(N: int, H: int, V: int) -> int:
    """Rows per chunk: chunk logits (C, V) about as large as x (N, H), at least
    MIN_CHUNK_ROWS rows, at most N."""
    per_chunk = math.ceil(N / math.ceil(V / H))
    rows = 1 << max(per_chunk - 1, 0).bit_length()  # the next power of two
    return max(1, min(N, max(rows, MIN_CHUNK_ROWS)))


def row_weights(target_N, token_weight_N, ignore_index: int) -> torch.Tensor:
    """(N,) fp32 weight of each row in the loss: the token weight, or 1 / (non-ignored
    rows) for a mean; 0 at ignored rows."""
    valid_N = target_N != ignore_index
    if token_weight_N is None:
        return valid_N.float() / valid_N.sum().clamp(min=1)
    return torch.where(valid_N, token_weight_N.float(), 0.0)


def eager_linear_cross_entropy(x_NH, weight_VH, target_N, token_weight_N=None, *, ignore_index=-100):
    """The baseline: full (N, V) logits, F.cross_entropy. Same returns as
    `linear_cross_entropy`."""
    ce_N = F.cross_entropy(
        F.linear(x_NH, weight_VH).float(), target_N, ignore_index=ignore_index, reduction="none"
    )
    return (ce_N * row_weights(target_N, token_weight_N, ignore_index)).sum(), ce_N.detach()


def _ce_and_grad_reference_(logits_CV, target_C, weight_C, valid_C, grad: bool) -> torch.Tensor:
    """CE (C,) fp32 of each row (0 where not valid); with `grad`, overwrites the logits
    with weight_c * (softmax - onehot). Rows with weight 0 get a zero gradient."""
    z_CV = logits_CV.float()  # the logits themselves when fp32: worked on in place
    rows_C = torch.arange(z_CV.shape[0], device=z_CV.device)
    safe_C = torch.where(valid_C, target_C, 0)
    picked_C = z_CV[rows_C, safe_C]
    max_C = z_CV.amax(1)
    z_CV.sub_(max_C[:, None]).exp_()
    sum_C = z_CV.sum(1)
    ce_C = torch.where(valid_C, max_C + sum_C.log() - picked_C, 0.0)
    if grad:
        z_CV.mul_((weight_C / sum_C)[:, None])
        z_CV[rows_C, safe_C] -= weight_C
        if z_CV.data_ptr() != logits_CV.data_ptr():
            logits_CV.copy_(z_CV)
    return ce_C


def _chunked_forward(x_NH, weight_VH, target_N, weight_N, ignore_index, chunk_rows, triton, grad_x, grad_w):
    """ce_N and, as asked, grad_x_NH (x's dtype) and grad_W_VH (fp32) of sum(weight_N * ce_N)."""
    N, H = x_NH.shape
    V = weight_VH.shape[0]
    C = chunk_rows or default_chunk_rows(N, H, V)
    target_N = target_N.contiguous()
    valid_N = target_N != ignore_index
    ce_N = torch.zeros(N, dtype=torch.float32, device=x_NH.device)
    dx_NH = torch.empty(N, H, dtype=x_NH.dtype, device=x_NH.device) if grad_x else None
    dw_VH = torch.zeros(V, H, dtype=torch.float32, device=x_NH.device) if grad_w else None
    logits_buf = torch.empty(min(C, N), V, dtype=x_NH.dtype, device=x_NH.device)
    if triton:
        from uniloom.kernels import _triton_linear_ce
    for start in range(0, N, C):
        end = min(start + C, N)
        x_CH = x_NH[start:end]
        logits_CV = torch.mm(x_CH, weight_VH.t(), out=logits_buf[: end - start])
        if triton:
            _triton_linear_ce.ce_and_grad_(logits_CV, target_N[start:end], weight_N[start:end], ce_N[start:end],
                                           ignore_index, grad_x or grad_w)  # fmt: skip
        else:
            ce_N[start:end] = _ce_and_grad_reference_(logits_CV, target_N[start:end], weight_N[start:end],
                                                      valid_N[start:end], grad_x or grad_w)  # fmt: skip
        if grad_x:
            torch.mm(logits_CV, weight_VH, out=dx_NH[start:end])
        if grad_w and logits_CV.dtype == torch.float32:
            dw_VH.addmm_(logits_CV.t(), x_CH)
        elif grad_w:  # no bf16 x bf16 -> fp32 matmul on every device: a (V, H) product in bf16
            dw_VH.add_(logits_CV.t() @ x_CH)
    return ce_N, dx_NH, dw_VH


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH, weight_VH, target_N, weight_N, ignore_index, chunk_rows, triton):
        ce_N, dx_NH, dw_VH = _chunked_forward(x_NH, weight_VH, target_N, weight_N, ignore_index, chunk_rows,
                                              triton, ctx.needs_input_grad[0], ctx.needs_input_grad[1])  # fmt: skip
        ctx.grads = (dx_NH, None if dw_VH is None else dw_VH.to(weight_VH.dtype))
        ctx.mark_non_differentiable(ce_N)
        return (ce_N * weight_N).sum(), ce_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward through the same loss twice; its gradients are "
                "computed in forward and handed out once"
            )
        dx_NH, dw_VH = ctx.grads
        ctx.grads = None  # frees them once the caller's grads are accumulated
        if dx_NH is not None:
            dx_NH.mul_(grad_loss)
        if dw_VH is not None:
            dw_VH.mul_(grad_loss)
        return dx_NH, dw_VH, None, None, None, None, None


def linear_cross_entropy(x_NH, weight_VH, target_N, token_weight_N=None, *, ignore_index=-100, chunk_rows=None,
                         triton=False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """loss () = sum_i token_weight_i * ce_i over the non-ignored rows (token_weight None: the
    mean over them; 0 when every row is ignored), differentiable w.r.t. x and weight; ce_N
    (N,) fp32 per-row CE, detached (0 at ignored rows), for logging. `triton` picks the
    fused per-row kernel (the caller resolves it with `uniloom.kernels.use_triton`);
    `chunk_rows` None picks `default_chunk_rows`."""
    if x_NH.dim() != 2 or weight_VH.dim() != 2 or x_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"linear_cross_entropy: x {tuple(x_NH.shape)} and weight {tuple(weight_VH.shape)} "
                         "must be (N, H) and (V, H)")  # fmt: skip
    if target_N.shape != x_NH.shape[:1] or target_N.dtype != torch.long:
        raise ValueError(f"linear_cross_entropy: target must be int64 of shape ({x_NH.shape[0]},), "
                         f"not {target_N.dtype} {tuple(target_N.shape)}")  # fmt: skip
    if token_weight_N is not None and token_weight_N.shape != target_N.shape:
        raise ValueError(f"linear_cross_entropy: token_weight of shape {tuple(token_weight_N.shape)} "
                         f"for {target_N.shape[0]} rows")  # fmt: skip
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be at least 1, not {chunk_rows}")
    V = weight_VH.shape[0]
    bad = (target_N != ignore_index) & ((target_N < 0) | (target_N >= V))
    if bad.any():
        raise ValueError(
            f"linear_cross_entropy: target {target_N[bad][0].item()} outside the vocabulary 0..{V - 1}"
        )
    device = x_NH.device.type
    if torch.is_autocast_enabled(device):  # the dtype F.linear would compute the logits in
        dtype = torch.get_autocast_dtype(device)
        x_NH, weight_VH = x_NH.to(dtype), weight_VH.to(dtype)
    if x_NH.dtype != weight_VH.dtype:
        raise ValueError(f"linear_cross_entropy: x is {x_NH.dtype} but weight is {weight_VH.dtype}")
    weight_N = row_weights(target_N, token_weight_N, ignore_index)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (x_NH.requires_grad or weight_VH.requires_grad):
            return LinearCrossEntropyFunction.apply(x_NH, weight_VH, target_N, weight_N, ignore_index, chunk_rows,
                                                    triton)  # fmt: skip
        ce_N, _, _ = _chunked_forward(x_NH, weight_VH, target_N, weight_N, ignore_index, chunk_rows, triton,
                                      False, False)  # fmt: skip
        return (ce_N * weight_N).sum(), ce_N
