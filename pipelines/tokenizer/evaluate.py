"""How good a tokenizer (any kind: pipelines/tokenizer/kinds.py) is: reconstruction (PSNR,
SSIM), whether the scene detector finds the held-out scene in the reconstruction, and how
linearly its pooled features (MingTok: semantic) separate the shape and the colour of
single-object scenes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import COLORS, SHAPES, sample_scene, scene_objects
from uniloom.pipelines.device import device_of
from uniloom.pipelines.evaluate.benchmark import Proportion, proportion
from uniloom.pipelines.evaluate.detector import detect, scene_recovered
from uniloom.pipelines.tokenizer.data import Samples, to_uint8, to_unit
from uniloom.pipelines.tokenizer.kinds import kind_for

PROBE_SEED_OFFSET = 7919  # probe scenes come from seeds no corpus of the same seed uses


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images (B, H, W, 3)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM of uint8 images (B, H, W, 3)."""
    return np.array([structural_similarity(x, y, channel_axis=2, data_range=255) for x, y in zip(a, b)])


def grid_image(originals: np.ndarray, recons: np.ndarray, columns: int = 8) -> Image.Image:
    """Originals above their reconstructions, `columns` pairs per row (uint8 B, H, W, 3)."""
    n = min(len(originals), 4 * columns)
    rows = []
    for start in range(0, n, columns):
        top = list(originals[start : start + columns])
        bottom = list(recons[start : start + columns])
        pad = columns - len(top)
        top += [np.zeros_like(originals[0])] * pad
        bottom += [np.zeros_like(originals[0])] * pad
        rows += [np.concatenate(top, axis=1), np.concatenate(bottom, axis=1)]
    return Image.fromarray(np.concatenate(rows, axis=0))


@torch.no_grad()
def reconstruct_all(model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 (B, 3, H, W) in -> uint8 (B, H, W, 3) reconstructions out."""
    model.eval()
    where = device_of(model)
    out = [
        to_uint8(model.reconstruct(to_unit(images[i : i + batch], where)))
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, *images.shape[2:], 3), np.uint8)


@torch.no_grad()
def pooled_features(model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Mean-pooled features (B, D) of uint8 images (B, 3, H, W) (kinds.py `pooled`)."""
    model.eval()
    where, kind, out = device_of(model), kind_for(model), []
    for i in range(0, len(images), batch):
        out.append(kind.pooled(model, to_unit(images[i : i + batch], where)).float().cpu().numpy())
    return np.concatenate(out)


def detector_hits(images: np.ndarray, samples: Samples) -> list[bool]:
    """Whether the detector recovers each scene of `samples` (those with ground truth) from
    `images` (B, H, W, 3) uint8."""
    return [
        scene_recovered(detect(image), scene_objects(m["objects"]))
        for image, m in zip(images, samples.meta)
        if "objects" in m
    ]


def reconstruction_metrics(model, samples: Samples) -> dict[str, float]:
    originals = samples.images.transpose(0, 2, 3, 1)
    recons = reconstruct_all(model, samples.images)
    recovered, baseline = detector_hits(recons, samples), detector_hits(originals, samples)
    return {
        "psnr": float(psnr(originals, recons).mean()),
        "ssim": float(ssim(originals, recons).mean()),
        "detector_agreement": float(np.mean(recovered)) if recovered else float("nan"),
        "detector_on_originals": float(np.mean(baseline)) if baseline else float("nan"),
        "images": len(recons),
    }


@dataclass
class ProbeSet:
    images: np.ndarray  # (B, 3, H, W) uint8
    shapes: np.ndarray  # (B,) index into SHAPES
    colors: np.ndarray  # (B,) index into COLORS


def probe_scenes(seed: int, count: int, size: int) -> ProbeSet:
    """`count` single-object scenes of seed `seed` rendered at `size` px."""
    images, shapes, colors = [], [], []
    for index in range(count):
        scene = sample_scene(seed, index, max_objects=1)
        obj = scene["objects"][0]
        images.append(np.asarray(render(scene_objects(scene["objects"]), size)).transpose(2, 0, 1))
        shapes.append(SHAPES.index(obj["shape"]))
        colors.append(list(COLORS).index(obj["color"]))
    return ProbeSet(np.stack(images), np.array(shapes), np.array(colors))


def fit_linear_probe(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-3) -> Callable:
    """Multinomial logistic regression on standardised features (L-BFGS, full batch)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std).float()
    yt = torch.from_numpy(y).long()
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return linear(torch.from_numpy((features - mean) / std).float()).argmax(1).numpy()

    return predict


def probe_hits(model, seed: int, fit: int, test: int) -> dict[str, Proportion]:
    """Linear-probe hits of shape and colour on `test` fresh single-object scenes, fitted
    on `fit` others."""
    size = model.cfg.image_size
    fit_set = probe_scenes(seed + PROBE_SEED_OFFSET, fit, size)
    test_set = probe_scenes(seed + 2 * PROBE_SEED_OFFSET, test, size)
    f_fit, f_test = pooled_features(model, fit_set.images), pooled_features(model, test_set.images)
    out = {}
    for name, classes in (("shape", len(SHAPES)), ("color", len(COLORS))):
        predict = fit_linear_probe(f_fit, getattr(fit_set, f"{name}s"), classes)
        out[f"probe_{name}"] = proportion(predict(f_test) == getattr(test_set, f"{name}s"))
    return out


def probe_accuracy(model, seed: int, train: int, test: int) -> dict[str, float]:
    return {name: hits.value for name, hits in probe_hits(model, seed, train, test).items()}
