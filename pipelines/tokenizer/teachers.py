"""Teachers for MingTok's masked-image-modeling losses, chosen by a spec string:

    ema              an exponential moving average of the tokenizer being trained: its
                     encoder's hidden states (image features) and its semantic decoder's
                     output (text-aligned, since the student's semantic features are pulled
                     towards caption embeddings); the offline default
    hf:<local path>  any Hugging Face vision model saved on disk (ViT, DINOv2, CLIP, SigLIP,
                     ...): its last hidden state, patch tokens resampled to MingTok's grid

A teacher sees the unmasked image and returns features (B, N, dim) on the tokenizer's
N-token grid.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from uniloom.models.mingtok import MingTok
from uniloom.pipelines.errors import UniloomError


class EMATeacher:
    """A frozen copy of the student, pulled towards it after every optimiser step."""

    def __init__(self, model: MingTok, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        del self.model.pixel_decoder  # targets come from the first two stages only
        self.latent_dim = model.cfg.enc_width
        self.semantic_dim = model.cfg.semantic_dim

    @torch.no_grad()
    def update(self, student: MingTok) -> None:
        for name in ("encoder", "semantic_decoder"):
            ema, src = getattr(self.model, name), getattr(student, name)
            for p_ema, p in zip(ema.parameters(), src.parameters(), strict=True):
                p_ema.lerp_(p.detach(), 1 - self.decay)
        self.model.latent_shift.copy_(student.latent_shift)
        self.model.latent_scale.copy_(student.latent_scale)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.encoder.hidden(images)  # (B, N + 1, C)
        latents = self.model.normalize(self.model.encoder.head_out(hidden))
        features = self.model.decode_semantic(latents[:, :-1])  # (B, N, D)
        return hidden[:, :-1], features

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def _vision_tower(model):
    """The image part of a Hugging Face model: CLIP/SigLIP keep it in `.vision_model`."""
    return getattr(model, "vision_model", model)


class HFTeacher:
    """A frozen Hugging Face vision model loaded from a local folder (never downloaded)."""

    def __init__(self, path: str, grid: int):
        from transformers import AutoConfig, AutoModel

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise UniloomError(f"teacher hf:{path}: no config.json there (a saved Hugging Face model folder)")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        vision = getattr(config, "vision_config", config)
        self.model = _vision_tower(AutoModel.from_pretrained(folder, local_files_only=True)).eval()
        self.model.requires_grad_(False)
        self.image_size = int(vision.image_size)
        self.dim = int(vision.hidden_size)
        self.grid = grid
        mean, std = _normalisation(folder)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def to(self, device) -> HFTeacher:
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2  # [-1, 1] -> [0, 1]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        hidden = self.model(pixel_values=x).last_hidden_state  # (B, prefix + g * g, C)
        side = math.isqrt(hidden.shape[1])
        patches = hidden[:, hidden.shape[1] - side * side :]  # class/register tokens come first
        grid = patches.transpose(1, 2).reshape(len(x), self.dim, side, side)
        grid = F.interpolate(grid, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)  # (B, N, C)


def _normalisation(folder: Path) -> tuple[list[float], list[float]]:
    """The image processor's mean/std; 0.5/0.5 (plain [-1, 1]) when none is saved."""
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text())
        return list(data.get("image_mean", [0.5] * 3)), list(data.get("image_std", [0.5] * 3))
    return [0.5] * 3, [0.5] * 3


class Teachers:
    """The two teachers the objective needs: image features (a) and text-aligned ones (b)."""

    def __init__(self, latent_spec: str, semantic_spec: str, student: MingTok, ema_decay: float):
        self.ema = EMATeacher(student, ema_decay) if "ema" in (latent_spec, semantic_spec) else None
        loaded: dict[str, HFTeacher] = {}

        def pick(spec: str, which: str):
            if spec == "ema":
                return "ema"
            if spec.startswith("hf:") and len(spec) > 3:
                path = spec[3:]
                if path not in loaded:
                    loaded[path] = HFTeacher(path, student.cfg.grid)
                return loaded[path]
            raise UniloomError(f"config key 'tokenizer.{which}': unknown teacher {spec!r} (ema or hf:<path>)")

        self.latent = pick(latent_spec, "teacher")
        self.semantic = pick(semantic_spec, "semantic_teacher")
        self.latent_dim = self.ema.latent_dim if self.latent == "ema" else self.latent.dim
        self.semantic_dim = self.ema.semantic_dim if self.semantic == "ema" else self.semantic.dim

    def to(self, device) -> Teachers:
        """Every teacher onto `device`, the student's."""
        if self.ema is not None:
            self.ema.model.to(device)
        for teacher in {id(t): t for t in (self.latent, self.semantic) if isinstance(t, HFTeacher)}.values():
            teacher.to(device)
        return self

    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ema = self.ema.targets(images) if self.ema is not None else None
        a = ema[0] if self.latent == "ema" else self.latent.features(images)
        b = ema[1] if self.semantic == "ema" else self.semantic.features(images)
        return a, b

    def update(self, student: MingTok) -> None:
        if self.ema is not None:
            self.ema.update(student)
