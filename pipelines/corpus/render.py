"""Rasterise scenes. Shapes are drawn at 4x and box-filtered down, so edges are
anti-aliased the way a real image's are, and one scene looks the same at any size."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from uniloom.pipelines.corpus.scenes import BACKGROUND, COLORS, SceneObject

SUPERSAMPLE = 4


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(objects: list[SceneObject], size: int) -> Image.Image:
    """An RGB image of `size` x `size` pixels."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        box = tuple(v * big for v in o.bbox)
        _draw(draw, o.shape, (box[0], box[1], box[2] - 1, box[3] - 1), COLORS[o.color])
    return img.resize((size, size), Image.Resampling.BOX)


def shape_coverage(shape: str, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel of a `height` x `width` box that the shape covers."""
    w, h = width * SUPERSAMPLE, height * SUPERSAMPLE
    img = Image.new("L", (w, h), 0)
    _draw(ImageDraw.Draw(img), shape, (0, 0, w - 1, h - 1), 255)
    return np.asarray(img.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0
