"""`uniloom tokenizer train`: the tokenizer's run on Ray Train (tokenizer.kind: MingTok's
masked image modeling, UniTok, TUNA's VAE; pipelines/tokenizer/step.py).

    corpus tars -> Ray Data (one task per tar: the data stage's tar reader, decode PNG,
    caption index) -> TorchTrainer
    (1 or more workers: GPUs with NCCL or CPUs with gloo, tokenizer.device;
    pipelines/tokenizer/loop.py) -> last checkpoint ->
    calibrated latent normalisation -> consolidated safetensors -> evaluation -> MLflow
    (metrics, reconstruction grids, registered model `uniloom-<kind>`)

Rerunning with the same run name resumes from the last checkpoint of that run.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from uniloom.pipelines.config import UniloomConfig, to_dict
from uniloom.pipelines.data.fs import join, open_fs
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.data import image_of, read_tars, shard_paths, tar_samples
from uniloom.pipelines.workspace import publish, ray_storage, scratch, staging, workspace_uri


def corpus_dir(cfg: UniloomConfig) -> str:
    return cfg.tokenizer.corpus or workspace_uri(cfg, "corpus")


def split_shards(cfg: UniloomConfig) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): the last `heldout_shards` are never trained on."""
    paths = shard_paths(corpus_dir(cfg), cfg.data.storage_options)
    held = cfg.tokenizer.heldout_shards
    if not 0 < held < len(paths):
        raise UniloomError(
            f"config key 'tokenizer.heldout_shards': {held} leaves no training or no held-out shard "
            f"of the {len(paths)} in {corpus_dir(cfg)}"
        )
    return paths[:-held], paths[-held:]


