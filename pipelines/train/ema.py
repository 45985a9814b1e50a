"""An exponential moving average of the trainable weights, for evaluation and export.

After every optimizer step each rank updates the average of the parameters it holds:
the dense ones (a copy on every rank) and its own slice of the experts (expert
parallelism shards them; `expert_rows` says which rows). Checkpoints carry it as the
`ema` kind beside `fp32` (checkpoint.py), written by the ranks that write the weights, so
a resume, on any number of workers, continues the same average; the export takes `ema`
wherever a checkpoint has it.

Only what the stage trains is averaged: a frozen part's average is its weights. A part a
stage starts training begins from its weights; one that trained in the stage before
continues its average across the boundary.

The first updates use a smaller decay, min(decay, (1 + n) / (10 + n)) after n updates
(0.87 after 60, 0.98 after 460; 0.99 from 890 on): with 0.99 alone, half of a 60-step
first stage's average would still be the random initial weights.
"""

from __future__ import annotations

import contextlib

import torch

from uniloom.pipelines.train import checkpoint as ckpt

KIND = "ema"


class WeightEma:
    def __init__(self, module: torch.nn.Module, decay: float, updates: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, updates
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    def rate(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- rate * shadow + (1 - rate) * weights; after each optimizer step."""
        names = list(self.shadow)
        weights = [self.params[n].detach().float() for n in names]
        torch._foreach_lerp_([self.shadow[n] for n in names], weights, 1.0 - self.rate())
        self.updates += 1

    def load(self, reader: ckpt.Reader) -> None:
        """Continue the averages the checkpoint has (this rank's slice of each); a
        parameter it has none of keeps starting from its weights."""
        for name, p in self.params.items():
            if reader.has(name, KIND):
                full = reader.full(name, KIND)
                self.shadow[name] = ckpt._local(p, full, reader.shapes[name]).clone().to(p.device)

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in place of the trained ones, for a while (evaluation)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])


def start(module: torch.nn.Module, decay: float, reader: ckpt.Reader | None) -> WeightEma | None:
    """The stage's EMA (None when `decay` is 0), continued from `reader`'s checkpoint."""
    if not decay:
        return None
    ema = WeightEma(module, decay, reader.meta.get("ema_updates", 0) if reader is not None else 0)
    if reader is not None:
        ema.load(reader)
    return ema
