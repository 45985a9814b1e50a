"""`make gpu-check`: what a GPU owes the project, measured in one go, in at most 8 minutes
on one GPU (GPU time is scarce: this is ready and tested before it first meets one).

    1. the data stage's MingTok encoder (the encoder actor's own `Encoder.encode`: pinned
       staging, bf16) at the base preset's 256 px: images/s on one GPU
    2. `uniloom bench train --preset base --profile`: tokens/s of the real training loop,
       model FLOPs per token, MFU against the GPU's dense bf16 peak, peak memory, and where
       the plain loop's time goes (the GPU's busy share, matmul share, top kernels)
    3. the GPU tests (tests/gpu, pytest), one file per step: the data stage with a GPU
       encoder actor, MingTok training steps, unified training with ZeRO 2 and expert
       parallelism on one GPU, a resume, generate and edit

then one summary with the issue's targets beside the figures (MFU >= 35% for base on one
GPU; >= 2,000 images/s per GPU encoding at 256 px). The figures come first: on an H200
(2026-12-04) the encoder took 31 s, the bench 145 s and the three test files about 300 s.
Each step has its own time limit and the whole plan DEADLINE_S: a step gets what is left of
it when less than its own limit, and one that runs out is reported as timed out (with the
tests that passed before). Without CUDA it says so and runs nothing (exit 2); --dry-run
prints the plan on any machine.

    python -m uniloom.pipelines.gpu_check [--dry-run] [--compile]

--compile adds `bench train --compile` (the plain loop with train.compile, side by side:
compile_speedup); its compiling warm-up leaves the tests less of the deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"full_mfu": 0.35, "encode_images_per_s_per_gpu": 2000.0}
NO_CUDA_EXIT = 2
DEADLINE_S = 8 * 60
GPU_TESTS = ("data", "tokenizer", "train")  # tests/gpu/test_{name}_gpu.py


@dataclass
class Step:
    name: str
    limit_s: int
    argv: list[str]


def steps(python: str = sys.executable, compile: bool = False) -> list[Step]:
    """The plan; `compile`: the bench also times the plain loop with train.compile on
    (compile_speedup), which its warm-up pays for in compile time (the tests then get
    less of the deadline)."""
    uniloom = str(Path(python).with_name("uniloom"))
    bench = [uniloom, "bench", "train", "--preset", "base", "--images", "1024", "--steps", "4", "--rounds", "1",
             "--profile", *(["--compile"] if compile else []), "--json"]  # fmt: skip
    # limits from an H200 run (2026-12-04): the train file took 216 s
    tests = [Step(f"gpu tests: {name}", limit, [python, "-m", "pytest", "-v", "-rs", "--durations=5",
                                                str(REPO / "tests" / "gpu" / f"test_{name}_gpu.py")])
             for name, limit in zip(GPU_TESTS, (90, 90, 260))]  # fmt: skip
    return [
        Step("encoder images/s", 40, [python, "-m", "uniloom.pipelines.gpu_check", "--encode"]),
        # one warm-up and one timed window of 4 optimizer steps per side (4 x 8,192 tokens each)
        Step("bench train (base)", 260 if compile else 200, bench),
        *tests,
    ]  # fmt: skip


def encode_rate(seconds: float = 15.0) -> dict[str, float]:
    """Images/s of the data stage's encoder actor code on this process's GPU, at the base
    preset's MingTok and exec settings (random weights: the speed does not depend on them)."""
    import tempfile
    from dataclasses import asdict

    import numpy as np
    import torch

    from uniloom.pipelines.config import load_config
    from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights

    cfg = load_config("base")
    e = cfg.data.exec
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_random_weights(cfg.mingtok, f"{tmp}/mingtok.safetensors")
        exec_cfg = {**asdict(e), "actor_gpus": 1.0}
        encoder = Encoder(
            asdict(cfg.mingtok), weights, {}, exec_cfg, cfg.data.latent_dtype, cfg.data.precision
        )
    S = cfg.mingtok.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (4 * e.encode_batch, S, S, 3), dtype=np.uint8)
    encoder.encode(pixels[: e.encode_batch])  # warm-up: kernels chosen, memory allocated
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.encode(pixels)  # returns host arrays: the GPU has finished
        images += len(pixels)
    rate = images / (time.perf_counter() - start)
    return {
        "encode_images_per_s_per_gpu": round(rate, 1),
        "encode_batch": e.encode_batch,
        "encode_precision": encoder.precision,
        "encode_device": torch.cuda.get_device_name(),
    }


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _passed(text: str) -> str:
    """The tests a (verbose) pytest output says passed: what a timed-out step did finish."""
    names = [line.split(" PASSED")[0].rsplit("::", 1)[-1] for line in text.splitlines() if " PASSED" in line]
    return f"{len(names)} passed before: {', '.join(names) or 'none'}"