def read_captions(paths: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """The captions of the training tars, which are checked to give every sample an image
    here, before training starts, rather than by a failing Ray Data task later."""
    return [
        s.members["txt"].decode()
        for path in paths
        for s in tar_samples(path, storage_options)
        if "txt" in s.members
    ]


def _decode_tars(
    batch: dict[str, Any], size: int, caption_index: dict[str, int], storage_options: dict[str, Any]
) -> dict[str, np.ndarray]:
    """A batch of tar paths -> their samples: images (B, 3, H, W) uint8, caption indices (B,)."""
    # read_captions checked every tar: only one changed since fails here
    samples = [s for path in batch["path"] for s in tar_samples(str(path), storage_options)]
    captions = [caption_index[s.members["txt"].decode()] for s in samples]
    return {"image": np.stack([image_of(s, size) for s in samples]), "caption": np.array(captions, np.int64)}


def build_dataset(
    paths: list[str],
    size: int,
    caption_index: dict[str, int],
    materialize: bool,
    storage_options: dict[str, Any] | None = None,
):
    """Ray Data: (image uint8 (3, H, W), caption index) rows from the webdataset tars (any
    fsspec URL: the tasks read them wherever they run), one read task per tar."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"path": str(p)} for p in paths], override_num_blocks=len(paths))
    decode = functools.partial(
        _decode_tars, size=size, caption_index=caption_index, storage_options=storage_options or {}
    )
    ds = ds.map_batches(decode, batch_format="numpy", batch_size=1, num_cpus=0.5)
    return ds.materialize().randomize_block_order() if materialize else ds


def _run_trainer(cfg: UniloomConfig, dataset, loop_config: dict[str, Any], restart: bool):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from uniloom.pipelines import device
    from uniloom.pipelines.tokenizer.loop import train_loop

    t = cfg.tokenizer
    # One GPU per worker and NCCL where tokenizer.device resolves to cuda on this Ray
    # cluster; each worker resolves it again against the GPUs Ray gave it (loop.py).
    where = device.resolve(t.device, device.ray_gpus(t.num_workers), "tokenizer.device",
                           f"a GPU for each of the {t.num_workers} workers in the Ray cluster")  # fmt: skip
    storage = t.storage or workspace_uri(cfg, "ray_results")
    name = t.run_name or f"{t.kind}-{cfg.preset}"
    filesystem, storage_path = ray_storage(storage, cfg.data.storage_options)
    if restart:
        fs, path = open_fs(storage, cfg.data.storage_options)
        if fs.exists(join(path, name)):
            fs.rm(join(path, name), recursive=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=where == "cuda",
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend=device.backend(where)),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error is not None:
        raise UniloomError(f"tokenizer training failed: {result.error}")
    if result.checkpoint is None:
        raise UniloomError(f"tokenizer run {name} under {storage} produced no checkpoint")
    return result, join(storage, name)


def _final_model(cfg: UniloomConfig, checkpoint):
    import torch

    from uniloom.pipelines.tokenizer.kinds import kind_of

    kind = kind_of(cfg)
    model = kind.build(kind.config(cfg))
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "model.pt", weights_only=True, map_location="cpu")
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    return model.eval()


def train_tokenizer(cfg: UniloomConfig, restart: bool = False, echo: Callable[[str], None] = print):
    """Train (or resume), export, evaluate, register. Returns the summary."""
    import mlflow
    import torch

    from uniloom.pipelines import device, tracking
    from uniloom.pipelines.raycluster import init_ray
    from uniloom.pipelines.tokenizer.evaluate import grid_image, probe_accuracy, reconstruction_metrics
    from uniloom.pipelines.tokenizer.kinds import kind_of
    from uniloom.pipelines.tokenizer.loop import Budget
    from uniloom.pipelines.tokenizer.registry import log_and_register, tag_weights
    from uniloom.pipelines.tokenizer.text import caption_embeddings
    from uniloom.pipelines.tokenizer.weights import default_path, save_tokenizer

    t, kind = cfg.tokenizer, kind_of(cfg)
    m = kind.config(cfg)
    if t.batch_size % t.num_workers:
        raise UniloomError(f"tokenizer.batch_size {t.batch_size} does not split over {t.num_workers} workers")
    train_paths, held_paths = split_shards(cfg)
    started = time.perf_counter()
    options = cfg.data.storage_options
    echo(f"captions: embedding with all-MiniLM-L6-v2 (cached under {scratch(cfg, 'cache')})")
    captions = sorted(set(read_captions(train_paths, options)))
    text = caption_embeddings(captions, scratch(cfg, "cache"))
    heldout = read_tars(held_paths, m.image_size, storage_options=options)
    init_ray(cfg.ray)
    echo(f"data: {len(train_paths)} training shards through Ray Data, {len(heldout.keys)} held-out images")
    dataset = build_dataset(
        train_paths, m.image_size, {c: i for i, c in enumerate(captions)}, t.materialize, options
    )
    with tracking.stage_run(cfg, "tokenizer") as run:
        loop_config = {
            "cfg": to_dict(cfg),
            "text": text,
            "eval_images": heldout.images[: t.eval_images],
            "mlflow_uri": mlflow.get_tracking_uri(),
            "mlflow_run_id": run.info.run_id,
        }
        echo(f"training: {t.num_workers} Ray Train worker(s), {t.steps} steps" + (
            f" (safety cap: {t.max_minutes:g} minutes)" if t.max_minutes > 0 else ""))  # fmt: skip
        result, run_dir = _run_trainer(cfg, dataset, loop_config, restart)
        train_seconds = time.perf_counter() - started
        final = result.metrics or {}
        steps_done = int(final.get("step", 0))
        budget_cut = steps_done < t.steps  # only the safety cap ends a run before its steps
        mlflow.log_metrics({"budget_cut": float(budget_cut), "steps_planned": t.steps})
        if budget_cut:
            echo(Budget(t.steps, t.max_minutes).warning(steps_done))
        # The driver calibrates and evaluates on its own GPU where tokenizer.device allows one.
        model = _final_model(cfg, result.checkpoint).to("cpu" if t.device == "cpu" else device.local_device())
        if t.calibrate_latents:
            sample = read_tars(train_paths[:1], m.image_size, limit=256, storage_options=options).images
            calibrated = kind.calibrate(model, torch.from_numpy(sample).float().div(127.5).sub(1.0))
            if calibrated:
                echo(f"latent normalisation calibrated: shift {calibrated[0]:.4f}, scale {calibrated[1]:.4f}")
        echo(f"evaluating on {len(heldout.keys)} held-out images and {t.probe_test} probe scenes")
        metrics = reconstruction_metrics(model, heldout)
        metrics.update(probe_accuracy(model, cfg.corpus.seed, t.probe_train, t.probe_test))
        mlflow.log_metrics({f"final/{k}": v for k, v in metrics.items()})
        from uniloom.pipelines.tokenizer.evaluate import reconstruct_all

        grid = grid_image(
            heldout.images[:32].transpose(0, 2, 3, 1), reconstruct_all(model, heldout.images[:32])
        )
        mlflow.log_image(grid, "reconstructions/final.png")
        target = default_path(cfg)
        with staging(cfg, target) as local:  # a remote workspace: a scratch copy, gone after
            weights = save_tokenizer(model, local)
            publish(cfg, weights, target)  # on a remote workspace: every node reads it there
            mlflow.log_artifact(str(weights), artifact_path="weights")
            info = log_and_register(weights, kind, m, cfg.data.latent_dtype, t.register)
            if getattr(info, "registered_model_version", None):
                tag_weights(cfg, kind.registered_name, str(info.registered_model_version), weights)
        return {
            "weights": target,
            "run_dir": str(run_dir),
            "mlflow_run_id": run.info.run_id,
            "model_uri": info.model_uri,
            "registered_model": kind.registered_name if t.register else None,
            "registered_version": getattr(info, "registered_model_version", None),
            "steps": final.get("step"),
            "steps_planned": t.steps,
            "budget_cut": budget_cut,
            "resumed_from_step": final.get("start_step", 0),
            "budget_clock": t.budget_clock,
            "train_loop_seconds": round(float(final.get("elapsed", 0.0)), 1),  # by the budget clock
            "train_loop_wall_seconds": round(float(final.get("wall", 0.0)), 1),
            "train_loop_cpu_seconds": round(float(final.get("cpu", 0.0)), 1),
            "load_1min": round(os.getloadavg()[0], 2),
            "train_seconds": round(train_seconds, 1),
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
        }
