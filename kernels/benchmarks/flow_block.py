"""The flow head's block forward + backward: the reference against the Triton kernels, ms
of each side by side from one run, and on CUDA the peak memory each adds.

  flow_block_*         one whole ResBlock (ada, modulated LayerNorm, SwiGLU MLP, gated
                       residual), matmuls included, every parameter's gradient
  flow_block_modln_*   the modulated LayerNorm alone (shift/scale chunks of the ada output)
  flow_block_swiglu_*  the SwiGLU activation alone, on the (N, 2F) w12 output

Shapes (N token-slots, W width, F = the SwiGLU hidden of W at mlp_mult 4):
  CUDA  N 4,096, W 3,072 (F 8,192), the paper preset's head, under bf16 autocast as the
        head trains (x and the condition bf16, as input_proj and the embedders give them)
  CPU   N 512, W 256, fp32 (what training on a CPU runs), the reference only
  quick N 64, W 64
"""

from __future__ import annotations

import torch

from uniloom.kernels.benchmarks.rms_norm import timed
from uniloom.kernels.flow_block import modulated_layer_norm, swiglu
from uniloom.models.flow_head import ResBlock

MLP_MULT = 4.0


def measure(device: torch.device, N: int, W: int, with_triton: bool, repeats: int) -> dict[str, float]:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    torch.manual_seed(0)
    blocks = {impl: ResBlock(W, MLP_MULT, kernels=impl).to(device) for impl in ("reference", "triton")}
    for p in blocks["reference"].parameters():  # the zero-initialised ada would hide the modulation
        torch.nn.init.normal_(p, std=0.02)
    blocks["triton"].load_state_dict(blocks["reference"].state_dict())
    F = blocks["reference"].mlp.w3.in_features
    x, y, dout = randn(N, W).requires_grad_(), randn(N, W).requires_grad_(), randn(N, W)
    ada = randn(N, 3 * W).requires_grad_()
    norm = blocks["reference"].norm
    gate_up, dact = randn(N, 2 * F).requires_grad_(), randn(N, F)
    dh = {dt: dout.to(dt) for dt in (torch.float32, dtype)}  # h is fp32 under CUDA autocast

    def block_step(triton):
        block = blocks["triton" if triton else "reference"]

        def step():
            block.zero_grad(set_to_none=True)
            x.grad = y.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = block(x, y)
            out.backward(dout)

        return step

    def modln_step(triton):
        def step():
            x.grad = ada.grad = norm.weight.grad = norm.bias.grad = None
            shift, scale, _ = ada.chunk(3, dim=-1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                h = modulated_layer_norm(x, norm.weight, norm.bias, shift, scale, norm.eps, triton=triton)
            h.backward(dh[h.dtype])

        return step

    def swiglu_step(triton):
        def step():
            gate_up.grad = None
            swiglu(gate_up, triton=triton).backward(dact)

        return step

    figures: dict[str, float] = {"flow_block_tokens": N, "flow_block_width": W, "flow_block_hidden": F}
    warmup = 10 if cuda else 2
    for name, make in (("flow_block", block_step), ("flow_block_modln", modln_step),
                       ("flow_block_swiglu", swiglu_step)):  # fmt: skip
        figures.update(timed(f"{name}_ref", make(False), device, repeats, warmup))
        if with_triton:
            figures.update(timed(f"{name}_triton", make(True), device, repeats, warmup))
            figures[f"{name}_speedup"] = round(figures[f"{name}_ref_ms"] / figures[f"{name}_triton_ms"], 3)
    return figures


def run(device: torch.device, quick: bool = False) -> dict[str, float]:
    cuda = device.type == "cuda"
    N, W = (64, 64) if quick else (4096, 3072) if cuda else (512, 256)
    return measure(device, N, W, with_triton=cuda, repeats=5 if quick else 10)
