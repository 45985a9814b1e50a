"""Commands that read a file from a remote workspace (moto's S3 server on 127.0.0.1): the
tokenizer's export read by URL, with or without --weights; `--model s3://...safetensors`
read as a file, not as an MLflow URI; and no copy of what was read left on this node."""

from __future__ import annotations

import json

import pytest
import s3fs
import torch
from PIL import Image

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.weights import save_tokenizer
from uniloom.pipelines.workspace import scratch

BUCKET = "remote-commands"
SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=32, enc_depth=1, enc_heads=2, sem_width=32, sem_depth=1,
    sem_heads=2, pix_width=32, pix_depth=1, pix_patch_size=4, latent_dim=8,
)  # fmt: skip


@pytest.fixture
def remote(s3_server, tmp_path, monkeypatch):
    """A workspace in the bucket holding a MingTok export at its default place; the
    environment s3fs reads (as on a cluster node) pointed at moto."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = s3fs.S3FileSystem(**s3_server)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    workspace = f"s3://{BUCKET}/{tmp_path.name}"
    torch.manual_seed(0)
    local = save_tokenizer(MingTok(SMALL), tmp_path / "mingtok.safetensors")
    fs.put_file(str(local), f"{workspace}/mingtok/mingtok.safetensors")
    Image.new("RGB", (32, 32), (215, 35, 35)).save(tmp_path / "red.png")
    return workspace


def _scratch_files(workspace: str) -> list:
    folder = scratch(load_config("tiny", overrides=[f"workspace={workspace}"]))
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("by", ["workspace", "weights"])
def test_reconstruct_reads_the_export_from_a_remote_workspace(remote, tmp_path, uniloom_main, by):
    where = ["--set", f"workspace={remote}"] if by == "workspace" else [
        "--weights", f"{remote}/mingtok/mingtok.safetensors"]  # fmt: skip
    code, out, err = uniloom_main(
        "tokenizer",
        "reconstruct",
        str(tmp_path / "red.png"),
        "--out",
        str(tmp_path / "out"),
        *where,
        "--json",
    )
    assert code == 0, err
    assert len(json.loads(out.strip().splitlines()[-1])["psnr"]) == 1
    assert (tmp_path / "out" / "red.png").is_file()
    assert not _scratch_files(remote)  # the fetched copy is gone


def test_a_missing_remote_export_is_one_clear_error(remote, tmp_path, uniloom_main):
    code, _, err = uniloom_main("tokenizer", "reconstruct", str(tmp_path / "red.png"), "--out",
                                str(tmp_path / "out"), "--set", f"workspace={remote}-nothing-here")  # fmt: skip
    assert code == 1 and err.startswith("error: ") and "mingtok.safetensors" in err, err
    assert "Traceback" not in err


def test_a_remote_safetensors_model_is_read_as_a_file_not_an_mlflow_uri(remote):
    from uniloom.pipelines.evaluate.loading import _load

    cfg = load_config("tiny", overrides=[f"workspace={remote}"])
    # a tokenizer's file where a unified model's is expected: the export reader refuses it
    # (an MLflow lookup would fail with "cannot load model ...")
    with pytest.raises(UniloomError, match="not a uniloom-univision export"):
        _load(cfg, f"{remote}/mingtok/mingtok.safetensors")
    assert not _scratch_files(remote)
