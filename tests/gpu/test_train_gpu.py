"""Unified training on one GPU through the real path (Ray Train with NCCL, DeepSpeed at
ZeRO 2, the experts marked and grouped for expert parallelism at size 1), a resume that
continues the stage with its optimizer state, then `uniloom generate` and `uniloom edit`
on the GPU. Skipped, with the reason, where there is no CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from trainshards import config_file, make_shards, uniloom

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    return make_shards(tmp_path_factory.getbasetemp() / "train-shards", ray_local)


@pytest.fixture(scope="module")
def gpu_run(data, tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-train")
    cfg = config_file(work / "train.yaml", data, work / "ws", device="cuda", workers=1, cpus_per_worker=1.0,
                      zero_stage=2, expert_parallel=1)  # fmt: skip
    runs = []
    for steps in (4, 6):  # the second raises the finished stage's steps: it continues it
        result = uniloom("train", "--config", str(cfg), "--stage", "1", "--workers", "1", "--json",
                         "--set", f"train.stages.align.steps={steps}", cwd=work)  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return work, cfg, runs


def test_training_runs_on_the_gpu_in_bf16_at_zero_2_and_resumes_mid_stage(gpu_run):
    from mlflow.tracking import MlflowClient

    work, _, (first, second) = gpu_run
    assert (first["stage"], first["global_step"], second["global_step"]) == ("align", 4, 6)
    assert [r["global_step"] for r in second["resumes"]] == [4]  # continued from step 4's checkpoint
    assert [s for s, *_ in second["loss_curve"]] == [2, 4, 6]  # logged every 2 steps, across the resume
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'ws' / 'mlflow.db'}")
    tags = client.get_run(second["mlflow_run_id"]).data.tags
    assert tags["precision.train"] == "bf16"  # train.precision auto, resolved on a CUDA worker


def test_generate_and_edit_run_on_the_gpu(gpu_run):
    from PIL import Image

    work, cfg, (_, second) = gpu_run
    common = ["--model", second["export"], "--config", str(cfg), "--set", "eval.device=cuda", "--json"]
    made = uniloom("generate", "a red circle", "--num", "2", "--out", str(work / "gen"), *common, cwd=work)
    assert made.returncode == 0, made.stderr[-4000:]
    images = json.loads(made.stdout.strip().splitlines()[-1])["images"]
    assert [Image.open(p).size for p in images] == [(32, 32)] * 2
    edited = uniloom("edit", images[0], "--instruction", "make it blue", "--instruction", "move it left",
                     "--out", str(work / "edit"), *common, cwd=work)  # fmt: skip
    assert edited.returncode == 0, edited.stderr[-4000:]
    assert len(json.loads(edited.stdout.strip().splitlines()[-1])["images"]) == 2


def test_base_masked_gqa_attention_runs_on_the_memory_efficient_kernel():
    """base's attention shape (GQA 12/4 heads of 128) with a training mask, in bf16: with
    only the memory-efficient kernel allowed it runs (K/V repeated, models/blocks.py), and
    gives what the math kernel gives, forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from uniloom.models.blocks import Attention, attention_mask

    torch.manual_seed(0)
    attn = Attention(1536, 12, kv_heads=4, head_dim=128, bias=False, fused=False).cuda().bfloat16()
    x = torch.randn(2, 1024, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    keys = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
    keys[1, 900:] = False
    mask = attention_mask(keys, 1024)
    runs = []
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        x.grad = None
        with sdpa_kernel([backend]):
            y = attn(x, mask=mask)
            y.float().square().mean().backward()
        runs.append((y.float(), x.grad.float()))
    for eff, math in zip(*runs, strict=True):  # bf16: within 2% of the largest value
        scale = math.abs().max()
        torch.testing.assert_close(eff / scale, math / scale, atol=2e-2, rtol=0)
