"""`uniloom tokenizer reconstruct/eval` and `uniloom bench tokenizer` through the console
script, with a small randomly initialised MingTok (training is the integration test's)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.pipelines.tokenizer.weights import save_tokenizer

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_depth=1, enc_heads=2, sem_width=64, sem_depth=1,
    sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2, pix_patch_size=4,
)  # fmt: skip
SMALL_SET = [f"--set=mingtok.{k}={v}" for k, v in vars(SMALL).items()]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_tokenizer(MingTok(SMALL), tmp_path_factory.mktemp("w") / "mingtok.safetensors")


def test_reconstruct_writes_one_png_per_input(cli, tmp_path, weights):
    Image.new("RGB", (48, 48), (30, 160, 60)).save(tmp_path / "green.png")
    Image.new("RGB", (32, 32), (215, 35, 35)).save(tmp_path / "red.jpg")
    out = tmp_path / "out"
    proc = cli("tokenizer", "reconstruct", str(tmp_path / "green.png"), str(tmp_path / "red.jpg"),
               "--out", str(out), "--weights", str(weights), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["written"] == [str(out / "green.png"), str(out / "red.png")]
    assert Image.open(out / "green.png").size == (32, 32)
    assert len(summary["psnr"]) == 2


@pytest.mark.parametrize("content", ["truncated", "text"])
def test_reconstruct_rejects_a_bad_input_naming_the_file(cli, tmp_path, weights, content):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (35, 75, 215)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:60] if content == "truncated" else b"just some text\n")
    out = tmp_path / "out"
    proc = cli("tokenizer", "reconstruct", str(good), str(bad), "--out", str(out), "--weights", str(weights))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing is written when any input is bad


def test_reconstruct_without_weights_says_how_to_get_them(cli, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    proc = cli("tokenizer", "reconstruct", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
               f"--set=workspace={tmp_path / 'ws'}")  # fmt: skip
    assert proc.returncode == 1 and "tokenizer train" in proc.stderr


def test_eval_reports_every_figure(cli, tmp_path, weights):
    corpus = tmp_path / "corpus"
    assert (
        cli(
            "corpus", "synth", "--out", str(corpus), "--num", "12", "--shards", "2", "--size", "32"
        ).returncode
        == 0
    )
    proc = cli("tokenizer", "eval", "--weights", str(weights), "--corpus", str(corpus), "--json",
               "--set=tokenizer.probe_train=24", "--set=tokenizer.probe_test=12")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["images"] == 6  # the held-out shard only
    for key in ("psnr", "ssim", "detector_agreement", "probe_shape", "probe_color"):
        assert isinstance(summary[key], float), key
    assert summary["detector_on_originals"] > 0.5  # the baseline: the detector reads 32 px originals


def test_bench_tokenizer_prints_rates_and_says_when_there_is_no_gpu(cli):
    proc = cli("bench", "tokenizer", "--batch", "2", "--iters", "1", "--json", *SMALL_SET)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("encode_images_per_s", "decode_images_per_s", "incremental_semantic_latents_per_s"):
        assert summary[f"tiny_cpu_{key}"] > 0
    if not torch.cuda.is_available():
        assert "no CUDA" in summary["paper_cuda"]
