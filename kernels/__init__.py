"""Fused ops of the unified model: each a Triton kernel, a plain PyTorch reference, an
autograd wrapper, a test comparing the two forward and backward (tests/kernels, on the CPU
under TRITON_INTERPRET=1) and a benchmark (kernels/benchmarks, `uniloom bench kernels`).

    linear_ce.py    LM head + cross-entropy, chunked over tokens: the (N, V) logits never exist whole
    rms_norm.py     RMSNorm
    flow_block.py   the flow head's adaptive LayerNorm modulation and SwiGLU
    moe.py          router softmax/top-k/renormalisation/load counts, token permutation
                    into expert order and back, grouped expert matmul

The model picks an implementation through one switch, `model.kernels`:
  auto       Triton on CUDA, the reference elsewhere (the CPU default)
  triton     Triton everywhere: on a CPU only under TRITON_INTERPRET=1 (tests), else an error
  reference  the PyTorch references everywhere

Triton kernels live in modules of their own (`_triton_*.py`) imported only when the Triton
path runs, so the package imports without triton and a CPU run never compiles one.
TRITON_INTERPRET is read when a kernel is defined: it must be set before that import.
"""

from __future__ import annotations

import functools
import importlib.util
import os

MODES = ("auto", "triton", "reference")


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"model.kernels must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


@functools.cache
def have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(mode: str, device) -> bool:
    """Whether the op on tensors of `device` (a torch.device) takes the Triton path under
    `mode`. The package imports without torch: configs validate their mode through it."""
    if check_mode(mode) == "reference":
        return False
    if mode == "auto":
        return device.type == "cuda" and have_triton()
    if not have_triton():
        raise RuntimeError("model.kernels=triton but triton is not installed (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"model.kernels=triton on a {device.type} tensor: Triton launches kernels on CUDA "
            "only; set TRITON_INTERPRET=1 to run them in its (slow) CPU interpreter, or use "
            "model.kernels=auto"
        )
    return True
