"""LM head + cross-entropy, forward + backward at the paper's 126,464-token vocabulary: eager
`F.cross_entropy(F.linear(x, W).float())` (full logits) against the chunked reference, and
the Triton path on CUDA. Peak memory and ms of each, side by side from one run.

Shapes (N tokens, H hidden, V vocabulary), 1/8 of the targets ignored:
  CPU   N 2,048, H 256, fp32 (what training on a CPU runs: precision auto stays fp32 there);
        eager's full logits are 1 GB, each pass ~400 GFLOP: the run takes about 100 s on
        one thread of this 2-core machine
  CUDA  N 16,384, H 2,048, bf16 (the paper preset's hidden, 4 rows of 4,096 tokens)
  quick N 256, H 64, V 4,096 (shows the command works; measures little)

Peak memory is what the step adds on top of its inputs (x, W): on a CPU each
implementation runs in a fresh interpreter, which resets its peak resident set after
building the inputs (/proc/self/clear_refs) and reads it back after the runs (VmHWM); on
CUDA torch.cuda.max_memory_allocated after a reset. Both count the gradients of x and W,
which every implementation must produce.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time

import torch

from uniloom.kernels.linear_ce import default_chunk_rows, eager_linear_cross_entropy, linear_cross_entropy

VOCAB = 126464


def shape(device: torch.device, quick: bool) -> tuple[int, int, int, torch.dtype]:
    if quick:
        return 256, 64, 4096, torch.float32
    if device.type == "cuda":
        return 16384, 2048, VOCAB, torch.bfloat16
    return 2048, 256, VOCAB, torch.float32


def _inputs(N: int, H: int, V: int, dtype: torch.dtype, device: str):
    """x, W (requiring grad) and targets, filled in place: no transient copies that would
    raise a peak measured after them."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(N, H, dtype=dtype, device=device).normal_(generator=g).requires_grad_()
    w = torch.empty(V, H, dtype=dtype, device=device).normal_(std=H**-0.5, generator=g).requires_grad_()
    target = torch.randint(0, V, (N,), generator=g, device=device)
    target[::8] = -100
    return x, w, target


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def measure(name: str, N: int, H: int, V: int, dtype: str, device: str, repeats: int, threads: int) -> dict:
    """ms (median of `repeats` after a warm-up), peak MB over its inputs and the loss of
    one forward + backward (grads of x and W) of implementation `name`."""
    torch.set_num_threads(threads)
    cuda = device == "cuda"
    x, w, target = _inputs(N, H, V, getattr(torch, dtype), device)
    if name == "eager":
        fn = eager_linear_cross_entropy
    else:
        fn = lambda *a: linear_cross_entropy(*a, triton=name == "triton")  # noqa: E731
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # peak resident set := current
            f.write("5")
        base = _kib("VmRSS") * 1024
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss, _ = fn(x, w, target)
        torch.autograd.grad(loss, (x, w))
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() if cuda else _kib("VmHWM") * 1024
    return {"ms": statistics.median(times[1:]), "peak_mb": (peak - base) / 2**20, "loss": loss.item()}


def _measure_in_fresh_process(*args) -> dict:
    code = (
        "import json, sys\n"
        "from uniloom.kernels.benchmarks.linear_ce import measure\n"
        "print(json.dumps(measure(*json.loads(sys.argv[1]))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"linear_ce benchmark of {args[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(device, quick: bool = False) -> dict[str, float]:
    device = torch.device(device)
    N, H, V, dtype = shape(device, quick)
    repeats = 3
    names = ["eager", "reference"] + (["triton"] if device.type == "cuda" else [])
    args = (N, H, V, str(dtype).removeprefix("torch."), device.type, repeats, torch.get_num_threads())
    if device.type == "cuda":
        figures = {name: measure(name, *args) for name in names}
    else:
        figures = {name: _measure_in_fresh_process(name, *args) for name in names}
    eager = figures["eager"]
    out = {"tokens": N, "hidden": H, "vocab": V, "chunk_rows": default_chunk_rows(N, H, V)}
    for name, f in figures.items():
        out[f"{name}_ms"] = round(f["ms"], 2)
        out[f"{name}_peak_mb"] = round(f["peak_mb"], 1)
        if name != "eager":
            out[f"{name}_time_ratio"] = round(f["ms"] / eager["ms"], 3)
            out[f"{name}_peak_ratio"] = round(f["peak_mb"] / eager["peak_mb"], 4)
            out[f"{name}_loss_diff"] = abs(f["loss"] - eager["loss"])
    if "triton" in figures:
        out["triton_speedup"] = round(figures["reference"]["ms"] / figures["triton"]["ms"], 3)
    return out
