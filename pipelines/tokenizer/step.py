"""One masked-image-modeling step of MingTok, free of any engine: masking, the schedule,
the optimiser, the teachers' targets and the update. The Ray Train loop (loop.py) drives
it; so can a plain script."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.mingtok_loss import LossWeights, MIMObjective
from uniloom.pipelines import device, precision
from uniloom.pipelines.tokenizer.config import TokenizerConfig
from uniloom.pipelines.tokenizer.teachers import Teachers


class MIMStep(nn.Module):
    """Tokenizer and training heads in one module, so DDP wraps (and syncs) both."""

    def __init__(self, model: MingTok, objective: MIMObjective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, images, mask, latent_targets, semantic_targets, text_table, caption, weights):
        return self.objective(
            self.model, images, mask, latent_targets, semantic_targets, text_table, caption, weights
        )


def loss_weights(t: TokenizerConfig) -> LossWeights:
    return LossWeights(**{f.name: getattr(t, f"weight_{f.name}") for f in fields(LossWeights)})


def random_mask(batch: int, tokens: int, t: TokenizerConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, N) bool: the first masked_fraction of the rows (at least one when it is above
    zero, so small per-worker batches still train the masked losses) mask mask_ratio of
    their patches."""
    rows = max(1, round(batch * t.masked_fraction)) if t.masked_fraction > 0 else 0
    count = round(tokens * t.mask_ratio)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    if rows and count:
        order = torch.rand(rows, tokens, generator=generator).argsort(dim=1)[:, :count]
        mask[:rows].scatter_(1, order, True)
    return mask


def learning_rate(t: TokenizerConfig, step: int) -> float:
    """Warmup, then cosine decay over the step budget: a run the wall-clock safety cap ends
    early stops on the schedule's way down, it does not get a compressed schedule."""
    warm = min(1.0, (step + 1) / max(t.warmup_steps, 1))
    progress = min(step / max(t.steps, 1), 1.0)
    cosine = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr * warm * cosine


class MIMTraining:
    """Model, heads, teachers and optimiser of one worker, and the step that updates them,
    on `where` ("cpu" or "cuda": tokenizer.device resolved on the worker's machine). The
    weights are made on the CPU from the seed, so every device starts from the same ones."""

    def __init__(self, mcfg: MingTokConfig, t: TokenizerConfig, text_table: np.ndarray, where: str = "cpu"):
        torch.manual_seed(t.seed)  # identical initial weights on every worker
        self.t = t
        self.model = MingTok(mcfg)
        self.teachers = Teachers(t.teacher, t.semantic_teacher, self.model, t.ema_decay)
        objective = MIMObjective(self.model, self.teachers.latent_dim, self.teachers.semantic_dim,
                                 np.shape(text_table)[1])  # fmt: skip
        self.module = MIMStep(self.model, objective).to(where)
        self.teachers.to(where)
        self.device = device.device_of(self.module)
        self.precision = precision.resolve(t.precision, self.device)  # auto: bf16 on CUDA, measured on a CPU
        # a copy: the table arrives read-only from Ray's object store, which torch warns about
        self.text = torch.tensor(np.asarray(text_table, dtype=np.float32), device=self.device)  # (U, E)
        self.wrapped: nn.Module = self.module  # DDP goes here when there are several workers
        decay = [p for p in self.module.parameters() if p.ndim >= 2]
        rest = [p for p in self.module.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95))
        self.weights = loss_weights(t)
        self.generator = torch.Generator().manual_seed(t.seed)

    def step(self, images_u8: torch.Tensor, caption: torch.Tensor, step: int) -> dict:
        """One update on uint8 images (B, 3, H, W) with caption indices (B,); returns the
        detached losses, the learning rate and the gradient norm."""
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.t, step)
        # uint8 crosses to the device (a quarter of float32's bytes), then becomes [-1, 1]
        images = images_u8.to(self.device).float().div(127.5).sub(1.0)  # (B, 3, H, W)
        # drawn on the CPU generator, so a seed masks the same patches on every device
        mask = random_mask(len(images), self.model.cfg.num_tokens, self.t, self.generator)
        masked_rows = mask.any(dim=1)  # only masked rows have masked positions to predict
        mask, caption = mask.to(self.device), caption.to(self.device)
        with precision.autocast(self.precision, self.device):
            if masked_rows.any():
                targets = self.teachers.targets(images[masked_rows.to(self.device)])
            else:
                targets = (None, None)
            losses = self.wrapped(images, mask, *targets, self.text, caption, self.weights)
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.t.grad_clip)
        self.opt.step()
        self.teachers.update(self.model)
        out = {f"loss/{k}": v.item() for k, v in losses.items() if k != "recon"}
        return {**out, "lr": self.opt.param_groups[0]["lr"], "grad_norm": float(grad_norm)}

    def save(self, folder: Path, state: dict) -> None:
        torch.save(self.module.state_dict(), folder / "model.pt")
        torch.save(self.opt.state_dict(), folder / "optimizer.pt")
        if self.teachers.ema is not None:
            torch.save(self.teachers.ema.state_dict(), folder / "ema.pt")
        (folder / "state.json").write_text(json.dumps(state))

    def load(self, folder: Path) -> dict:
        """Resume from a checkpoint written on any device, onto this one."""
        read = lambda name: torch.load(folder / name, weights_only=True, map_location=self.device)  # noqa: E731
        self.module.load_state_dict(read("model.pt"))
        self.opt.load_state_dict(read("optimizer.pt"))
        if self.teachers.ema is not None and (folder / "ema.pt").is_file():
            self.teachers.ema.load_state_dict(read("ema.pt"))
        state = json.loads((folder / "state.json").read_text())
        self.generator.manual_seed(self.t.seed + state["step"])  # fresh masks after a resume
        return state
