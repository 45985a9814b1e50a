"""Corpus samples for the tokenizer: decoding PNG/JPEG bytes into uint8 arrays, and the
corpus tars read with the data stage's tar reader (pipelines/data/tars.py: webdataset's
keys), directly here (evaluation, calibration) and in Ray Data's tasks (training)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from uniloom.pipelines.data.fs import join, open_fs, to_uri
from uniloom.pipelines.data.images import square_pixels
from uniloom.pipelines.data.tars import TarError, TarSample, read_samples
from uniloom.pipelines.errors import UniloomError

IMAGE_EXTS = ("png", "jpg", "jpeg")


def decode_image(data: bytes, size: int, name: str) -> np.ndarray:
    """Image bytes -> (3, size, size) uint8: upright (EXIF orientation), then the data
    stage's centre crop and resize, so MingTok sees every image as the data stage encodes it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return square_pixels(ImageOps.exif_transpose(img), size).transpose(2, 0, 1).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UniloomError(f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None


@dataclass
class Samples:
    keys: list[str]
    images: np.ndarray  # (B, 3, H, W) uint8
    captions: list[str]
    meta: list[dict[str, Any]]


def shard_paths(corpus: str | Path, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The synthetic corpus's tars under `corpus` (a folder or any fsspec URL), in key order."""
    fs, root = open_fs(str(corpus), storage_options)
    paths = sorted(fs.glob(join(root, "shapes-*.tar"))) if fs.isdir(root) else []
    if not paths:
        raise UniloomError(
            f"no corpus shards (shapes-*.tar) in {corpus}; run `uniloom corpus synth --out {corpus}`"
        )
    return [to_uri(fs, p) for p in paths]


def tar_samples(path: str | Path, storage_options: dict[str, Any] | None = None) -> list[TarSample]:
    """The samples of one corpus tar, each checked to have an image: MingTok trains on
    images only, and a sample without one (or with a member the reader refuses) is a
    broken corpus, never silently dropped."""
    try:
        fs, local = open_fs(str(path), storage_options)
        with fs.open(local, "rb") as f:
            samples = read_samples(f)
    except (TarError, OSError) as e:
        raise UniloomError(f"{path}: not a readable tar ({e})") from None
    if refused := next((s for s in samples if s.refused), None):
        raise UniloomError(f"{path}: sample {refused.key}: {refused.refused}")
    missing = [s for s in samples if not set(s.members) & set(IMAGE_EXTS)]
    if missing:
        names = ", ".join(f"{s.key} ({', '.join(sorted(s.members)) or 'no members'})" for s in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UniloomError(
            f"{path}: {len(missing)} sample(s) without an image ({'/'.join(IMAGE_EXTS)}): {names}{more}"
        )
    return samples


def image_of(sample: TarSample, size: int) -> np.ndarray:
    """The sample's image (its first of IMAGE_EXTS) as (3, size, size) uint8."""
    ext = next(e for e in IMAGE_EXTS if e in sample.members)
    return decode_image(sample.members[ext], size, f"{sample.key}.{ext}")


def read_tars(
    paths: list[str], size: int, limit: int | None = None, storage_options: dict[str, Any] | None = None
) -> Samples:
    """Every sample (image + caption + JSON) of `paths`, decoded at `size`."""
    groups: dict[str, dict[str, bytes]] = {}
    for path in paths:
        groups.update((s.key, s.members) for s in tar_samples(path, storage_options))
        if limit and len(groups) >= limit:
            break
    keys = sorted(groups)[:limit]
    images, captions, meta = [], [], []
    for key in keys:
        files = groups[key]
        images.append(image_of(TarSample(key, files), size))
        captions.append(files.get("txt", b"").decode())
        meta.append(json.loads(files["json"]) if "json" in files else {})
    return Samples(
        keys, np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8), captions, meta
    )


def to_unit(images: np.ndarray, device="cpu"):
    """uint8 (B, 3, H, W) -> float tensor in [-1, 1] on `device` (moved as uint8: a
    quarter of the float bytes)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).to(device).float().div(127.5).sub(1.0)


def to_uint8(images) -> np.ndarray:
    """float tensor in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) for detectors and files."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()
