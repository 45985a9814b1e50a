"""The consolidated tokenizer weights that every later stage loads: one safetensors file
whose metadata carries the kind's config (`<kind>_config`: pipelines/tokenizer/kinds.py),
so the file alone rebuilds the model."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from uniloom.models.mingtok import MingTok
from uniloom.pipelines.config import UniloomConfig, build
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.kinds import kind_for, kind_in
from uniloom.pipelines.workspace import workspace_uri


def default_path(cfg: UniloomConfig) -> str:
    """tokenizer.export, else `<workspace>/<kind>/<kind>.safetensors` (a URL on a remote workspace)."""
    kind = cfg.tokenizer.kind
    return cfg.tokenizer.export or workspace_uri(cfg, kind, f"{kind}.safetensors")


def save_tokenizer(model, path: Path, extra: dict[str, str] | None = None) -> Path:
    """Write atomically: readers never see half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {kind_for(model).config_key: json.dumps(dataclasses.asdict(model.cfg)), **(extra or {})}
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_tokenizer(path: str | Path, expected: str | None = None):
    """A tokenizer of the file's kind (`expected`: refuse any other) in eval mode from an
    exported file (config included)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    what = f"{expected} " if expected else "tokenizer "
    if not path.is_file():
        raise UniloomError(f"{what}weights {path} do not exist; run `uniloom tokenizer train` first")
    try:
        meta = read_metadata(path)
        kind = kind_in(meta)
        if kind is None:
            raise KeyError("no tokenizer config in its metadata")
        if expected and kind.name != expected:
            raise UniloomError(f"{path} holds a {kind.name} tokenizer, not a {expected} one")
        model = kind.build(build(kind.config_cls, json.loads(meta[kind.config_key]), kind.name))
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, KeyError, json.JSONDecodeError, RuntimeError, OSError) as e:
        raise UniloomError(f"{path}: not a {what}weights file ({e.__class__.__name__}: {e})") from None
    return model.eval()


def load_mingtok(path: str | Path) -> MingTok:
    return load_tokenizer(path, "mingtok")


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
