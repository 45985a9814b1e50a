"""`uniloom bench kernels`: every op's benchmark (kernels/benchmarks) and one training step
of the unified model with the chunked linear cross-entropy against eager
`F.cross_entropy(x @ W.T)`, measured side by side in one run.

The step comparison builds the preset's model twice with the same weights, optimizer and
batch; the two differ only in `UniVision.text_loss`. Windows of steps alternate between
them, so drift of a shared machine (other processes, clocks) lands on both.
"""

from __future__ import annotations

import copy
import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from uniloom.pipelines.config import UniloomConfig

OPS = ("linear_ce", "rms_norm", "flow_block", "moe")


def batch_for(cfg: UniloomConfig, seed: int = 0):
    """A packed batch of the preset's row shape: the train mix's kinds of sample (caption,
    VQA, text-to-image, a 2-round edit, text) with random ids and latents, and the
    semantic features standing in for MingTok's (P, D)."""
    from uniloom.models import sequence as seq

    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    tokens = cfg.mingtok.num_tokens

    def ids(n: int) -> list[int]:
        return torch.randint(16, m.vocab_size, (n,), generator=g).tolist()

    def latents():
        return torch.randn(tokens, m.latent_dim, generator=g)

    kinds = [
        lambda: seq.text_to_image(ids(12), latents()),
        lambda: seq.understanding(latents(), ids(8), ids(3)),
        lambda: seq.understanding(latents(), [], ids(14)),
        lambda: seq.editing(latents(), [(ids(6), latents()), (ids(6), latents())]),
        lambda: seq.text_only(ids(40)),
    ]
    samples: list = []
    while True:  # fill the preset's micro-batch of rows, no more
        sample = kinds[len(samples) % len(kinds)]()
        if seq.pack([*samples, sample], cfg.train.seq_len).input_ids.shape[0] > cfg.train.micro_batch:
            break
        samples.append(sample)
    batch = seq.pack(samples, cfg.train.seq_len)
    features = torch.randn(int(batch.image_mask.sum()), m.semantic_dim, generator=g)
    return batch, features


def train_step_comparison(cfg: UniloomConfig, device: str, steps: int, rounds: int) -> dict[str, Any]:
    """ms per optimizer step (forward, backward, AdamW) of the chunked text loss (the
    model's) and of eager full-logits cross-entropy, alternating windows of `steps`."""
    from uniloom.kernels.linear_ce import eager_linear_cross_entropy
    from uniloom.models.univision import UniVision
    from uniloom.pipelines.precision import autocast, resolve

    class EagerCE(UniVision):
        def text_loss(self, hidden_MH, targets_M, token_weight_M):
            return eager_linear_cross_entropy(hidden_MH, self.lm_head.weight, targets_M, token_weight_M)

    torch.manual_seed(cfg.train.seed)
    chunked = UniVision(cfg.model).to(device)
    eager = EagerCE(cfg.model).to(device)
    eager.load_state_dict(chunked.state_dict())
    batch, features = batch_for(cfg)
    batch, features = batch.to(device), features.to(device)
    precision = resolve(cfg.train.precision, torch.device(device))
    sides = {}
    for name, model in (("chunked", chunked), ("eager", eager)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.train.weight_decay)
        sides[name] = (model, opt, copy.deepcopy(opt.state_dict()))

    def window(name: str) -> float:
        model, opt, _ = sides[name]
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            with autocast(precision, torch.device(device)):
                loss = model.loss(batch, features).total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - start) * 1000 / steps

    losses = {}
    with torch.no_grad(), autocast(precision, torch.device(device)):
        for name, (model, _, _) in sides.items():
            torch.manual_seed(cfg.train.seed)  # the flow head's noise and timesteps, equal on both
            losses[name] = float(model.loss(batch, features).total)
    for name in sides:  # warm-up: allocations, kernel selection
        window(name)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name in sides:
            times[name].append(window(name))
    chunked_ms, eager_ms = (statistics.median(times[n]) for n in ("chunked", "eager"))
    return {
        "train_step_preset": cfg.preset,
        "train_step_tokens": int(batch.input_ids.numel()),
        "train_step_precision": precision,
        "train_step_chunked_ms": round(chunked_ms, 2),
        "train_step_eager_ms": round(eager_ms, 2),
        "train_step_time_ratio": round(chunked_ms / eager_ms, 3),  # target <= 1.05
        "train_step_loss_diff": abs(losses["chunked"] - losses["eager"]),
    }


def bench_kernels(
    cfg: UniloomConfig, device: str, quick: bool, echo: Callable[[str], None], steps: int = 5, rounds: int = 5
) -> dict[str, Any]:
    summary: dict[str, Any] = {"device": device if device == "cpu" else torch.cuda.get_device_name()}
    for op in OPS:
        echo(f"kernels: {op} on {device}{' (quick)' if quick else ''}")
        figures = importlib.import_module(f"uniloom.kernels.benchmarks.{op}").run(torch.device(device), quick)
        summary.update({k if k.startswith(op) else f"{op}_{k}": v for k, v in figures.items()})
    echo(f"kernels: {cfg.preset} training step, chunked vs eager cross-entropy, {rounds} rounds of {steps}")
    summary.update(train_step_comparison(cfg, device, steps, rounds))
    if device == "cpu":
        summary["triton"] = "not timed: no CUDA device (Triton runs on CPU only in its interpreter)"
    return summary
