"""RMSNorm forward + backward (dx and dweight): the reference against the Triton kernels,
ms of each side by side from one run, and on CUDA the peak memory each adds.

Shapes (N rows, H width):
  CUDA  N 8,192, H 2,048 (the paper preset's hidden): fp32 rows and weight, what the
        decoder's fp32 residual stream feeds its norms under bf16 autocast
        (`rms_norm_speedup`), and bf16 rows and weight (`rms_norm_bf16_speedup`)
  CPU   N 2,048, H 512, fp32, the reference only (the interpreter is no speed)
  quick N 64, H 128
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from uniloom.kernels.rms_norm import rms_norm


def time_ms(step: Callable[[], None], device: torch.device, repeats: int, inner: int) -> float:
    """Median over `repeats` of the mean ms of `inner` calls of `step`, after a warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            step()
        sync()
        samples.append((time.perf_counter() - start) * 1000 / inner)
    return statistics.median(samples)


def peak_mb(step: Callable[[], None], device: torch.device) -> float:
    """CUDA memory one call of `step` adds at its peak over what was allocated before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _case(N: int, H: int, dtype: torch.dtype, device: torch.device, triton: bool, prefix: str, repeats: int):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, H, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(H, generator=g, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(N, H, generator=g, device=device, dtype=dtype)

    def step():
        x.grad = weight.grad = None
        rms_norm(x, weight, 1e-5, triton=triton).backward(dy)

    return timed(prefix, step, device, repeats, warmup=20 if device.type == "cuda" else 3)


def timed(prefix: str, step, device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """`{prefix}_ms` of `step`, and on CUDA the peak memory it adds (`{prefix}_peak_mb`)."""
    figures = {f"{prefix}_ms": round(time_ms(step, device, repeats, warmup), 4)}
    if device.type == "cuda":
        figures[f"{prefix}_peak_mb"] = round(peak_mb(step, device), 1)
    return figures


def measure(device: torch.device, N: int, H: int, with_triton: bool, repeats: int) -> dict[str, float]:
    figures: dict[str, float] = {"rms_norm_rows": N, "rms_norm_width": H}
    cases = [("rms_norm", torch.float32)]
    if device.type == "cuda":
        cases.append(("rms_norm_bf16", torch.bfloat16))
    for name, dtype in cases:
        figures.update(_case(N, H, dtype, device, False, f"{name}_ref", repeats))
        if with_triton:
            figures.update(_case(N, H, dtype, device, True, f"{name}_triton", repeats))
            figures[f"{name}_speedup"] = round(figures[f"{name}_ref_ms"] / figures[f"{name}_triton_ms"], 3)
    return figures


def run(device: torch.device, quick: bool = False) -> dict[str, float]:
    cuda = device.type == "cuda"
    N, H = (64, 128) if quick else (8192, 2048) if cuda else (2048, 512)
    return measure(device, N, H, with_triton=cuda, repeats=5 if quick else 10)
