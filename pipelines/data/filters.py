"""Row filters: each is its predicate only. Deduplication is not here: it needs every
shard's hashes, so the driver applies it at commit (pipelines/data/dedup.py)."""

from __future__ import annotations

import numpy as np

from uniloom.pipelines.data.config import FilterConfig
from uniloom.pipelines.data.stages import Batch, Filter


def _sizes(batch: Batch, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, h = batch.values["width"], batch.values["height"]
    return np.array([w[i] for i in idx], dtype=np.int64), np.array([h[i] for i in idx], dtype=np.int64)


class MinSide(Filter):
    name = "min_side"

    def __init__(self, min_side: int):
        self.min_side = min_side

    def keep(self, batch, idx):
        w, h = _sizes(batch, idx)
        return np.minimum(w, h) >= self.min_side


class MaxAspect(Filter):
    name = "max_aspect"

    def __init__(self, max_aspect: float):
        self.max_aspect = max_aspect

    def keep(self, batch, idx):
        w, h = _sizes(batch, idx)
        return np.maximum(w, h) <= self.max_aspect * np.minimum(w, h)


class CaptionLength(Filter):
    """Rows without a caption are edit samples (readers quarantine any other): kept."""

    name = "caption_length"

    def __init__(self, min_chars: int, max_chars: int):
        self.min_chars, self.max_chars = min_chars, max_chars

    def keep(self, batch, idx):
        captions = batch.column("caption")
        n = np.array(
            [len(captions[i].strip()) if captions[i] is not None else -1 for i in idx], dtype=np.int64
        )
        return (n == -1) | ((n >= self.min_chars) & (n <= self.max_chars))


def caption_filters(cfg: FilterConfig) -> list[Filter]:
    """Filters that need only the caption: they run before any image is decoded."""
    return [CaptionLength(cfg.min_caption_chars, cfg.max_caption_chars)]


def size_filters(cfg: FilterConfig) -> list[Filter]:
    """Filters on the image size, which the file header gives before pixels are decoded
    (both are symmetric in width and height, so EXIF rotation does not change them)."""
    return [MinSide(cfg.min_side), MaxAspect(cfg.max_aspect)]
