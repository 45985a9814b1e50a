"""Triton kernels of the flow head's block (kernels/flow_block.py).

Modulated LayerNorm: one program per row forward (mean and 1/std saved per row), a fixed
grid of row-walking programs backward that keep their share of the norm's dweight/dbias
in fp32 and write one partial row each (as kernels/_triton_rms_norm.py). SwiGLU: an
elementwise grid over (row, column block) reading gate and up from the two halves of the
w12 output and writing their gradients straight into one (N, 2F) buffer.

Shape legend: N rows, W norm width, F SwiGLU hidden width, P backward programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from uniloom.kernels import interpreting
from uniloom.kernels._triton_rms_norm import as_rows, reduction_programs, row_settings


@triton.jit
def _modulated_ln_fwd(
    H, X, W, B, SHIFT, SCALE, MEAN, RSTD,
    stride_h, stride_x, stride_shift, stride_scale, width, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / width
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / width + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    n = xc * rstd
    if HAS_W:
        n = n * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        n = n + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + row * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + row * stride_shift + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + row * stride_h + cols, (n * (1.0 + scale) + shift).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _modulated_ln_bwd(
    DX, DSCALE, DW_PARTIAL, DB_PARTIAL, DH, X, W, B, SCALE, MEAN, RSTD,
    stride_dx, stride_dscale, stride_dh, stride_x, stride_scale, rows, rows_per_program, width,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_B:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        db = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64 offsets: N * W may pass 2**31
    for row in range(start, tl.minimum(start + rows_per_program, rows)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + row * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        n = xhat
        g = dh * (1.0 + scale)  # d/d(norm output)
        if HAS_W:
            n = n * w
            dw += g * xhat
        if HAS_B:
            n = n + b
            db += g
        tl.store(DSCALE + row * stride_dscale + cols, (dh * n).to(DSCALE.dtype.element_ty), mask=mask)
        if HAS_W:
            g = g * w
        # d/dx of (x - mean) * rstd: rstd * (g - mean(g) - xhat * mean(g * xhat))
        dx = rstd * (g - (tl.sum(g, axis=0) + xhat * tl.sum(g * xhat, axis=0)) / width)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW_PARTIAL + pid * width + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_PARTIAL + pid * width + cols, db, mask=mask)


def modulated_ln_forward(x_NW, weight_W, bias_W, shift_NW, scale_NW, eps: float, out_dtype: torch.dtype):
    """-> h (N, W) of out_dtype, mean (N,) and rstd (N,) in fp32."""
    N, W = x_NW.shape
    x_NW, shift_NW, scale_NW = (as_rows(t, W) for t in (x_NW, shift_NW, scale_NW))
    h_NW = torch.empty((N, W), dtype=out_dtype, device=x_NW.device)
    mean_N = torch.empty(N, dtype=torch.float32, device=x_NW.device)
    rstd_N = torch.empty(N, dtype=torch.float32, device=x_NW.device)
    if N:
        block, num_warps = row_settings(W)
        _modulated_ln_fwd[(N,)](
            h_NW, x_NW, weight_W, bias_W, shift_NW, scale_NW, mean_N, rstd_N,
            h_NW.stride(0), x_NW.stride(0), shift_NW.stride(0), scale_NW.stride(0), W, eps,
            HAS_W=weight_W is not None, HAS_B=bias_W is not None, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return h_NW, mean_N, rstd_N


def modulated_ln_backward(dh_NW, x_NW, weight_W, bias_W, scale_NW, mean_N, rstd_N):
    """-> dx (N, W) of x's dtype, dscale (N, W) of scale's dtype, dweight and dbias (W,) of
    their parameters' dtypes (None where the norm has none). dshift is dh itself."""
    N, W = x_NW.shape
    dh_NW, x_NW, scale_NW = (as_rows(t, W) for t in (dh_NW, x_NW, scale_NW))
    dx_NW = torch.empty((N, W), dtype=x_NW.dtype, device=x_NW.device)
    dscale_NW = torch.empty((N, W), dtype=scale_NW.dtype, device=x_NW.device)
    if N == 0:
        zeros = [None if p is None else torch.zeros_like(p) for p in (weight_W, bias_W)]
        return dx_NW, dscale_NW, *zeros
    P = reduction_programs(N, x_NW.device)
    partials = [None if p is None else torch.empty((P, W), dtype=torch.float32, device=x_NW.device)
                for p in (weight_W, bias_W)]  # fmt: skip
    block, num_warps = row_settings(W)
    _modulated_ln_bwd[(P,)](
        dx_NW, dscale_NW, partials[0], partials[1], dh_NW, x_NW, weight_W, bias_W, scale_NW, mean_N, rstd_N,
        dx_NW.stride(0), dscale_NW.stride(0), dh_NW.stride(0), x_NW.stride(0), scale_NW.stride(0),
        N, triton.cdiv(N, P), W,
        HAS_W=weight_W is not None, HAS_B=bias_W is not None, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    grads = [None if p is None else part.sum(0).to(p.dtype) for p, part in zip((weight_W, bias_W), partials)]
    return dx_NW, dscale_NW, *grads


def _swiglu_block(F: int) -> int:
    # The interpreter pays per program, not per element: whole rows there.
    return triton.next_power_of_2(F) if interpreting() else min(1024, triton.next_power_of_2(F))


@triton.jit
def _swiglu_fwd(Y, GU, stride_y, stride_gu, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DGU, DY, GU, stride_dgu, stride_dy, stride_gu, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGU + row * stride_dgu + cols, dg.to(DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + row * stride_dgu + F + cols, (dy * silu).to(DGU.dtype.element_ty), mask=mask)


def swiglu_forward(gate_up_N2F: torch.Tensor) -> torch.Tensor:
    gate_up_N2F = as_rows(gate_up_N2F, gate_up_N2F.shape[-1])
    N, F = gate_up_N2F.shape[0], gate_up_N2F.shape[1] // 2
    y_NF = torch.empty((N, F), dtype=gate_up_N2F.dtype, device=gate_up_N2F.device)
    if N and F:
        block = _swiglu_block(F)
        _swiglu_fwd[(N, triton.cdiv(F, block))](
            y_NF, gate_up_N2F, y_NF.stride(0), gate_up_N2F.stride(0), F, BLOCK=block, num_warps=4
        )
    return y_NF


def swiglu_backward(dy_NF: torch.Tensor, gate_up_N2F: torch.Tensor) -> torch.Tensor:
    gate_up_N2F = as_rows(gate_up_N2F, gate_up_N2F.shape[-1])
    N, F = gate_up_N2F.shape[0], gate_up_N2F.shape[1] // 2
    dy_NF = as_rows(dy_NF, F)
    dgate_up_N2F = torch.empty((N, 2 * F), dtype=gate_up_N2F.dtype, device=gate_up_N2F.device)
    if N and F:
        block = _swiglu_block(F)
        _swiglu_bwd[(N, triton.cdiv(F, block))](
            dgate_up_N2F, dy_NF, gate_up_N2F, dgate_up_N2F.stride(0), dy_NF.stride(0), gate_up_N2F.stride(0),
            F, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return dgate_up_N2F
