"""The flow head's block (models/flow_head.py):

    ResBlock    x + gate * w3(swiglu(w12(modulate(layer_norm(x), shift, scale))))
    FinalLayer  linear(modulate(layer_norm(x), shift, scale)), the norm without affine

with modulate(n, shift, scale) = n * (1 + scale) + shift (adaptive LayerNorm, shift/scale/
gate from the time + condition embedding) and swiglu(gu) = silu(gate) * up over the two
halves of w12's output. Two fused ops, each a reference (today's math) and a Triton path:

    modulated_layer_norm  LayerNorm (affine or not) + modulation: one pass over x forward,
                          one backward giving dx, dscale, the norm's dweight/dbias (dshift
                          is the incoming gradient itself)
    swiglu                silu(gate) * up forward, both gradients backward, reading and
                          writing the (N, 2F) w12 output whole, so the chunk costs no copy

The matmuls and the gated residual x + gate * m stay in PyTorch: fusing the residual would
save about three passes over (N, W), little next to the block's three matmuls.

Dtypes follow the reference under torch.autocast: autocast runs layer_norm in fp32 on CUDA
and leaves it alone on the CPU, and the modulation promotes with shift's and scale's
dtypes; swiglu keeps its input's dtype.

Shape legend: N rows (tokens x flow samples), W head width, F SwiGLU hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def modulate(x_NW, shift_NW, scale_NW):
    return x_NW * (1 + scale_NW) + shift_NW


def modulated_layer_norm_reference(x_NW, weight_W, bias_W, shift_NW, scale_NW, eps: float):
    return modulate(F.layer_norm(x_NW, x_NW.shape[-1:], weight_W, bias_W, eps), shift_NW, scale_NW)


def swiglu_reference(gate_up_N2F):
    gate_NF, up_NF = gate_up_N2F.chunk(2, dim=-1)
    return F.silu(gate_NF) * up_NF


def _norm_dtype(x_NW: torch.Tensor) -> torch.dtype:
    if x_NW.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return x_NW.dtype


class ModulatedLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NW, weight_W, bias_W, shift_NW, scale_NW, eps):
        from uniloom.kernels import _triton_flow_block

        out_dtype = torch.promote_types(
            torch.promote_types(_norm_dtype(x_NW), scale_NW.dtype), shift_NW.dtype
        )
        h_NW, mean_N, rstd_N = _triton_flow_block.modulated_ln_forward(
            x_NW, weight_W, bias_W, shift_NW, scale_NW, eps, out_dtype
        )
        ctx.save_for_backward(x_NW, weight_W, bias_W, scale_NW, mean_N, rstd_N)
        ctx.shift_dtype = shift_NW.dtype
        return h_NW

    @staticmethod
    def backward(ctx, dh_NW):
        from uniloom.kernels import _triton_flow_block

        x_NW, weight_W, bias_W, scale_NW, mean_N, rstd_N = ctx.saved_tensors
        dx_NW, dscale_NW, dweight_W, dbias_W = _triton_flow_block.modulated_ln_backward(
            dh_NW, x_NW, weight_W, bias_W, scale_NW, mean_N, rstd_N
        )
        return dx_NW, dweight_W, dbias_W, dh_NW.to(ctx.shift_dtype), dscale_NW, None


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up_N2F):
        from uniloom.kernels import _triton_flow_block

        ctx.save_for_backward(gate_up_N2F)
        y_NF = _triton_flow_block.swiglu_forward(gate_up_N2F)
        return y_NF.view(*gate_up_N2F.shape[:-1], y_NF.shape[-1])

    @staticmethod
    def backward(ctx, dy_NF):
        from uniloom.kernels import _triton_flow_block

        (gate_up_N2F,) = ctx.saved_tensors
        return _triton_flow_block.swiglu_backward(dy_NF, gate_up_N2F).view(gate_up_N2F.shape)


def modulated_layer_norm(
    x_NW: torch.Tensor,
    weight_W: torch.Tensor | None,
    bias_W: torch.Tensor | None,
    shift_NW: torch.Tensor,
    scale_NW: torch.Tensor,
    eps: float,
    *,
    triton: bool = False,
) -> torch.Tensor:
    """modulate(layer_norm(x), shift, scale) over the last dim of x (N, W); weight and bias
    (W,) are the norm's affine parameters, None for a norm without them."""
    if x_NW.dim() != 2 or shift_NW.shape != x_NW.shape or scale_NW.shape != x_NW.shape:
        raise ValueError(
            f"modulated_layer_norm: x, shift and scale must be one (N, W) shape, got {tuple(x_NW.shape)}, "
            f"{tuple(shift_NW.shape)}, {tuple(scale_NW.shape)}"
        )
    for name, p in (("weight", weight_W), ("bias", bias_W)):
        if p is not None and p.shape != x_NW.shape[-1:]:
            raise ValueError(
                f"modulated_layer_norm: {name} of shape {tuple(p.shape)} for width {x_NW.shape[-1]}"
            )
    if not triton:
        return modulated_layer_norm_reference(x_NW, weight_W, bias_W, shift_NW, scale_NW, eps)
    return ModulatedLayerNormFunction.apply(x_NW, weight_W, bias_W, shift_NW, scale_NW, eps)


def swiglu(gate_up_N2F: torch.Tensor, *, triton: bool = False) -> torch.Tensor:
    """silu(gate) * up of w12's output (..., 2F) = [gate | up] -> (..., F)."""
    if gate_up_N2F.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {gate_up_N2F.shape[-1]} is not [gate | up] of two equal halves")
    if not triton:
        return swiglu_reference(gate_up_N2F)
    return SwiGLUFunction.apply(gate_up_N2F)