def run(plan: list[Step], echo=print, deadline_s: float = DEADLINE_S) -> tuple[dict, bool]:
    """Run the plan's steps in order, each within its limit and what is left of the
    deadline; (summary, all passed)."""
    summary, ok = {}, True
    begin = time.perf_counter()
    for step in plan:
        limit = min(step.limit_s, deadline_s - (time.perf_counter() - begin))
        if limit <= 0:
            summary[step.name] = f"NOT RUN: the {deadline_s:g} s deadline was spent"
            ok = False
            continue
        echo(f"== {step.name} (limit {limit:.0f} s): {' '.join(step.argv)}")
        start = time.perf_counter()
        try:
            proc = subprocess.run(step.argv, cwd=REPO, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:  # its output so far comes as bytes
            out = (e.stdout or b"").decode(errors="replace")
            echo(out[-3000:])
            summary[step.name] = f"TIMED OUT after {limit:.0f} s"
            if step.name.startswith("gpu tests"):
                summary[step.name] += f" ({_passed(out)})"
            ok = False
            continue
        seconds = round(time.perf_counter() - start, 1)
        if step.name.startswith("gpu tests"):
            echo(proc.stdout[-6000:])
            tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
            summary[step.name] = f"{tail[0].strip('= ')} ({seconds} s)"
        else:
            figures = _last_json(proc.stdout)
            echo(json.dumps(figures))  # every figure the step printed, not only the summary's
            summary.update(figures)
            summary[step.name] = f"{'done' if proc.returncode == 0 else 'FAILED'} ({seconds} s)"
        if proc.returncode != 0:
            echo(proc.stderr[-4000:])
            ok = False
    return summary, ok


def report(summary: dict) -> list[str]:
    """The figures the issue asks for, each with its target where it has one."""
    lines = []
    for key in ("full_mfu", "plain_mfu", "compiled_mfu", "compile_speedup", "peak_bf16_tflops",
                "full_tokens_per_s_per_worker", "plain_tokens_per_s", "ratio", "full_model_flops_per_tok",
                "full_tflops_per_s_per_worker", "timed_seconds_per_side", "peak_memory_gib", "device", "profile_gpu_busy_share",
                "profile_matmul_share", "profile_attention_share", "profile_kernels_per_step",
                "encode_images_per_s_per_gpu", "encode_precision"):  # fmt: skip
        if key in summary:
            target = TARGETS.get(key)
            value = summary[key]
            verdict = ""
            if target is not None and isinstance(value, (int, float)):
                verdict = f"  (target >= {target:g}: {'met' if value >= target else 'NOT met'})"
            lines.append(f"{key:<32} {value}{verdict}")
    lines += [f"{k:<32} {v}" for k, v in summary.items() if k in {s.name for s in steps()}]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="Print the plan and its limits; run nothing.")
    parser.add_argument(
        "--encode", action="store_true", help="Step 1 alone: print the encoder's images/s as JSON."
    )
    parser.add_argument(
        "--compile", action="store_true", help="The bench also times the plain loop compiled (train.compile)."
    )
    args = parser.parse_args(argv)
    plan = steps(compile=args.compile)
    if args.dry_run:
        for step in plan:
            print(f"{step.name:<20} limit {step.limit_s:>3} s  {' '.join(step.argv)}")
        print(
            f"{'deadline':<20} limit {DEADLINE_S:>3} s (a step gets what is left of it if less than its own)"
        )
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing was run (the GPU figures stay owed)",
              file=sys.stderr)  # fmt: skip
        return NO_CUDA_EXIT
    if args.encode:
        print(json.dumps(encode_rate()))
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    summary, ok = run(plan, echo=lambda line: print(line, flush=True))
    print("\n== gpu-check summary")
    for line in report(summary):
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
