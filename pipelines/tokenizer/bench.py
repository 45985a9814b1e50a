"""`uniloom bench tokenizers`: the tokenizer kinds (MingTok, UniTok, TUNA) trained on one
step budget on the same corpus, each through `uniloom tokenizer train`'s own path
(pipelines/tokenizer/train.py; fresh runs, exported under the bench's folder, not
registered), then scored side by side in this process on the same held-out images and
probe scenes:

    psnr, ssim         reconstructions of the held-out shards: mean, 95% interval of the mean
    detector           share of held-out scenes the scene detector recovers exactly from the
                       reconstruction (the originals' share is its ceiling), Wilson 95% interval
    probe_color/shape  linear-probe accuracy from the kind's pooled features (kinds.py), Wilson
    tokens, bytes      per image as the data stage stores them (the kind's shape and dtype;
                       before Parquet's compression)
    encode             images/s of the kind's `values`, timed in alternating rounds

With `unified`, each kind instead runs the workflow's own stages (corpus -> tokenizer ->
data -> train -> eval, as `uniloom run --set tokenizer.kind=<kind>` runs them; nothing
registered) in a folder of its own, every kind on the same budgets, and the table adds
the unified model's test-split figures with their intervals:

    geneval, vqa       GenEval overall (bootstrap interval) and VQA accuracy (Wilson)
    edit_2             2-round edit success, each round fed feature to feature (Wilson)

The reconstruction figures are then those of the tokenizer each workflow trained (the
held-out shards of its corpus, the same seed for every kind). Without it, those columns
say they were not run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.evaluate.benchmark import Z95, proportion
from uniloom.pipelines.tokenizer.data import Samples, read_tars, to_unit
from uniloom.pipelines.tokenizer.evaluate import (
    detector_hits,
    probe_hits,
    psnr,
    reconstruct_all,
    ssim,
)
from uniloom.pipelines.tokenizer.kinds import KINDS, kind_for

NOT_RUN = "not run (--unified)"
UNIFIED_COLUMNS = ("geneval_overall", "vqa_accuracy", "edit_success_2")
GRID_LABEL_WIDTH = 64
LEGEND = (
    "In brackets: 95% intervals (Wilson for proportions, normal for means); for encode img/s "
    "the slowest and fastest timed round. bytes/image: the stored values before Parquet compression."
)


def train_kinds(
    configs: dict[str, UniloomConfig], steps: int, work: Path, echo: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Each kind's tokenizer trained afresh for `steps`; returns each kind's training summary."""
    from uniloom.pipelines.tokenizer.train import train_tokenizer

    summaries = {}
    for kind, cfg in configs.items():
        t = cfg.tokenizer
        t.steps = steps
        t.run_name, t.storage = f"bench-{kind}-{cfg.preset}", str(work / "ray_results")
        t.export, t.register = str(work / kind / f"{kind}.safetensors"), False
        echo(f"{kind}: training {t.steps} steps")
        summaries[kind] = train_tokenizer(cfg, restart=True, echo=lambda line, k=kind: echo(f"{k}: {line}"))
    return summaries


def run_kinds(
    configs: dict[str, UniloomConfig], steps: int, work: Path, tracking: str, echo: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Each kind's workflow, corpus to eval, in `work`/<kind> (tracked to `tracking`,
    nested under the active run; nothing registered) with `steps` tokenizer steps and the
    config's recipe. Per kind: its tokenizer's weights and training figures, its corpus,
    its eval metrics, the unified model's steps and export, the workflow's MLflow run id.
    A rerun in the same `work` skips what is unchanged, as `uniloom run` does."""
    from uniloom.pipelines.workflow import run_workflow
    from uniloom.pipelines.workflow_stages import workflow_stages

    stages = [s for s in workflow_stages() if s.name != "register"]
    out = {}
    for kind, cfg in configs.items():
        cfg.workspace, cfg.tracking.tracking_uri = str(work / kind), tracking
        cfg.tokenizer.steps, cfg.tokenizer.register, cfg.train.register = steps, False, False
        echo(f"{kind}: {' -> '.join(s.name for s in stages)} in {cfg.workspace}")
        reports, run_id = run_workflow(cfg, stages)
        done = {r.name: r.result for r in reports}
        tok = done["tokenizer"]
        out[kind] = {
            "weights": tok.outputs["weights"],
            "corpus": done["corpus"].outputs["corpus"],
            "steps": int(tok.metrics["steps"]),
            "budget_cut": bool(tok.metrics.get("budget_cut", 0.0)),
            "unified_steps": int(done["train"].metrics["global_step"]),
            "export": done["train"].outputs["export"],
            "eval": done["eval"].metrics,
            "workflow_run_id": run_id,
        }
    return out


def mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the mean with its 95% normal interval."""
    mean = float(values.mean())
    half = Z95 * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else math.inf
    return mean, mean - half, mean + half


