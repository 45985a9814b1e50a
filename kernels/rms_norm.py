"""RMSNorm over the last dim: y = (x / rms(x)) rounded to x's dtype, times the weight.

The reference is the decoder's original math (models/transformer.py), statistics in fp32;
the result dtype is x's promoted with the weight's, as `xf.to(x.dtype) * weight` gives
(fp32 for a bf16 x and an fp32 weight). The Triton path (kernels/_triton_rms_norm.py)
computes the same in one pass over x forward and one backward, saving 1/rms per row.

Shape legend: x_H (..., H) any leading dims, H the normalised width.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x_H: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x_H.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x_H.dtype) * weight_H


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_H, weight_H, eps):
        from uniloom.kernels import _triton_rms_norm

        out_dtype = torch.promote_types(x_H.dtype, weight_H.dtype)
        y_H, rstd_N = _triton_rms_norm.forward(x_H, weight_H, eps, out_dtype)
        ctx.save_for_backward(x_H, weight_H, rstd_N)
        return y_H

    @staticmethod
    def backward(ctx, dy_H):
        from uniloom.kernels import _triton_rms_norm

        x_H, weight_H, rstd_N = ctx.saved_tensors
        dx_H, dweight_H = _triton_rms_norm.backward(dy_H, x_H, weight_H, rstd_N, ctx.needs_input_grad[1])
        return dx_H, dweight_H, None


def rms_norm(x_H: torch.Tensor, weight_H: torch.Tensor, eps: float, *, triton: bool = False) -> torch.Tensor:
    """RMSNorm of x (..., H) with weight (H,); `triton` picks the fused kernels (the caller
    resolves it with `uniloom.kernels.use_triton`)."""
    if weight_H.shape != x_H.shape[-1:]:
        raise ValueError(
            f"rms_norm: weight of shape {tuple(weight_H.shape)} for rows of width {x_H.shape[-1]}"
        )
    if not triton:
        return rms_norm_reference(x_H, weight_H, eps)
    return RMSNormFunction.apply(x_H, weight_H, eps)
