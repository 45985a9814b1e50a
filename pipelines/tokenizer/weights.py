"""The consolidated MingTok weights that every later stage loads: one safetensors file
whose metadata carries the MingTokConfig, so the file alone rebuilds the model."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.pipelines.config import UniloomConfig, build
from uniloom.pipelines.errors import UniloomError

CONFIG_KEY = "mingtok_config"


def default_path(cfg: UniloomConfig) -> Path:
    return Path(cfg.tokenizer.export or Path(cfg.workspace) / "mingtok" / "mingtok.safetensors")


def save_mingtok(model: MingTok, path: Path, extra: dict[str, str] | None = None) -> Path:
    """Write atomically: readers never see half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(dataclasses.asdict(model.cfg)), **(extra or {})}
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_mingtok(path: str | Path) -> MingTok:
    """A MingTok in eval mode from an exported file (config included)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UniloomError(f"MingTok weights {path} do not exist; run `uniloom tokenizer train` first")
    try:
        meta = read_metadata(path)
        cfg = build(MingTokConfig, json.loads(meta[CONFIG_KEY]), "mingtok")
        model = MingTok(cfg)
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, KeyError, json.JSONDecodeError, RuntimeError, OSError) as e:
        raise UniloomError(f"{path}: not a MingTok weights file ({e.__class__.__name__}: {e})") from None
    return model.eval()


@torch.no_grad()
def calibrate_latents(model: MingTok, images: torch.Tensor) -> tuple[float, float]:
    """Set the fixed latent shift/scale to the mean/std of the raw latents of `images`
    (B, 3, H, W) in [-1, 1], so the language model sees zero-mean unit-variance latents.
    The semantic decoder de-normalises with the same buffers, so reconstructions do not
    change."""
    model.eval()
    images = images.to(model.latent_shift.device)  # the model's
    raw = torch.cat([model.encoder(images[i : i + 64])[:, :-1] for i in range(0, len(images), 64)])
    shift, scale = raw.mean().item(), raw.std().item()
    model.latent_shift.fill_(shift)
    model.latent_scale.fill_(max(scale, 1e-6))
    return shift, scale
