"""A deterministic scene detector: recovers (shape, colour, bbox) of every object in a
rendered (or generated) image with no learned weights. It judges generation and editing
quality, so every step is robust rather than clever:

1. a 3x3 median filter removes pixel noise (images of 48 px and more);
2. the background colour is the median of the border pixels;
3. foreground = pixels far from the background colour; connected regions are objects;
4. an object's colour is the palette entry nearest to the median of its most saturated
   half of pixels (anti-aliased edges blend with the background and are ignored);
5. its shape is the template (circle, square, triangle) whose coverage mask at the
   region's bounding box overlaps the region best (IoU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from uniloom.pipelines.corpus.render import shape_coverage
from uniloom.pipelines.corpus.scenes import COLORS, SHAPES, SceneObject, relation

FOREGROUND_DISTANCE = 70.0  # RGB distance from the background that marks an object pixel
MIN_AREA_FRACTION = 0.004  # smaller regions are noise (a 0.2-side object covers >= 0.02)
CENTER_TOLERANCE = 0.08
# Below this side a 3x3 median blunts triangle tips (objects are only ~6-10 px wide).
MEDIAN_MIN_SIDE = 48  # normalised centre distance for a detection to match the truth

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Detection(SceneObject):
    score: float = 1.0  # IoU of the region with its shape template


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.asarray(image, dtype=np.float32), 0, 255)
    return image.astype(np.float32)


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Objects in `image` (H x W x 3), sorted left to right then top to bottom."""
    rgb = _as_array(image)
    h, w, _ = rgb.shape
    if min(h, w) >= MEDIAN_MIN_SIDE:
        rgb = ndimage.median_filter(rgb, size=(3, 3, 1))
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background, axis=2)
    labels, n = ndimage.label(distance > FOREGROUND_DISTANCE)
    found = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[region] == index
        area = int(mask.sum())
        if area < MIN_AREA_FRACTION * h * w:
            continue
        pixels = rgb[region][mask]
        strong = distance[region][mask] >= np.median(distance[region][mask])
        color = _PALETTE_NAMES[
            int(np.argmin(np.linalg.norm(_PALETTE - np.median(pixels[strong], axis=0), axis=1)))
        ]
        ious = {}
        for shape in SHAPES:
            template = shape_coverage(shape, mask.shape[1], mask.shape[0]) >= 0.5
            ious[shape] = (template & mask).sum() / max((template | mask).sum(), 1)
        shape = max(ious, key=ious.get)
        ys, xs = region
        bbox = (xs.start / w, ys.start / h, xs.stop / w, ys.stop / h)
        found.append(Detection(shape, color, tuple(round(v, 4) for v in bbox), round(float(ious[shape]), 4)))
    return sorted(found, key=lambda d: (d.center[0], d.center[1]))


def match(detected: list[SceneObject], truth: list[SceneObject]) -> list[tuple[int, int]]:
    """Pairs (detected index, truth index) with the same shape and colour and nearby
    centres, chosen to maximise the number of pairs (Hungarian assignment)."""
    if not detected or not truth:
        return []
    cost = np.full((len(detected), len(truth)), 1e6)
    for i, d in enumerate(detected):
        for j, t in enumerate(truth):
            dist = float(np.hypot(d.center[0] - t.center[0], d.center[1] - t.center[1]))
            if d.shape == t.shape and d.color == t.color and dist <= CENTER_TOLERANCE:
                cost[i, j] = dist
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if cost[i, j] < 1e6]


def scene_recovered(detected: list[SceneObject], truth: list[SceneObject]) -> bool:
    """Exact recovery: the same objects (shape, colour) at the same places, nothing extra."""
    return len(detected) == len(truth) and len(match(detected, truth)) == len(truth)


def attributes_match(detected: list[SceneObject], truth: list[SceneObject]) -> bool:
    """The same multiset of (shape, colour), wherever the objects are (GenEval-style)."""
    return sorted((o.shape, o.color) for o in detected) == sorted((o.shape, o.color) for o in truth)


def relation_holds(detected: list[SceneObject], a: SceneObject, b: SceneObject, rel: str) -> bool:
    """Whether objects like `a` and `b` are found with `a` `rel` `b` (position score)."""
    firsts = [d for d in detected if (d.shape, d.color) == (a.shape, a.color)]
    seconds = [d for d in detected if (d.shape, d.color) == (b.shape, b.color)]
    return any(relation(x, y) == rel for x in firsts for y in seconds)
