"""Sampling settings chosen on the validation split, never the test split.

Image settings (flow steps, guidance scales) and the text temperature act on different
outputs, so they are tuned apart: every combination of the image settings in
`eval.tune_grid` is scored by GenEval overall on the validation scenes, then every text
temperature by VQA accuracy. The best go into the preset's `eval:` section; the normal
evaluation then uses them on the test split.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import yaml

from uniloom.pipelines.evaluate.benchmark import held_out, score_generation, score_vqa, vqa_pairs
from uniloom.pipelines.evaluate.config import EvalConfig

IMAGE_SETTINGS = (
    "flow_steps",
    "temperature",
    "coarse_temperature",
    "cfg_text_uncond_scale",
    "cfg_cond_scale",
)


def _setting(name: str, value: float) -> float | int:
    return int(value) if name == "flow_steps" else float(value)


def tune(
    bundle, e: EvalConfig, corpus_seed: int, max_objects: int = 4, echo: Callable[[str], None] = print
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    """(best settings, one row per trial with its score and 95% interval, the MLflow
    tags of the precision it ran in)."""
    from uniloom.pipelines.evaluate.univision import inference_precision, model_callables

    items = held_out(corpus_seed, e.val_scenes, max_objects, split="val")
    captions = [i.scene["caption"] for i in items]
    pairs = vqa_pairs(items)
    image_keys = [k for k in IMAGE_SETTINGS if k in e.tune_grid]
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    with inference_precision(bundle, e) as tags:
        best_score = -1.0
        for values in itertools.product(*(e.tune_grid[k] for k in image_keys)):
            settings = {k: _setting(k, v) for k, v in zip(image_keys, values, strict=True)}
            generate_images, _, _ = model_callables(bundle, dataclasses.replace(e, **settings))
            scores = score_generation(items, generate_images(captions))
            lo, hi = scores.overall_interval()
            trials.append(
                {**settings, "metric": "geneval_overall", "value": scores.overall, "lo": lo, "hi": hi}
            )
            echo(f"val {settings}: GenEval overall {scores.overall:.3f} [{lo:.3f}, {hi:.3f}]")
            if scores.overall > best_score:
                best, best_score = dict(settings), scores.overall
        best_vqa = -1.0
        for temperature in e.tune_grid.get("text_temperature", []):
            _, answer, _ = model_callables(
                bundle, dataclasses.replace(e, text_temperature=float(temperature))
            )
            vqa = score_vqa(answer([p[0] for p in pairs], [p[1] for p in pairs]), [p[2] for p in pairs])
            m = vqa.metrics("vqa_accuracy")
            trials.append({"text_temperature": float(temperature), "metric": "vqa_accuracy", "value": vqa.value,
                           "lo": m["vqa_accuracy_lo"], "hi": m["vqa_accuracy_hi"]})  # fmt: skip
            echo(f"val text_temperature {temperature}: VQA {vqa.value:.3f} [{m['vqa_accuracy_lo']:.3f}, "
                 f"{m['vqa_accuracy_hi']:.3f}]")  # fmt: skip
            if vqa.value > best_vqa:
                best["text_temperature"], best_vqa = float(temperature), vqa.value
    return best, trials, tags


def preset_snippet(best: dict[str, Any], val_scenes: int) -> str:
    """The `eval:` lines to store in the preset."""
    return f"# chosen by `uniloom eval --tune` on {val_scenes} validation scenes\n" + yaml.safe_dump(
        {"eval": best}, sort_keys=False
    )
