"""MingTok training on a GPU: the step on CUDA computes what it computes on the CPU, trains
in bf16 (auto on CUDA), writes checkpoints that load on the CPU, and the Ray Train run puts
its worker on the GPU. Skipped, with the reason, where there is no CUDA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]

SMALL = {
    "image_size": 32, "patch_size": 8, "enc_width": 64, "enc_depth": 1, "enc_heads": 2, "sem_width": 64,
    "sem_depth": 1, "sem_heads": 2, "pix_width": 32, "pix_depth": 1, "pix_heads": 2, "pix_patch_size": 4,
}  # fmt: skip


def config(*overrides: str):
    from uniloom.pipelines.config import load_config

    small = [f"mingtok.{k}={v}" for k, v in SMALL.items()]
    return load_config(
        "tiny", overrides=[*small, "tokenizer.warmup_steps=1", "tokenizer.lr=2e-3", *overrides]
    )


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(8) % 4


def test_a_mingtok_step_on_the_gpu_matches_the_cpu_and_its_checkpoint_loads_on_the_cpu(tmp_path):
    from uniloom.pipelines.tokenizer.step import MIMTraining

    text = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    images, caption = batch()
    exact = config("tokenizer.precision=fp32")
    first = [MIMTraining(exact.mingtok, exact.tokenizer, text, where).step(images, caption, 0)["loss/total"]
             for where in ("cpu", "cuda")]  # fmt: skip
    assert first[1] == pytest.approx(first[0], rel=1e-2)  # same weights, masks and targets (TF32 convs aside)

    cfg = config()  # precision auto: bf16 on CUDA
    training = MIMTraining(cfg.mingtok, cfg.tokenizer, text, "cuda")
    assert training.device.type == "cuda" and training.precision == "bf16"
    assert all(p.is_cuda for p in training.module.parameters())
    losses = [training.step(images, caption, step)["loss/total"] for step in range(10)]
    assert all(map(math.isfinite, losses)) and sum(losses[-2:]) < sum(losses[:2]), losses
    training.save(tmp_path, {"step": 10, "elapsed": 0.0})
    on_cpu = MIMTraining(cfg.mingtok, cfg.tokenizer, text, "cpu")
    assert on_cpu.load(tmp_path)["step"] == 10
    for (name, a), b in zip(training.module.state_dict().items(), on_cpu.module.state_dict().values()):
        assert torch.equal(a.cpu(), b), name


def test_tokenizer_train_puts_its_ray_worker_on_the_gpu(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from uniloom.pipelines.config import CorpusConfig
    from uniloom.pipelines.corpus.synth import synthesize
    from uniloom.pipelines.tokenizer.train import train_tokenizer

    synthesize(CorpusConfig(num=24, shards=3, size=32), tmp_path / "corpus")
    cfg = config(
        f"workspace={tmp_path / 'ws'}", f"tokenizer.corpus={tmp_path / 'corpus'}", "tokenizer.batch_size=4",
        "tokenizer.checkpoint_interval=1", "tokenizer.eval_interval=2", "tokenizer.eval_images=4",
        "tokenizer.probe_train=12", "tokenizer.probe_test=6", "tokenizer.steps=2", "tokenizer.device=cuda",
    )  # fmt: skip
    summary = train_tokenizer(cfg, echo=lambda _: None)
    assert summary["steps"] == 2 and math.isfinite(summary["psnr"])
    tags = MlflowClient().get_run(summary["mlflow_run_id"]).data.tags
    assert tags["precision.tokenizer"] == "bf16"  # resolved on the worker: its device is CUDA
