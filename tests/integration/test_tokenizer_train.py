"""MingTok training through the real engines: Ray Data reads the corpus tars, Ray Train
runs the loop and checkpoints, a rerun of the same run resumes, MLflow gets the metrics,
the reconstruction grids and the registered model `uniloom-mingtok`."""

from __future__ import annotations

import numpy as np
import pytest

from uniloom.pipelines.config import CorpusConfig, load_config
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.tokenizer.weights import load_mingtok

pytestmark = pytest.mark.integration

SMALL = {
    "image_size": 32, "patch_size": 8, "enc_width": 64, "enc_depth": 1, "enc_heads": 2, "sem_width": 64,
    "sem_depth": 1, "sem_heads": 2, "pix_width": 32, "pix_depth": 1, "pix_heads": 2, "pix_patch_size": 4,
}  # fmt: skip


def test_train_checkpoints_resumes_and_registers(ray_local, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from uniloom.pipelines.tokenizer.train import train_tokenizer

    synthesize(CorpusConfig(num=24, shards=3, size=32), tmp_path / "corpus")
    overrides = [f"mingtok.{k}={v}" for k, v in SMALL.items()] + [
        f"workspace={tmp_path / 'ws'}", f"tokenizer.corpus={tmp_path / 'corpus'}", "tokenizer.batch_size=4",
        "tokenizer.checkpoint_interval=1", "tokenizer.eval_interval=2", "tokenizer.eval_images=4",
        "tokenizer.probe_train=12", "tokenizer.probe_test=6", "tokenizer.steps=2",
    ]  # fmt: skip
    first = train_tokenizer(load_config("tiny", overrides=overrides), echo=lambda _: None)
    assert (first["steps"], first["resumed_from_step"]) == (2, 0)
    assert first["registered_model"] == "uniloom-mingtok"
    assert len(list((tmp_path / "ws" / "ray_results" / "mingtok-tiny").glob("checkpoint_2*"))) == 2

    # Resume on two workers (DDP over gloo): a checkpoint does not depend on the worker count.
    two = [
        "tokenizer.steps=3",
        "tokenizer.num_workers=2",
        "tokenizer.cpus_per_worker=0.5",
        "tokenizer.threads=1",
    ]
    second = train_tokenizer(load_config("tiny", overrides=[*overrides, *two]), echo=lambda _: None)
    assert (second["steps"], second["resumed_from_step"]) == (3, 2)  # went on from the last checkpoint
    assert int(second["registered_version"]) == int(first["registered_version"]) + 1

    client = MlflowClient()
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags["uniloom.stage"] == "tokenizer"
    assert run.data.tags["precision.tokenizer.requested"] == "auto"  # the tiny preset's
    assert run.data.tags["precision.tokenizer"] in ("fp32", "bf16")
    assert (second["steps_planned"], second["budget_cut"], run.data.metrics["budget_cut"]) == (3, False, 0.0)
    history = client.get_metric_history(run.info.run_id, "eval/psnr")
    assert [m.step for m in history] == [3]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")]
    assert "reconstructions/step_0000003.png" in artifacts and "reconstructions/final.png" in artifacts
    for key in ("psnr", "ssim", "detector_agreement", "probe_shape", "probe_color"):
        assert f"final/{key}" in run.data.metrics

    registered = mlflow.pyfunc.load_model(f"models:/uniloom-mingtok/{second['registered_version']}")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    latents = registered.predict(images)
    assert latents.shape == (2, 16, 32)
    exported = load_mingtok(second["weights"])
    import torch

    with torch.no_grad():
        expected = exported.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert np.allclose(latents, expected.numpy(), atol=1e-5)
