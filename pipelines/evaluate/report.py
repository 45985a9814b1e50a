"""Evaluation results for people and for MLflow: a table with each figure's n and 95%
interval, the same rows as an MLflow table, one example grid per GenEval category and edit
round, and every judgement as an MLflow table (prompt, category, passed, the image drawn
or the answer given) to see where the model fails."""

from __future__ import annotations

import math

import numpy as np

from uniloom.pipelines.evaluate.benchmark import Evaluation

_SUFFIXES = ("_n", "_lo", "_hi")


def rows(metrics: dict[str, float]) -> list[dict[str, float | str]]:
    """One row per figure (every metric with an `_n`): value, n, lo, hi (NaN where a
    figure has no interval, e.g. PSNR)."""
    names = [k for k in metrics if not k.endswith(_SUFFIXES) and f"{k}_n" in metrics]
    return [
        {
            "metric": k,
            "value": metrics[k],
            "n": metrics[f"{k}_n"],
            "lo": metrics.get(f"{k}_lo", math.nan),
            "hi": metrics.get(f"{k}_hi", math.nan),
        }
        for k in names
    ]


def format_table(metrics: dict[str, float]) -> str:
    lines = [f"{'metric':<32} {'value':>7} {'n':>6}  95% interval"]
    for r in rows(metrics):
        interval = "" if math.isnan(r["lo"]) else f"[{r['lo']:.3f}, {r['hi']:.3f}]"
        lines.append(f"{r['metric']:<32} {r['value']:>7.3f} {int(r['n']):>6}  {interval}")
    return "\n".join(lines)


def example_grids(evaluation: Evaluation) -> dict[str, np.ndarray]:
    """name -> the name's example images side by side (H x n*W x 3 uint8)."""
    return {name: np.concatenate(images, axis=1) for name, images in evaluation.examples.items() if images}


def log_evaluation(evaluation: Evaluation, log_metrics: bool = True) -> None:
    """Into the active MLflow run: the metrics (unless the caller logs them), the tables
    `eval/scores.json`, `eval/samples.json` (prompt, category, passed, image: generation and
    edit rounds) and `eval/answers.json` (VQA), and `eval/examples/<name>.png`."""
    import mlflow
    from PIL import Image

    if log_metrics:
        mlflow.log_metrics(evaluation.metrics)
    mlflow.set_tags(evaluation.tags)
    table = rows(evaluation.metrics)
    mlflow.log_table({key: [r[key] for r in table] for key in ("metric", "value", "n", "lo", "hi")},
                     artifact_file="eval/scores.json")  # fmt: skip
    drawn = [s for s in evaluation.samples if "image" in s]
    if drawn:
        mlflow.log_table({"prompt": [s["prompt"] for s in drawn], "category": [s["category"] for s in drawn],
                          "passed": [s["passed"] for s in drawn],
                          "image": [Image.fromarray(s["image"]) for s in drawn]}, artifact_file="eval/samples.json")  # fmt: skip
    answered = [s for s in evaluation.samples if "answer" in s]
    if answered:
        mlflow.log_table({key: [s[key] for s in answered] for key in ("prompt", "expected", "answer", "passed")},
                         artifact_file="eval/answers.json")  # fmt: skip
    for name, grid in example_grids(evaluation).items():
        mlflow.log_image(grid, f"eval/examples/{name}.png")