def storage(model, float_dtype: str) -> dict[str, Any]:
    """Tokens per image, values per token, their stored dtype and bytes per image."""
    kind = kind_for(model)
    tokens, width = kind.token_shape(model.cfg)
    dtype = kind.dtype(model.cfg, float_dtype)
    return {
        "tokens_per_image": tokens,
        "values_per_token": width,
        "stored_dtype": dtype,
        "bytes_per_image": tokens * width * np.dtype(dtype).itemsize,
    }


def encode_rates(
    models: dict[str, Any], images: np.ndarray, rounds: int, iters: int
) -> dict[str, dict[str, float]]:
    """Images/s of each kind's `values` (what the data stage stores) on the same batch,
    timed in `rounds` alternating rounds of `iters` calls each after one warm-up call:
    over all rounds, and the slowest and fastest round (how much the machine varied)."""
    import torch

    from uniloom.pipelines.device import device_of, synchronize

    seconds: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        batches = {k: to_unit(images, device_of(m)) for k, m in models.items()}

        def call(kind: str) -> None:
            KINDS[kind].values(models[kind], batches[kind])
            synchronize(batches[kind].device)

        for kind in models:
            call(kind)
        for _ in range(rounds):
            for kind in models:
                start = time.perf_counter()
                for _ in range(iters):
                    call(kind)
                seconds[kind].append(time.perf_counter() - start)
    per_round = len(images) * iters
    return {
        k: {
            "encode_images_per_s": per_round * len(s) / sum(s),
            "encode_images_per_s_lo": per_round / max(s),
            "encode_images_per_s_hi": per_round / min(s),
        }
        for k, s in seconds.items()
    }


