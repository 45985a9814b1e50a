"""One training step of a tokenizer, free of any engine: the schedule, the optimiser and
the update, and per kind (`TRAININGS`) its objective: MingTok's masked image modeling
(masking, the teachers' targets), UniTok's reconstruction + quantization + contrastive
loss with dead-code restarts, TUNA's VAE. The Ray Train loop (loop.py) drives it; so can
a plain script."""

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
from uniloom.models.tuna import Tuna, TunaConfig
from uniloom.models.unitok import UniTok, UniTokConfig
from uniloom.models.unitok_loss import LossWeights as UniTokLossWeights
from uniloom.models.unitok_loss import UniTokObjective
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


class TokenizerTraining:
    """A tokenizer's training heads and optimiser on one worker, on `where` ("cpu" or
    "cuda": tokenizer.device resolved on the worker's machine), and the step that updates
    them; a kind's subclass gives its losses. The weights are made on the CPU from the
    seed, so every device and worker starts from the same ones; only parameters that
    require a gradient are optimised."""

    def __init__(self, model: nn.Module, module: nn.Module, t: TokenizerConfig, where: str):
        self.t = t
        self.model = model
        self.module = module.to(where)
        self.device = device.device_of(self.module)
        self.precision = precision.resolve(t.precision, self.device)  # auto: bf16 on CUDA, measured on a CPU
        self.wrapped: nn.Module = self.module  # DDP goes here when there are several workers
        trained = [p for p in self.module.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        rest = [p for p in trained if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95))
        self.generator = torch.Generator().manual_seed(t.seed)

    def losses(self, images: torch.Tensor, caption: torch.Tensor) -> dict[str, torch.Tensor]:
        """The kind's losses of images (B, 3, H, W) in [-1, 1], under autocast; "total" is
        optimised, the other scalars logged."""
        raise NotImplementedError

    def after_step(self, losses: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Work after the optimizer step (teachers, codebooks); returns metrics to log."""
        return {}

    def step(self, images_u8: torch.Tensor, caption: torch.Tensor, step: int) -> dict:
        """One update on uint8 images (B, 3, H, W) with caption indices (B,); returns the
        detached losses, the learning rate and the gradient norm."""
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.t, step)
        # uint8 crosses to the device (a quarter of float32's bytes), then becomes [-1, 1]
        images = images_u8.to(self.device).float().div(127.5).sub(1.0)  # (B, 3, H, W)
        with precision.autocast(self.precision, self.device):
            losses = self.losses(images, caption.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        params = [p for group in self.opt.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip)
        self.opt.step()
        extra = self.after_step(losses, step)
        out = {f"loss/{k}": v.item() for k, v in losses.items() if v.ndim == 0}
        return {**out, **extra, "lr": self.opt.param_groups[0]["lr"], "grad_norm": float(grad_norm)}

    def extra_state(self) -> dict[str, nn.Module]:
        """Modules saved beside the trained one (file stem -> module)."""
        return {}

    def save(self, folder: Path, state: dict) -> None:
        torch.save(self.module.state_dict(), folder / "model.pt")
        torch.save(self.opt.state_dict(), folder / "optimizer.pt")
        for name, module in self.extra_state().items():
            torch.save(module.state_dict(), folder / f"{name}.pt")
        (folder / "state.json").write_text(json.dumps(state))

    def load(self, folder: Path) -> dict:
        """Resume from a checkpoint written on any device, onto this one."""
        read = lambda name: torch.load(folder / name, weights_only=True, map_location=self.device)  # noqa: E731
        self.module.load_state_dict(read("model.pt"))
        self.opt.load_state_dict(read("optimizer.pt"))
        for name, module in self.extra_state().items():
            if (folder / f"{name}.pt").is_file():
                module.load_state_dict(read(f"{name}.pt"))
        state = json.loads((folder / "state.json").read_text())
        self.generator.manual_seed(self.t.seed + state["step"])  # fresh draws after a resume
        return state


class MIMTraining(TokenizerTraining):
    """MingTok's masked image modeling: model, heads, teachers."""

    def __init__(self, mcfg: MingTokConfig, t: TokenizerConfig, text_table: np.ndarray, where: str = "cpu"):
        torch.manual_seed(t.seed)  # identical initial weights on every worker
        model = MingTok(mcfg)
        self.teachers = Teachers(t.teacher, t.semantic_teacher, model, t.ema_decay)
        objective = MIMObjective(model, self.teachers.latent_dim, self.teachers.semantic_dim,
                                 np.shape(text_table)[1])  # fmt: skip
        super().__init__(model, MIMStep(model, objective), t, where)
        self.teachers.to(where)
        # a copy: the table arrives read-only from Ray's object store, which torch warns about
        self.text = torch.tensor(np.asarray(text_table, dtype=np.float32), device=self.device)  # (U, E)
        self.weights = loss_weights(t)

    def losses(self, images, caption):
        # drawn on the CPU generator, so a seed masks the same patches on every device
        mask = random_mask(len(images), self.model.cfg.num_tokens, self.t, self.generator)
        masked_rows = mask.any(dim=1)  # only masked rows have masked positions to predict
        mask = mask.to(self.device)
        if masked_rows.any():
            targets = self.teachers.targets(images[masked_rows.to(self.device)])
        else:
            targets = (None, None)
        losses = self.wrapped(images, mask, *targets, self.text, caption, self.weights)
        return {k: v for k, v in losses.items() if k != "recon"}

    def after_step(self, losses, step):
        self.teachers.update(self.model)
        return {}

    def extra_state(self):
        return {"ema": self.teachers.ema} if self.teachers.ema is not None else {}


class UniTokStep(nn.Module):
    """UniTok and its text head in one module, so DDP wraps (and syncs) both."""

    def __init__(self, model: UniTok, objective: UniTokObjective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, images, text_table, caption, weights):
        return self.objective(self.model, images, text_table, caption, weights)


class UniTokTraining(TokenizerTraining):
    """UniTok's objective (models/unitok_loss.py, the paper's weights without LPIPS and GAN),
    then dead-code restarts. Restarts are the same on every worker: each entry's idle count
    is the minimum over the workers (it is idle only where no worker chose it), the
    features are gathered from all of them, and the draw is seeded by the step."""

    def __init__(self, ucfg: UniTokConfig, t: TokenizerConfig, text_table: np.ndarray, where: str = "cpu"):
        torch.manual_seed(t.seed)
        model = UniTok(ucfg)
        super().__init__(model, UniTokStep(model, UniTokObjective(model, np.shape(text_table)[1])), t, where)
        self.text = torch.tensor(np.asarray(text_table, dtype=np.float32), device=self.device)  # (U, E)
        self.weights = UniTokLossWeights()

    def losses(self, images, caption):
        out = self.wrapped(images, self.text, caption, self.weights)
        self._features, self._usage, self._perplexity = out["features"], out["usage"], out["perplexity"]
        return {k: out[k] for k in ("total", "pixel_l1", "pixel_l2", "vq", "text")}

    def after_step(self, losses, step):
        import torch.distributed as dist

        features = self._features
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            where = device.collective_device()
            unused = self.model.quantizer.unused
            shared = unused.to(where)
            dist.all_reduce(shared, op=dist.ReduceOp.MIN)
            unused.copy_(shared.to(unused.device))
            gathered = [torch.empty_like(features, device=where) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, features.to(where))
            features = torch.cat(gathered).to(features.device)
        restarts = self.model.restart_dead_codes(
            features, torch.Generator().manual_seed(self.t.seed * 100003 + step)
        )
        out = {"codebook/restarts": float(restarts.sum())}
        for k in range(len(restarts)):
            out[f"codebook/usage_{k}"] = float(self._usage[k])
            out[f"codebook/perplexity_{k}"] = float(self._perplexity[k])
        return out


class TunaVAEStep(nn.Module):
    def __init__(self, model: Tuna):
        super().__init__()
        self.model = model

    def forward(self, images, generator):
        losses = self.model.vae_loss(images, generator)
        return {"total": losses.total, "recon": losses.recon, "kl": losses.kl}


class TunaTraining(TokenizerTraining):
    """TUNA's VAE alone (reconstruction + KL); the representation encoder, connector and
    velocity head stay at their initialisation here and train in the unified model, on
    the flow and text losses, as in TUNA (models/tuna.py)."""

    def __init__(self, tcfg: TunaConfig, t: TokenizerConfig, text_table: np.ndarray, where: str = "cpu"):
        del text_table  # TUNA's tokenizer has no text term
        torch.manual_seed(t.seed)
        model = Tuna(tcfg)
        model.requires_grad_(False)
        for part in (model.vae_encoder, model.vae_moments, model.vae_decoder, model.vae_pixels):
            part.requires_grad_(True)
        super().__init__(model, TunaVAEStep(model), t, where)

    def losses(self, images, caption):
        return self.wrapped(images, self.generator)


TRAININGS: dict[str, type[TokenizerTraining]] = {
    "mingtok": MIMTraining,
    "unitok": UniTokTraining,
    "tuna": TunaTraining,
}
