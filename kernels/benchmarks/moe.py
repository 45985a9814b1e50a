"""MoE ops forward + backward (kernels/moe.py), side by side from one run:

  moe_routing_permutation_*  route (softmax, top-k, renormalisation, counts), sort the slots
                             by expert, permute x into that order, unpermute (score-weighted
                             sum per token); the experts stand in as a cast to their compute
                             dtype, the loss reads the outputs and the balance term
                             counts * probs.sum(0). eager: the reference (the layer's code)
  moe_grouped_*              the E SwiGLU experts over token-slots sorted by expert: the
                             reference loop of per-expert matmuls, torch's grouped GEMM
                             (F.grouped_mm; it runs on this CPU too, aligned rows), the
                             Triton grouped GEMM (CUDA); every input's gradient

Shapes (T tokens, D hidden, E experts, k per token, F expert FFN; N = T * k slots):
  CUDA  T 4,096, D 2,048, E 64, k 6, F 1,408 (the paper preset's MoE), x fp32 as the
        residual stream feeds it, the experts in bf16 as under autocast
  CPU   T 512, D 512, E 64, k 6, F 256, fp32, no Triton (the interpreter is no speed)
  quick T 64, D 32, E 8, k 2, F 64

`grouped_mm_speedup`: the loop over what the Triton switch runs on CUDA (F.grouped_mm where
it has its fast path, else the Triton GEMM), on a CPU over F.grouped_mm
(`grouped_torch_mm_*`, `grouped_triton_*`: each backend's own figures).
"""

from __future__ import annotations

import torch

from uniloom.kernels import moe
from uniloom.kernels.benchmarks.rms_norm import time_ms


def _routing_permutation_step(device, T, D, E, k, expert_dtype, triton: bool):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, E, generator=g, device=device).requires_grad_()
    x = torch.randn(T, D, generator=g, device=device).requires_grad_()
    d_out = torch.randn(T, D, generator=g, device=device, dtype=expert_dtype)

    def step():
        logits.grad = x.grad = None
        routing = moe.route(logits, k, triton=triton)
        slots = moe.sort_slots(routing.selected_MK, E, triton=triton)
        y_ND = moe.permute(x, slots, triton=triton).to(expert_dtype)
        out_TD = moe.unpermute(y_ND, routing.scores_MK, slots, T, triton=triton)
        balance = (routing.counts_E.float() / (T * k) * routing.probs_ME.sum(0)).sum()
        torch.autograd.backward([out_TD, balance], [d_out, torch.ones((), device=device)])

    return step


def _grouped_step(device, T, D, E, k, F, dtype, backend: str):
    g = torch.Generator(device=device).manual_seed(0)
    selected = torch.randn(T, E, generator=g, device=device).topk(k, dim=-1).indices
    counts = torch.bincount(selected.reshape(-1), minlength=E)
    x = torch.randn(T * k, D, generator=g, device=device, dtype=dtype).requires_grad_()
    w = [
        (0.02 * torch.randn(shape, generator=g, device=device)).to(dtype).requires_grad_()
        for shape in ((E, F, D), (E, F, D), (E, D, F))
    ]
    d_out = torch.randn(T * k, D, generator=g, device=device, dtype=dtype)

    def step():
        for t in (x, *w):
            t.grad = None
        moe.grouped_swiglu(x, counts, *w, backend=backend).backward(d_out)

    return step, moe.grouped_backend(True, x, w[0])


def run(device: torch.device, quick: bool = False) -> dict[str, float]:
    cuda = device.type == "cuda"
    T, D, E, k, F = (
        (64, 32, 8, 2, 64) if quick else (4096, 2048, 64, 6, 1408) if cuda else (512, 512, 64, 6, 256)
    )
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats, inner = (3, 2) if quick else (7, 10) if cuda else (5, 2)
    figures: dict[str, float] = {
        "moe_tokens": T,
        "moe_hidden": D,
        "moe_experts": E,
        "moe_top_k": k,
        "moe_ffn": F,
    }

    def timed(step):
        return round(time_ms(step, device, repeats, inner), 4)

    eager = figures["routing_permutation_eager_ms"] = timed(
        _routing_permutation_step(device, T, D, E, k, dtype, triton=False)
    )
    if cuda:
        fused = figures["routing_permutation_triton_ms"] = timed(
            _routing_permutation_step(device, T, D, E, k, dtype, triton=True)
        )
        figures["routing_permutation_speedup"] = round(eager / fused, 3)

    loop_step, switch_backend = _grouped_step(device, T, D, E, k, F, dtype, "loop")
    loop = figures["grouped_loop_ms"] = timed(loop_step)
    names = {"grouped_mm": "grouped_torch_mm", "triton": "grouped_triton"}
    # F.grouped_mm: on CUDA where it has its fast path, on a CPU always (these rows are aligned).
    backends = (
        ["triton"] + (["grouped_mm"] if switch_backend == "grouped_mm" else []) if cuda else ["grouped_mm"]
    )
    for backend in backends:
        ms = figures[f"{names[backend]}_ms"] = timed(_grouped_step(device, T, D, E, k, F, dtype, backend)[0])
        figures[f"{names[backend]}_speedup"] = round(loop / ms, 3)
    figures["grouped_mm_speedup"] = figures[f"{names[switch_backend if cuda else 'grouped_mm']}_speedup"]
    return figures