def side_by_side(originals: np.ndarray, recons: dict[str, np.ndarray]) -> Image.Image:
    """One row of originals, then one row of reconstructions per kind, each row labelled
    (uint8 (B, H, W, 3) each)."""
    rows = {"original": originals, **recons}
    h = originals.shape[1]
    canvas = Image.new(
        "RGB", (GRID_LABEL_WIDTH + originals.shape[2] * len(originals), h * len(rows)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, r * h + h // 2 - 6), name, fill="black")
        canvas.paste(Image.fromarray(np.concatenate(list(images), axis=1)), (GRID_LABEL_WIDTH, r * h))
    return canvas


def score_kinds(
    models: dict[str, Any],
    held: Samples,
    cfg: UniloomConfig,
    rounds: int,
    iters: int,
    batch: int,
    grid: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], Image.Image]:
    """Per kind: every table figure; the figures shared by all (the originals' detector
    ceiling, counts); the side-by-side reconstruction grid."""
    originals = held.images.transpose(0, 2, 3, 1)
    t, rows, recons = cfg.tokenizer, {}, {}
    for kind, model in models.items():
        recons[kind] = reconstruct_all(model, held.images)
        row: dict[str, Any] = {}
        for name, values in (
            ("psnr", psnr(originals, recons[kind])),
            ("ssim", ssim(originals, recons[kind])),
        ):
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval(values)
        row.update(proportion(detector_hits(recons[kind], held)).metrics("detector_agreement"))
        for name, hits in probe_hits(model, cfg.corpus.seed, t.probe_train, t.probe_test).items():
            row.update(hits.metrics(name))
        row.update(storage(model, cfg.data.latent_dtype))
        rows[kind] = row
    for kind, rates in encode_rates(models, held.images[:batch], rounds, iters).items():
        rows[kind].update(rates)
    shared = {
        **proportion(detector_hits(originals, held)).metrics("detector_on_originals"),
        "heldout_images": len(held.keys),
        "probe_fit_scenes": t.probe_train,
        "probe_test_scenes": t.probe_test,
        "encode_batch": min(batch, len(held.keys)),
    }
    grid_image = side_by_side(originals[:grid], {k: r[:grid] for k, r in recons.items()})
    return rows, shared, grid_image


def _interval(row: dict[str, Any], name: str, digits: int) -> str:
    return f"{row[name]:.{digits}f} [{row[f'{name}_lo']:.{digits}f}, {row[f'{name}_hi']:.{digits}f}]"


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison as a Markdown table, one row per kind."""
    header = ["kind", "steps (tokenizer / unified)", "PSNR dB", "SSIM", "detector agreement", "probe colour",
              "probe shape", "tokens/image", "bytes/image", "encode img/s", "GenEval overall", "VQA",
              "2-round edit"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, r in rows.items():
        cells = [
            kind,
            f"{r['steps']}"
            + (" (cut)" if r["budget_cut"] else "")
            + (f" / {r['unified_steps']}" if "unified_steps" in r else ""),
            _interval(r, "psnr", 2),
            _interval(r, "ssim", 3),
            _interval(r, "detector_agreement", 3),
            _interval(r, "probe_color", 3),
            _interval(r, "probe_shape", 3),
            f"{r['tokens_per_image']} x {r['values_per_token']} {r['stored_dtype']}",
            f"{r['bytes_per_image']:,}",
            _interval(r, "encode_images_per_s", 1),
            *(_interval(r, c, 3) if c in r else NOT_RUN for c in UNIFIED_COLUMNS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", LEGEND])


def bench_tokenizers(
    cfg: UniloomConfig,
    configs: dict[str, UniloomConfig],
    steps: int | None,
    work: Path,
    echo: Callable[[str], None],
    limit: int = 0,
    rounds: int = 3,
    iters: int = 2,
    batch: int = 32,
    grid: int = 8,
    unified: bool = False,
) -> dict[str, Any]:
    """Train every kind of `configs` (each kind's full config) on `steps` (with `unified`:
    run each kind's workflow, `run_kinds`), score them side by side, and log the table,
    the figures and the reconstruction grid to one MLflow run (`cfg`'s tracking) that holds
    each kind's training run (its workflow run) as a child. Returns the summary: `table`
    (Markdown), `rows` (per kind), `shared`, `mlflow_run_id`."""
    import mlflow

    from uniloom.pipelines import device, tracking
    from uniloom.pipelines.tokenizer.train import split_shards
    from uniloom.pipelines.tokenizer.weights import load_tokenizer

    if not unified:
        _, held_paths = split_shards(cfg)  # a missing corpus fails here, before any run starts
    steps = steps or cfg.tokenizer.steps
    with tracking.stage_run(cfg, "bench_tokenizers", tags={"uniloom.bench.kinds": ",".join(configs)}) as run:
        if unified:
            trained = run_kinds(configs, steps, work, tracking.tracking_uri(cfg), echo)
            cfg.tokenizer.corpus = next(iter(trained.values()))["corpus"]  # the same seed for every kind
            _, held_paths = split_shards(cfg)
        else:
            trained = train_kinds(configs, steps, work, echo)
        where = "cpu" if cfg.tokenizer.device == "cpu" else device.local_device()
        models = {k: load_tokenizer(s["weights"]).to(where) for k, s in trained.items()}
        sizes = {m.cfg.image_size for m in models.values()}
        if len(sizes) != 1:
            raise UniloomError(f"the kinds' image sizes differ ({sorted(sizes)}): set them alike to compare")
        held = read_tars(held_paths, sizes.pop(), limit or None, cfg.data.storage_options)
        echo(
            f"scoring on {len(held.keys)} held-out images, {cfg.tokenizer.probe_test} probe scenes, on {where}"
        )
        rows, shared, grid_image = score_kinds(models, held, cfg, rounds, iters, batch, grid)
        for kind, row in rows.items():
            t = trained[kind]
            row.update({k: t[k] for k in ("steps", "budget_cut")})
            if unified:
                row.update({k: v for k, v in t["eval"].items() if k.startswith(UNIFIED_COLUMNS)})
                row.update({k: t[k] for k in ("unified_steps", "export", "workflow_run_id")})
            else:
                row.update(train_loop_seconds=t["train_loop_seconds"], training_run_id=t["mlflow_run_id"])
        shared.update(device=device.name(where), steps_planned=steps, unified=unified)
        text = table(rows)
        mlflow.log_metrics(
            {
                f"{k}/{name}": float(v)
                for k, row in rows.items()
                for name, v in row.items()
                if isinstance(v, int | float)
            }
        )
        mlflow.log_text(text, "bench_tokenizers.md")
        mlflow.log_dict({"rows": rows, "shared": shared}, "bench_tokenizers.json")
        mlflow.log_image(grid_image, "reconstructions/side_by_side.png")
        return {"table": text, "rows": rows, "shared": shared, "mlflow_run_id": run.info.run_id}
