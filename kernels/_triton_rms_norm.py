"""Triton kernels of RMSNorm (kernels/rms_norm.py), Liger-Kernel's layout: one program per
row forward, saving the row's 1/rms; backward in a fixed grid of programs that each walk a
run of rows, keep their share of dweight in fp32 registers and write it as one partial row,
so dweight is a (programs, H) sum afterwards instead of an (N, H) one.

Shape legend: N rows (all leading dims), H the normalised width, P backward programs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from uniloom.kernels import interpreting

MAX_WIDTH = 65536  # one row must fit one block of registers


def row_settings(width: int) -> tuple[int, int]:
    """(block, num_warps) for kernels that hold a whole row of `width` in one block."""
    if width > MAX_WIDTH:
        raise ValueError(f"row width {width} exceeds the {MAX_WIDTH} a row kernel holds in one block")
    block = triton.next_power_of_2(width)
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(rows: int, device: torch.device) -> int:
    """Programs of a row-walking backward: one per SM on a GPU, a few in the interpreter."""
    if device.type == "cuda" and not interpreting():
        return max(1, min(rows, _sm_count(device.index if device.index is not None else 0)))
    return max(1, min(rows, 4))


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) -> (N, width) with unit column stride (a copy only when needed)."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _rms_norm_fwd(Y, X, W, RSTD, stride_y, stride_x, width, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    tl.store(RSTD + row, rstd)
    # As the reference: the normalised row is rounded to x's dtype before the weight.
    xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(
    DX, DW_PARTIAL, DY, X, W, RSTD,
    stride_dx, stride_dy, stride_x, rows, rows_per_program, width,
    COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64 offsets: N * H may pass 2**31
    for row in range(start, tl.minimum(start + rows_per_program, rows)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / width))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * width + cols, dw, mask=mask)


def forward(x: torch.Tensor, weight_H: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """x (..., H) -> y (..., H) of out_dtype, rstd (N,) fp32."""
    H = x.shape[-1]
    x_NH = as_rows(x, H)
    N = x_NH.shape[0]
    y_NH = torch.empty((N, H), dtype=out_dtype, device=x.device)
    rstd_N = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        block, num_warps = row_settings(H)
        _rms_norm_fwd[(N,)](
            y_NH, x_NH, weight_H, rstd_N, y_NH.stride(0), x_NH.stride(0), H, eps,
            BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return y_NH.view(x.shape), rstd_N


def backward(dy: torch.Tensor, x: torch.Tensor, weight_H: torch.Tensor, rstd_N: torch.Tensor, need_dw: bool):
    """dy (..., H) -> dx (..., H) of x's dtype, dweight (H,) of weight's dtype or None."""
    H = x.shape[-1]
    x_NH, dy_NH = as_rows(x, H), as_rows(dy, H)
    N = x_NH.shape[0]
    dx_NH = torch.empty((N, H), dtype=x.dtype, device=x.device)
    if N == 0:
        return dx_NH.view(x.shape), torch.zeros_like(weight_H) if need_dw else None
    P = reduction_programs(N, x.device)
    dw_PH = torch.empty((P, H), dtype=torch.float32, device=x.device) if need_dw else dx_NH
    block, num_warps = row_settings(H)
    _rms_norm_bwd[(P,)](
        dx_NH, dw_PH, dy_NH, x_NH, weight_H, rstd_N,
        dx_NH.stride(0), dy_NH.stride(0), x_NH.stride(0), N, triton.cdiv(N, P), H,
        COMPUTE_DW=need_dw, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return dx_NH.view(x.shape), dw_PH.sum(0).to(weight_H.dtype) if need_dw else None
