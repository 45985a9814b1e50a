"""An exported unified model stands alone: the safetensors file carries its text tokenizer,
so `uniloom generate --model FILE` works from any folder with nothing beside the file."""

import dataclasses
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from uniloom.models.mingtok import MingTokConfig
from uniloom.models.univision import UniVisionConfig
from uniloom.pipelines.data.text_tokenizer import fingerprint, train_bpe
from uniloom.pipelines.train import checkpoint as ckpt
from uniloom.pipelines.train.module import Trainee
from uniloom.pipelines.train.registry import export_model

TOK = MingTokConfig(image_size=32, patch_size=8, latent_dim=8, enc_width=32, enc_depth=1, enc_heads=2,
                    sem_width=32, sem_depth=1, sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2,
                    pix_patch_size=4)  # fmt: skip
CAPTIONS = ["a red circle", "two blue squares", "a green triangle left of a red circle"] * 4


@contextmanager
def registered(cfg, export: Path, monkeypatch):
    """Log and register `export` in cfg's workspace MLflow; yields the registered model's
    info. The tracking URI, which tracking.configure sets, is restored after the block."""
    import mlflow

    from uniloom.pipelines import tracking
    from uniloom.pipelines.train.registry import log_and_register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    try:
        tracking.configure(cfg)
        with mlflow.start_run() as run:
            pass
        yield log_and_register(
            cfg, export, {"mlflow_run_id": run.info.run_id}, {"global_step": 0, "losses": []}
        )
    finally:
        mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint folder, export metadata as the trainer writes it, the shards' BPE) of a
    tiny random model."""
    text = train_bpe(CAPTIONS, 300, 1)
    cfg = UniVisionConfig(vocab_size=text.get_vocab_size(), hidden=32, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=16, num_experts=2, experts_per_token=1, expert_ffn=32,
                          num_shared_experts=0, semantic_dim=TOK.sem_width, latent_dim=TOK.latent_dim,
                          flow_width=16, flow_depth=1)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt.save(None, Trainee(cfg, TOK), folder, 0, 1, {"epoch": 0, "rows": 0}, {"world": 1})
    metadata = {"model": dataclasses.asdict(cfg), "mingtok": dataclasses.asdict(TOK),
                "image_tokenizer": "0" * 16, "text_tokenizer": fingerprint(text), "stage": "edit",
                "global_step": 0}  # fmt: skip
    return folder, metadata, text


def test_an_export_copied_alone_to_an_empty_folder_generates_there(checkpoint, tmp_path, monkeypatch,
                                                                   uniloom_main):  # fmt: skip
    folder, metadata, text = checkpoint
    made = export_model(ckpt.Reader(folder), tmp_path / "ws" / "univision" / "univision.safetensors",
                        metadata, text)  # fmt: skip
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(made, alone / "model.safetensors")
    shutil.rmtree(tmp_path / "ws")
    monkeypatch.chdir(alone)
    code, out, err = uniloom_main("generate", "a red circle", "--model", "model.safetensors", "--steps", "1",
                                  "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["images"] == ["generated/generated-0.png"]
    assert sorted(p.name for p in alone.rglob("*")) == ["generated", "generated-0.png", "model.safetensors"]


def test_the_embedded_tokenizer_must_be_the_one_the_run_trained_with(checkpoint, tmp_path):
    from uniloom.pipelines.errors import UniloomError

    folder, metadata, _ = checkpoint
    other = train_bpe(["something else entirely"] * 3, 280, 1)
    with pytest.raises(UniloomError, match="a data run replaced it during training"):
        export_model(ckpt.Reader(folder), tmp_path / "model.safetensors", metadata, other)


def test_an_older_export_without_its_tokenizer_names_where_it_looked(checkpoint, tmp_path, monkeypatch,
                                                                     uniloom_main):  # fmt: skip
    folder, metadata, _ = checkpoint
    ckpt.export(ckpt.Reader(folder), tmp_path / "old.safetensors", metadata)  # as exports were made before
    monkeypatch.chdir(tmp_path)
    code, _, err = uniloom_main("generate", "a red circle", "--model", "old.safetensors")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]
    assert "old.safetensors carries no text tokenizer" in err and str(tmp_path / "workspace" / "data") in err


def test_the_registered_model_carries_the_export_and_its_tokenizer_alone(checkpoint, tmp_path, monkeypatch,
                                                                         uniloom_main):  # fmt: skip
    """Models from code (pipelines/train/pyfunc_model.py): the one artifact is the export."""
    import mlflow

    from uniloom.pipelines.config import load_config

    folder, metadata, text = checkpoint
    ws = tmp_path / "ws"
    made = export_model(ckpt.Reader(folder), tmp_path / "model.safetensors", metadata, text)
    cfg = load_config("tiny", overrides=[f"workspace={ws}"])
    with registered(cfg, made, monkeypatch) as info:
        logged = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "logged")))
    assert [p.name for p in (logged / "artifacts").iterdir()] == ["model.safetensors"]
    made.unlink()  # the registry keeps its own copy
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    monkeypatch.chdir(alone)
    model_uri = f"models:/uniloom-univision/{info.registered_model_version}"
    code, out, err = uniloom_main("generate", "a red circle", "--model", model_uri, "--steps", "1",
                                  "--set", f"workspace={ws}", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["images"] == ["generated/generated-0.png"]
